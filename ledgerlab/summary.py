"""
summary.md, what measure.py writes (and prints) for the checkpoints it measured together. It opens
with the answer: the paper's three claims asked of these runs (reports.claims). Then come which
checkpoints were measured, four dense tables (the outlier's structure in the decoded stream, whether
the model needs it, Guo et al.'s extreme-token phenomena, the released code's definitions beside
this repo's), the runs of one experiment across seeds, the raw and per-token normalised numbers side
by side, and the notes: plain-words lines on what each run's numbers do and do not show.
"""
import math
import os

from ledgerlab.cli import results_header
from ledgerlab.metrics import NORM_FRACTION, SUN_ABS, SUN_REL, head_name, no_sink_level
from ledgerlab.reports import (across_seeds_table, claims, decoded, fmt, markdown_table, massive_activation_table,
                     short_run, significant)


def write_summary(results, cfg, command, path):
    """summary.md at path, for the measured runs' metrics (each with its notes); returns its text."""
    answer = "\n\n".join(part for part in (short_run(results), claims(results)) if part)
    seeds = across_seeds_table(results)
    windows = ("windows opening on the start token" if results[0]["settings"]["align_windows"]
               else "windows at random offsets")
    trained = {os.path.basename(m["run_dir"]): m["trained_by"] for m in results}
    text = (results_header("measure.py", command, trained) + "\n"
            f"# Residual-stream structure ({cfg.split} split, {cfg.num_windows} {windows} of "
            f"{results[0]['settings']['seq_len']} tokens, seed {cfg.seed})\n\n"
            + (f"{answer}\n\n" if answer else "")
            + f"{checkpoint_choice(results)}\n\n{summary_tables(results)}\n\n"
            + (f"Across runs of the same arm, mean [min, max], decoded stream:\n\n{seeds}\n\n" if seeds else "")
            + f"{normalized_table(results)}\n\n"
            + f"Ratios named top dim / median dim are mean |x| of the top dimension over the median dimension "
            f"(pos 0: of the dominant dimension, at position 0 only); start-token concentration is the dominant "
            f"dimension's mean |x| at position 0 over positions 1..T-1. Peaks skip sublayers whose "
            f"stream norm is under {NORM_FRACTION:.0%} of the final norm. Sun-massive entries (Sun et al.'s rule): "
            f"|x| > {SUN_ABS:g} and >= {SUN_REL:g}x the layer-wide median, the median |x| of a window's whole "
            f"sublayer output, every token and dimension; top |x| / layer-wide median is the mean over windows of "
            f"that output's largest |x| over the mean of its median. Losses: val loss on the same windows.\n\n"
            + "\n".join(f"- {line}" for m in results for line in m["notes"]) + "\n")
    with open(path, "w") as f:
        f.write(text)
    return text


def checkpoint_choice(results):
    """Which checkpoint of each run was measured. The two choices answer different questions: at
    matched loss a faster learner does not look different merely for being further along; at equal
    steps (the released code: each arm's final model) every arm had the same training budget."""
    iters = ", ".join(str(m["iter_num"]) for m in results)
    matched = [m["selection"] for m in results if m["selection"]["checkpoint"] == "matched_loss"]
    if matched:
        how = "auto: the lowest val loss every run reached" if matched[0]["auto"] else "--match_loss"
        return (f"Checkpoints: matched loss, the kept snapshot of each run whose val loss is closest to "
                f"{matched[0]['match_loss']:.4f} ({how}); iters {iters}. The released code measures each arm's "
                f"final model after equal steps instead (measure.py without --match_loss).")
    equal = len({m["iter_num"] for m in results}) == 1
    return (f"Checkpoints: the final one of each input (iter {iters}), "
            + ("equal steps, as the released code measures." if equal else
               "at unequal steps, so neither the released code's comparison nor a matched-loss one."))


# ----------------------------------------------------------------------------------------------
# The dense tables: one row per run

def scratch(m):
    """Ledger's scratch stream D beside its decoded C (None for every other arm)."""
    return m["streams"].get("D") if m["decoded_stream"] == "C" else None


def structure_row(m):
    s, d = decoded(m), scratch(m)
    return [m["label"], str(m["iter_num"]), fmt(m["measured_val_loss"]), m["decoded_stream"],
            str(s["dominant_dim"]), fmt(s["persistence"], ".2f"),
            f"{s['peak_ratio']:.1f}x ({s['peak_sublayer_name']})", f"{s['final_ratio']:.1f}x",
            f"{s['peak_pos0_ratio']:.1f}x", f"{s['peak_top1_over_layer_median']:.1f}x",
            f"{s['start_token_concentration_peak']:.1f}x", fmt(s["kurtosis_final"], ".1f"),
            str(s["sun_massive_count_total"]),
            f"{d['dominant_dim']}, {d['peak_ratio']:.1f}x" if d else "—"]


def function_row(m):
    iv, q = m.get("interventions") or {}, m.get("quantization") or {}
    return [m["label"], fmt(m["measured_val_loss"]), fmt(iv.get("zero_loss")), fmt(iv.get("mean_loss")),
            fmt(iv.get("control_zero_loss")), fmt(q.get("w8_loss")), fmt(q.get("w4_loss"))]


def extreme_row(m):
    e, peak, d = m["extreme_tokens"], decoded(m)["residual_peak"], scratch(m)
    return [m["label"], f"{e['sink_max']:.2f} ({head_name(e['sink_max_layer_head'])})",
            f"{e['sink_uniform_baseline']:.2f}",
            f"{e['value_drain_min']:.2f} ({head_name(e['value_drain_min_layer_head'])})",
            f"{peak['max']:.1f}x ({peak['max_sublayer_name']})", f"{peak['final']:.1f}x",
            f"{d['residual_peak']['max']:.1f}x" if d else "—", attention_cell(e)]


def definitions_row(m):
    s = decoded(m)
    r = s["released_definitions"]
    return [m["label"], m["decoded_stream"], f"{r['peak_ratio']:.1f}x ({r['peak_sublayer_name']})",
            f"{s['peak_ratio']:.1f}x ({s['peak_sublayer_name']})",
            f"{r['start_token_concentration']:.2f}x ({r['concentration_sublayer_name']})",
            f"{s['start_token_concentration_peak']:.1f}x ({s['peak_sublayer_name']})",
            fmt(r["kurtosis_max"], ".1f"), fmt(s["kurtosis_final"], ".1f")]


def summary_tables(results):
    """Four tables: the outlier's structure in the decoded channel, whether the model needs it,
    Guo et al.'s extreme-token phenomena, and the released code's definitions beside this repo's."""
    kinds = {m["extreme_tokens"].get("attention", "softmax") for m in results}
    return (markdown_table(["arm", "iter", "val loss", "decoded", "dom dim", "persistence",
                            "top dim / median dim, peak (sublayer)", "top dim / median dim, final",
                            "pos 0: dom dim / median dim (peak)", "top \\|x\\| / layer-wide median (peak)",
                            "start-token conc. (peak)", "kurtosis (final)", "Sun-massive entries",
                            "scratch D: dom dim, peak ratio"], map(structure_row, results))
            + "\n\n" + markdown_table(["arm", "val loss", "zero pos-0 dom dim", "mean pos-0 dom dim",
                                        "zero pos-0 control dim", "w8", "w4"], map(function_row, results))
            + "\n\n" + markdown_table(["arm", "sink max (head)", "sink if uniform", "value drain min (head)",
                                        "residual peak (sublayer)", "residual peak final",
                                        "scratch D: residual peak", "attention: its own no-op"],
                                       map(extreme_row, results))
            + "\n\nExtreme tokens (Guo et al. 2024): sink is the mean attention weight that queries 1..T-1 "
              "put on position 0 (uniform attention: the next column); value drain is |v| at position 0 over "
              "the mean |v| at positions >= 1 (< 1: drained); residual peak is the decoded stream's L2 norm at "
              "position 0 over the mean norm at positions >= 1, which grows even when no dimension stands out."
            + "".join(" " + note for kind, note in ATTENTION_NOTES.items() if kind in kinds)
            + "\n\nThe released code's definitions (its probe.py, analyze.py) beside this repo's, decoded stream:\n\n"
            + markdown_table(["arm", "decoded", "peak ratio, released: max over all sublayers",
                              "peak ratio, here: sublayers >= 25% of the final norm",
                              "start-token conc., released: pos 0 / all positions, where the dim peaks",
                              "start-token conc., here: pos 0 / positions >= 1, at the peak",
                              "kurtosis, released: max", "kurtosis, here: final"], map(definitions_row, results))
            + "\n\nAt one sublayer the two concentrations are tied: for ours r, the released one is "
              "T r / (r + T - 1), so it can never exceed T, the window length.")


# What each attention kind's numbers mean, said once under the table when a run of that kind is in it.
ATTENTION_NOTES = {
    "attn_bias": "attn_bias (Sun et al. 2024) adds a learned key k' and value v' per head that every query "
                 "sees: sink stays the weight on position 0, uniform is then 1/(q+2), and the last column is "
                 "the largest mean weight a head puts on k' (k', position 0 and later positions sum to 1).",
    "sigmoid": "sigmoid (Gu et al. 2024) weights are sigmoid(q.k/sqrt(d)) each on its own, not normalised, so "
               "a query's weights need not sum to 1 and a head can attend to nothing instead of sinking: sink is "
               "the raw weight on position 0, of the head with the largest excess over its no-sink level, and "
               "'sink if uniform' is that level, the head's own total weight spread evenly over its q+1 keys "
               "(for softmax that total is 1, which gives 1/(q+1)); the last column is the smallest mean total "
               "weight (mass) of a head.",
    "gated": "gated (Qiu et al. 2025) weights are softmax; each head's output is then multiplied by the gate "
             "sigmoid(W_g u), and a closed gate (near 0) is this kind's no-op, as a sink is softmax's: the last "
             "column is the mean gate at position 0 and at later positions.",
}


def attention_cell(e):
    """The summary cell for the attention kind's own way of doing nothing."""
    kind = e.get("attention", "softmax")
    if kind == "attn_bias":
        return f"attn_bias: k' {e['explicit_sink_max']:.2f} ({head_name(e['explicit_sink_max_layer_head'])})"
    if kind == "sigmoid":
        return f"sigmoid: mass min {e['attention_mass_min']:.2f} ({head_name(e['attention_mass_min_layer_head'])})"
    if kind == "gated":
        return f"gated: gate {e['gate_pos0_mean']:.2f} pos 0, {e['gate_later_mean']:.2f} later"
    return "softmax: the sink"


def normalized_table(results):
    """The decoded stream's headline numbers raw and after per-token RMS normalisation, side by side,
    and which of them compare one stream with another (metrics.normalized_summary)."""
    rows = []
    for m in results:
        s = decoded(m)
        u = s["normalized"]
        rows.append([m["label"], m["decoded_stream"], f"{s['peak_pos0_ratio']:.1f}x", f"{u['peak_pos0_ratio']:.1f}x",
                     f"{s['start_token_concentration_peak']:.1f}x", f"{u['start_token_concentration_peak']:.1f}x",
                     f"{s['residual_peak']['max']:.1f}x", f"{u['residual_peak']['max']:.2f}x"])
    return ("Raw and per-token normalised (x / rms(x): what the RMSNorm before the head reads), decoded stream:\n\n"
            + markdown_table(["arm", "decoded", "pos 0: dom dim / median dim", "the same, normalised",
                              "start-token conc.", "start-token conc., normalised", "residual peak",
                              "residual peak, normalised"], rows)
            + "\n\nAt position 0, dom dim / median dim divides two dimensions of one token, so vanilla's h and "
              "Ledger's C compare on it raw; the concentration and the residual peak divide position 0 by later "
              "tokens, so compare them normalised: raw, C's are large whenever C holds little outside position 0, "
              "which nothing but the final norm reads while lam stays near 0, so the loss hardly constrains it.")


# ----------------------------------------------------------------------------------------------
# Notes: what each run's numbers do and do not show, in plain words

def outlier_note(m):
    """Sun et al.'s rule first; short of it, whether a fixed dimension is a start-token outlier. A
    start-token outlier is diluted T-fold in the all-position ratio, so it is judged at position 0."""
    s, label = decoded(m), m["label"]
    dim, ratio = s["dominant_dim"], s["peak_ratio"]
    pos0, conc = s["peak_pos0_ratio"], s["start_token_concentration_peak"]
    rule = f"Sun et al.'s rule (|x| > {SUN_ABS:g} and >= {SUN_REL:g}x the layer-wide median)"
    if s["sun_massive_count_total"] > 0:
        return (f"{label}: {s['sun_massive_count_total']} massive entries by {rule} "
                f"({s['sun_massive_count_pos0']} at position 0).")
    if pos0 >= 100 and conc >= 10:
        shape = (f"fixed dimension {dim} is {pos0:.0f}x the median dimension at position 0 and {conc:.0f}x "
                 f"larger there than at later positions: a start-token outlier in the 100-1000x range by this "
                 f"ratio, short of Sun et al.'s rule (whether the model needs it: the Δloss when it is zeroed)")
    elif pos0 >= 10 and conc >= 10:
        shape = (f"fixed dimension {dim} is {pos0:.0f}x the median dimension at position 0 and {conc:.0f}x "
                 f"larger there than at later positions: a start-token outlier, short of the 100-1000x of "
                 f"large models")
    elif pos0 >= 10:
        shape = (f"fixed dimension {dim} is {pos0:.0f}x the median dimension at position 0, but only "
                 f"{conc:.1f}x larger there than at later positions")
    elif ratio >= 5:
        shape = f"fixed dimension {dim} at {ratio:.1f}x the median dimension is at most the precursor, not a 100-1000x outlier"
    else:
        shape = f"no pronounced fixed dimension (peak {ratio:.1f}x)"
    return (f"{label}: no massive activations by {rule} in {m['decoded_stream']} "
            f"(largest |x| {max(s['max_abs_per_sublayer']):.1f}); {shape}.")


def attention_notes(m):
    """The sink, judged against the attention kind's own no-sink level, and the kind's own no-op."""
    e, peak, label = m["extreme_tokens"], decoded(m)["residual_peak"], m["label"]
    n_heads, kind = sum(map(len, e["sink_per_layer_head"])), e.get("attention", "softmax")
    head = head_name(e["sink_max_layer_head"])
    if kind == "sigmoid":   # no normalisation: a weight is judged against the head's own total
        sink = (f"sigmoid attention, weights not normalised: head {head} puts {e['sink_max']:.2f} on position 0 "
                f"against {e['sink_uniform_baseline']:.2f} had it spread its total weight "
                f"({e['attention_mass_at_sink_max']:.2f}) evenly over its keys, where |v| is "
                f"{e['value_drain_at_sink_max']:.2f}x that of later positions; {e['sink_heads_over_half']} of "
                f"{n_heads} heads give position 0 over half of their total weight")
    else:
        sink = (f"attention sink: head {head} puts {e['sink_max']:.2f} of its attention on position 0 "
                f"({no_sink_level(e)}: {e['sink_uniform_baseline']:.2f}), where |v| is "
                f"{e['value_drain_at_sink_max']:.2f}x that of later positions; {e['sink_heads_over_half']} of "
                f"{n_heads} heads put over half there")
    lines = [f"{label}: {sink}; position 0's residual norm in {m['decoded_stream']} peaks at "
             f"{peak['max']:.1f}x that of later positions ({peak['max_sublayer_name']})."]
    if kind == "attn_bias":
        lines.append(f"{label}: explicit sink: head {head_name(e['explicit_sink_max_layer_head'])} puts "
                     f"{e['explicit_sink_max']:.2f} of its attention on the learned key k' and "
                     f"{e['sink_at_explicit_sink_max']:.2f} on position 0; |v'| is "
                     f"{e['explicit_sink_value_drain_at_max']:.2f}x the mean |v| of later positions; "
                     f"{e['explicit_sink_heads_over_half']} of {n_heads} heads put over half on k'.")
    elif kind == "sigmoid":
        lines.append(f"{label}: the lightest head, {head_name(e['attention_mass_min_layer_head'])}, puts "
                     f"{e['attention_mass_min']:.2f} in all on its keys per query (a total near 0 is a head that "
                     f"attends to nothing: sigmoid attention's no-op, which needs no sink).")
    elif kind == "gated":
        lines.append(f"{label}: output gate sigmoid(W_g u), mean over heads: {e['gate_pos0_mean']:.2f} at position 0, "
                     f"{e['gate_later_mean']:.2f} at later positions; most closed head "
                     f"{head_name(e['gate_later_min_layer_head'])}: {e['gate_later_min']:.2f} later, "
                     f"{e['gate_pos0_at_later_min']:.2f} at position 0; the sink head {head}'s gate is "
                     f"{e['gate_later_at_sink_max']:.2f} later (a closed gate is this kind's no-op, as a sink is "
                     f"softmax's).")
    return lines


def notes(m):
    """Honest one-liners under the tables: what the numbers do and do not show."""
    s, label = decoded(m), m["label"]
    lines = [outlier_note(m)]
    if s["residual_peak"]["final"] >= 10:
        lines.append(f"{label}: {m['decoded_stream']} is {s['residual_peak']['final']:.0f}x larger at position 0 "
                     f"than at later positions, where it holds little: that alone makes any dimension's start-token "
                     f"concentration large, so read the concentration with it.")
    lines += attention_notes(m)
    shift = (m.get("ledger_streams") or {}).get("loss_change_commit_logits_shifted")
    if shift:
        ls = m["ledger_streams"]
        lines.append(f"{label}: mean commit gate {ls['commit_gate_mean']:.4f}, ‖C‖ / ‖D‖ {ls['C_over_D_norm_final']:.3f}; "
                     f"every commit logit shifted by -2 changes the val loss by {shift['-2']:+.4f}, by +2 by "
                     f"{shift['+2']:+.4f} (small gates scale C by ~e^shift, which the final RMSNorm divides out).")
    if (m.get("selection") or {}).get("distance") is not None:
        lines.append(f"{label}: iter {m['iter_num']} picked to match val loss {m['selection']['match_loss']:.4f}: "
                     f"recorded {m['val_loss_recorded']:.4f}, {m['selection']['distance']:.4f} away.")
    for where, report in (m.get("top_tokens") or {}).items():
        shown = ", ".join(f"{t['text']} {t['ratio_to_pos0']:.2f}x" for t in report["tokens"][:5])
        lines.append(f"{label}: dim {report['dim']} at {report['sublayer_name']} ({where} sublayer): "
                     f"{report['verdict']}; largest off position 0: {shown} (of position 0's mean |x|).")
    return lines


# ----------------------------------------------------------------------------------------------
# A pretrained model's summary.md (measure.py MODEL)

def write_pretrained_summary(m, command, path):
    """summary.md for a pretrained model: the answer (its massive dimensions, how large, where written,
    what zeroing them costs), then per sublayer and per layer what that answer is read from."""
    c, s, iv = m["model_config"], m["streams"]["h"], m["interventions"]
    names, dims = m["sublayer_names"], m["massive_dims"]
    lines = [results_header("measure.py", command),
             f"# A pretrained model: {m['label']} ({m['model']})\n",
             f"{c['arch']}, {c['n_layer']} layers of width {c['n_embd']}, {c['n_head']} heads ({c['n_kv_head']} KV), "
             f"weights in {m['settings']['dtype']}; {m['settings']['num_windows']} windows of "
             f"{m['settings']['seq_len']} tokens of {m['text']['source']}, seed {m['settings']['seed']}. "
             f"**Position 0 is {m['text']['position_0']}**" + (f" ({m['text']['bos_token']!r})" if m['text']['bos'] else "")
             + ": published numbers differ on this convention (`--bos`)."]
    if c["parallel_residual"]:
        lines.append("A parallel-residual block has no residual between its attention and its MLP: every number "
                     "here is per block output.")
    lines.append("")
    for w in dims:
        i = w["written_at"]
        peak = max(w["mean_abs_pos0_per_sublayer"])
        lines.append(f"- **Dimension {w['dim']}**: at position 0 its mean |x| reaches {significant(peak)}, written by "
                     f"{w['written_at_name']} (+{significant(w['written_by'])}), "
                     + (f"erased by {w['erased_at_name']} (-{significant(w['erased_by'])})." if w["erased_at"] is not None
                        else "never erased."))
    if iv:
        lines.append(f"- **Zeroed at position 0** ({', '.join(map(str, iv['dims']))}) at every block's output: val loss "
                     f"{iv['baseline_loss']:.3f} → {iv['zero_every_block_loss']:.3f} (perplexity "
                     f"{math.exp(iv['baseline_loss']):.1f} → {math.exp(iv['zero_every_block_loss']):.1f}); only where "
                     f"written ({names[iv['writer_block_output']]}): {iv['zero_where_written_loss']:.3f}. Set to their "
                     f"means instead: {iv['mean_every_block_loss']:.3f} and {iv['mean_where_written_loss']:.3f}.")
    per_dim = [w["mean_abs_pos0_per_sublayer"] for w in dims]
    lines += ["", massive_activation_table([m]), "",
              "Per sublayer output: at position 0 the massive dimensions' mean |x|, the dominant one's over the median "
              "dimension's, and that median; over each window's whole output (Sun et al.), the largest |x| over the "
              "median (layer-wide), and the massive entries by their rule:", "",
              markdown_table(["sublayer", *(f"dim {w['dim']}" for w in dims), "pos 0: dom dim / median dim",
                              "median dim at pos 0", "top \\|x\\| / layer-wide median", "Sun-massive entries"],
                             [[name, *(significant(v[i]) for v in per_dim), f"{r:.1f}x", significant(a / max(r, 1e-30)),
                               f"{t:.1f}x", str(n)]
                              for i, (name, a, r, t, n) in enumerate(zip(names, s["dominant_mean_abs_pos0_per_sublayer"],
                                                                         s["pos0_ratio_per_sublayer"],
                                                                         s["top1_over_layer_median_per_sublayer"],
                                                                         s["sun_massive_count_per_sublayer"]))]), ""]
    sinks = m["extreme_tokens"]["sink_per_layer_head"]
    head = ["layer", "sink, mean over heads", "max head"]
    rows = [[str(l), f"{sum(h) / len(h):.3f}", f"{max(h):.3f} (H{h.index(max(h))})"] for l, h in enumerate(sinks)]
    if iv:
        head += ["zeroed at every block", "zeroed where written", "set to mean, every block"]
        for row, a, b, c2 in zip(rows, iv["zero_every_block_sink_per_layer"], iv["zero_where_written_sink_per_layer"],
                                 iv["mean_every_block_sink_per_layer"]):
            row += [f"{a:.3f}", f"{b:.3f}", f"{c2:.3f}"]
    lines += ["Attention on position 0 per layer (mean weight of queries 1..T-1 on key 0), and with the massive "
              "dimensions set at position 0:", "", markdown_table(head, rows), ""]
    lines += [f"- {line}" for line in m["notes"]]
    t = m["timing"]
    lines += ["", f"Timing: load {t['load_s']:.1f} s; a plain forward pass over the windows {t['plain_forward_s']:.1f} s; "
              f"the statistics pass {t['statistics_s']:.1f} s ({t['statistics_overhead']:.2f}x the plain pass); "
              f"dominant-dim profile {t['dominant_profile_s']:.1f} s; interventions {t['interventions_s']:.1f} s; "
              f"all {t['seconds']:.1f} s."]
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text
