"""
The reports over many runs, from their metrics.json (metrics_json.py lists the keys):

    across seeds   runs that differ only in their seed are one experiment: mean [min, max] of the
                   headline numbers, and each of the lab's verdicts as "k of n" (summary.md)
    claims         the paper's three claims, asked of the runs measured together (summary.md's opening)
    trajectory     the headline numbers at every kept snapshot of a run (measure.py --trajectory)
    sweep          C's numbers against the commit sparsity lambda, over seeds (lab.py --sweep)

A claim one seed can flip is never a verdict: every report counts over the runs it was given, and the
five-seed verdicts of the full lab are in docs/results/lab-seeds.md.
"""
import dataclasses
import json
import math
import os
import sys

import numpy as np

from ledger import GPTConfig, arm_name
from ledgerlab import figures
from ledgerlab.cli import ConfigError, read_config_file, results_header
from ledgerlab.metrics import where_written
from ledgerlab.metrics_json import read_metrics, write_json

FIVE_SEEDS = "docs/results/lab-seeds.md"
LAB_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config", "lab.py")


def decoded(m):
    """The summary of the stream a run's head reads."""
    return m["streams"][m["decoded_stream"]]


def fmt(value, spec=".3f"):
    return "—" if value is None else format(value, spec)


def significant(x, digits=3):
    """x to `digits` significant digits, in plain notation: the gates span 0.3 to 0.0003 across λ,
    the concentrations 1 to 10^5, and a fixed number of decimals shows one end of them as 0."""
    x = float(f"{x:.{digits}g}")   # round first, so that 99.95 reads 100, not 100.0
    if x == 0 or abs(x) >= 10 ** (digits - 1):
        return f"{x:.0f}"
    return f"{x:.{digits - 1 - math.floor(math.log10(abs(x)))}f}"


def markdown_table(head, rows):
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(row) + " |" for row in rows])


def spread(values):
    """mean, min and max of the values that apply (None: a number a run does not have)."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    return {"mean": float(np.mean(values)), "min": min(values), "max": max(values), "n": len(values)}


# ----------------------------------------------------------------------------------------------
# Across seeds: which runs are one experiment, and the lab's verdicts over them

def trained_as(m):
    """What tells runs of one arm apart, seed aside: 'ledger', 'ledger, commit sparsity 0',
    'vanilla + sgd', 'vanilla, no position-0 loss'. Runs that share it are seeds of one experiment."""
    arch = m["arch"]
    label = arm_name(arch, m.get("attention", "softmax"))
    sparsity = m["model_config"].get("commit_sparsity")
    if sparsity is not None and sparsity != GPTConfig(arch=arch).commit_sparsity:   # None: the arm's default
        label += f", commit sparsity {sparsity:g}"
    if m.get("optimizer", "adamw") != "adamw":
        label += f" + {m['optimizer']}"
    if not (m.get("train_config") or {}).get("train_position0", True):
        label += ", no position-0 loss"
    return label


def peak_verdict(m):
    """The top-token verdict at the peak sublayer; a run whose peak is its last sublayer stores it once, as "last"."""
    top = m.get("top_tokens") or {}
    return (top.get("peak") or top.get("last") or {}).get("verdict", "")


# The lab's verdicts, counted over seeds ("k of 5"): a claim one seed can flip is never a verdict.
VERDICTS = {
    "start-token specific": lambda m, s: peak_verdict(m).startswith("start-token specific"),
    ">= 30x and >= 10x": lambda m, s: s["peak_pos0_ratio"] >= 30 and s["start_token_concentration_peak"] >= 10,
    "sink > 0.5": lambda m, s: m["extreme_tokens"]["sink_max"] > 0.5,
    "C carries D's dim": lambda m, s: (m.get("ledger_streams") or {}).get("C_carries_D_dim"),
}

# Settings that say where a run went or how it was watched, not what it learned.
NOT_THE_EXPERIMENT = {"seed", "out_dir", "init_from", "wandb_log", "wandb_project", "wandb_run_name", "log_interval",
                      "eval_interval", "eval_iters", "ckpt_interval", "device", "dtype", "compile", "dry_run"}


def experiments(results, min_runs=2):
    """{label: runs} for every experiment with at least min_runs runs: runs are seeds of one
    experiment when every training and model setting but the seed agrees (a setting that one of the
    checkpoints predates is left out, as it cannot tell them apart). Experiments that trained_as
    cannot tell apart get the settings they differ in, e.g. 'vanilla (data_root=data_t1)'."""
    saved = [set(m.get("train_config") or {}) for m in results]
    shared = (set.intersection(*saved) if saved else set()) - NOT_THE_EXPERIMENT
    groups = {}   # json key -> (the settings it stands for, runs)
    for m in results:
        settings = {"as": trained_as(m),
                    "train": {k: v for k, v in (m.get("train_config") or {}).items() if k in shared},
                    "model": {**dataclasses.asdict(GPTConfig(arch=m["arch"])), **m["model_config"]}}
        key = json.dumps(settings, sort_keys=True, default=str)
        groups.setdefault(key, (settings, []))[1].append(m)
    kept = [(settings, runs) for settings, runs in groups.values() if len(runs) >= min_runs]
    labels = {}
    for settings, runs in kept:
        label = settings["as"]
        twins = [other for other, _ in kept if other is not settings and other["as"] == label]
        if twins:
            label += " (" + ", ".join(f"{k}={v}" for part in ("train", "model") for k, v in sorted(settings[part].items())
                                      if any(t[part].get(k) != v for t in twins)) + ")"
        labels[label] = runs
    return labels


ACROSS_SEEDS = {   # column: value from a run's metrics m and its decoded stream s
    "val loss": lambda m, s: m["measured_val_loss"],
    "pos 0: dom dim / median dim (peak)": lambda m, s: s["peak_pos0_ratio"],
    "start-token conc. (peak)": lambda m, s: s["start_token_concentration_peak"],
    # what the RMSNorm before the head or the next sublayer reads: the footing on which vanilla's h
    # and Ledger's nearly empty C compare (docs/metrics.md)
    "start-token conc., normalised (peak)": lambda m, s: s["normalized"]["start_token_concentration_peak"],
    "start-token conc. (released)": lambda m, s: s["released_definitions"]["start_token_concentration"],
    "residual peak": lambda m, s: s["residual_peak"]["max"],
    "sink max": lambda m, s: m["extreme_tokens"]["sink_max"],
    "Δloss, zero pos-0 dom dim": lambda m, s: (m.get("interventions") or {}).get("zero_delta"),
    "Δloss, mean pos-0 dom dim": lambda m, s: (m.get("interventions") or {}).get("mean_delta"),
}


def across_seeds_table(results):
    """One row per experiment measured more than once (seeds): mean [min, max] of the headline
    numbers, and how many runs meet each verdict, so that a claim about an arm rests on every run
    of it, not on the best one."""
    rows = []
    for arch, runs in experiments(results).items():
        row = [arch, str(len(runs))]
        for get in ACROSS_SEEDS.values():
            s = spread(get(m, decoded(m)) for m in runs)
            largest = max(abs(s["min"]), abs(s["max"])) if s else 0
            spec = ".3f" if largest < 10 else ".1f" if largest < 1000 else ".0f"
            row.append(f"{s['mean']:{spec}} [{s['min']:{spec}}, {s['max']:{spec}}]" if s else "—")
        for verdict in VERDICTS.values():
            held = [verdict(m, decoded(m)) for m in runs]
            row.append("—" if all(h is None for h in held) else f"{sum(bool(h) for h in held)} of {len(runs)}")
        rows.append(row)
    return markdown_table(["arm", "runs", *ACROSS_SEEDS, *VERDICTS], rows) if rows else ""


# ----------------------------------------------------------------------------------------------
# The paper's three claims, asked of the runs measured together: what they show, never more

def rebuilds(c):
    """Claim 1 for one Ledger run c: C has a start-token dimension, by the lab's two verdicts."""
    s = decoded(c)
    specific = VERDICTS["start-token specific"](c, s)
    inherited = VERDICTS["C carries D's dim"](c, s)
    return (specific and VERDICTS[">= 30x and >= 10x"](c, s),
            f"C's dimension {s['dominant_dim']} is {s['peak_pos0_ratio']:.1f}x the median at position 0, "
            f"{'' if specific else 'not '}start-token specific, and {'' if inherited else 'not '}D's dimension")


def smaller_but_more_concentrated(c, h):
    """Claim 2 for a Ledger run c and a vanilla run h of the same seed; the concentration is
    compared normalised, the footing on which a nearly empty C and h compare (docs/metrics.md)."""
    sc, sh = decoded(c), decoded(h)
    smaller = sc["peak_pos0_ratio"] < sh["peak_pos0_ratio"]
    conc_c, conc_h = (s["normalized"]["start_token_concentration_peak"] for s in (sc, sh))
    return (smaller and conc_c > conc_h,
            f"{'' if smaller else 'not '}smaller, {sc['peak_pos0_ratio']:.1f}x at position 0 against vanilla's "
            f"{sh['peak_pos0_ratio']:.1f}x; {'' if conc_c > conc_h else 'not '}more concentrated, "
            f"normalised concentration {conc_c:.1f}x against {conc_h:.1f}x")


def stronger_with_more_sparsity(hs, c):
    """Claim 3 for a ledger-hs run and a ledger run of the same seed."""
    s_hs, s_c = decoded(hs), decoded(c)
    conc_hs, conc_c = (s["normalized"]["start_token_concentration_peak"] for s in (s_hs, s_c))
    return (s_hs["peak_pos0_ratio"] > s_c["peak_pos0_ratio"] and conc_hs > conc_c,
            f"ledger-hs's C is {s_hs['peak_pos0_ratio']:.1f}x the median at position 0 against ledger's "
            f"{s_c['peak_pos0_ratio']:.1f}x, normalised concentration {conc_hs:.1f}x against {conc_c:.1f}x")


CLAIMS = [   # (the paper's claim, the arms it compares, the judge of one seed's runs of them)
    ("C rebuilds the start-token outlier", ("ledger",), rebuilds),
    ("It is smaller, but more concentrated on token 0 than vanilla's h", ("ledger", "vanilla"),
     smaller_but_more_concentrated),
    ("A stronger commit-sparsity penalty makes it stronger (ledger-hs against ledger)", ("ledger-hs", "ledger"),
     stronger_with_more_sparsity),
]


def claims(results):
    """summary.md's opening: a line for each claim whose arms were measured, with this run's numbers
    (several seeds: how many show it), and where the five-seed verdicts are."""
    seeds = {}   # arm -> {seed: metrics}
    for m in results:
        seeds.setdefault(trained_as(m), {})[m.get("train_seed")] = m
    lines = []
    for number, (claim, arms, judge) in enumerate(CLAIMS, 1):
        shared = sorted(set.intersection(*(set(seeds.get(arm, {})) for arm in arms)), key=str)
        found = [judge(*(seeds[arm][seed] for arm in arms)) for seed in shared]
        if len(found) == 1:
            lines.append(f"{number}. {claim}. This run: {'yes' if found[0][0] else 'no'} ({found[0][1]}).")
        elif found:
            lines.append(f"{number}. {claim}. These runs: {sum(holds for holds, _ in found)} of {len(found)} seeds.")
    if not lines:
        return ""
    return ("The paper's claims, asked of these runs (one seed is no verdict: the full lab's verdicts over five "
            f"seeds are in `{FIVE_SEEDS}`):\n\n" + "\n".join(lines))


def short_run(results):
    """A line when runs on the lab's data were trained for fewer steps than config/lab.py's max_iters."""
    lab = read_config_file(LAB_CONFIG)
    steps = sorted({(m.get("train_config") or {}).get("max_iters") for m in results
                    if (m.get("train_config") or {}).get("dataset") == lab["dataset"]} - {None})
    short = [s for s in steps if s < lab["max_iters"]]
    if not short:
        return ""
    return (f"A short run: trained for {', '.join(map(str, short))} steps, where the full lab trains "
            f"{lab['max_iters']} (config/lab.py). The full lab's results over five seeds are in `{FIVE_SEEDS}`.")


# ----------------------------------------------------------------------------------------------
# A real massive activation beside the lab's outliers: the README's table, one row per model

MASSIVE_COLUMNS = ["model", "stream", "dominant dim", "pos 0: dom dim / median dim (peak)",
                   "top \\|x\\| / layer-wide median (peak)", "largest \\|x\\|",
                   "Sun-massive entries, layer-wide median (pos 0)", "sink max", "Δloss, dim zeroed at pos 0",
                   "written at (erased at)"]


def massive_activation_row(m):
    """A measured model's decoded stream on the README's columns. The Δloss is the dimension zeroed at
    position 0 at every block's output for a pretrained model, from the sublayer where it first tops a
    full-norm sublayer on for a checkpoint (interventions, in metrics_json.py)."""
    s = decoded(m)
    iv = m.get("interventions") or {}
    delta = iv.get("zero_every_block_delta", iv.get("zero_delta"))
    where = where_written(s["dominant_mean_abs_pos0_per_sublayer"], m["sublayer_names"])
    name = m.get("label") or m["arch"]
    return [name, m["decoded_stream"], str(s["dominant_dim"]), f"{s['peak_pos0_ratio']:.1f}x",
            f"{s['peak_top1_over_layer_median']:.1f}x", significant(max(s["max_abs_per_sublayer"])),
            f"{s['sun_massive_count_total']} ({s['sun_massive_count_pos0']})",
            f"{m['extreme_tokens']['sink_max']:.2f}", "—" if delta is None else f"{delta:+.3f}",
            f"{where['written_at_name']} ({where['erased_at_name'] or 'never'})"]


def massive_activation_table(results):
    return markdown_table(MASSIVE_COLUMNS, [massive_activation_row(m) for m in results])


def massive_activation_report(out_dirs, path, command=()):
    """For the measured models in out_dirs (measure.py's folders, each with its metrics.json): the
    paper's claims asked of the lab's runs among them, then the table, written to path with its
    provenance and the metrics.json each row comes from. make demo ends on it."""
    results = [read_metrics(d) for d in out_dirs]
    runs = [m for m in results if "model" not in m]   # the lab's checkpoints, not the pretrained model
    answer = "\n\n".join(part for part in (short_run(runs), claims(runs)) if part)
    sources = "\n".join(f"> {m['label']}: {os.path.join(d, 'metrics.json')}" for m, d in zip(results, out_dirs))
    trained = {os.path.basename(m["run_dir"]): m["trained_by"] for m in runs}
    text = (results_header("-m ledgerlab.reports", command, trained) + sources + "\n\n" + (answer + "\n\n" if answer else "")
            + "A massive activation beside the lab's outliers (README, \"What a real massive activation looks "
              "like\"):\n\n" + massive_activation_table(results) + "\n")
    with open(path, "w") as f:
        f.write(text)
    return text


def main(argv=None):
    """python -m ledgerlab.reports OUT_DIR [OUT_DIR ...] --out=FILE.md (make answer): massive_activation_report."""
    argv = sys.argv[1:] if argv is None else argv
    dirs, out = [a for a in argv if not a.startswith("--")], [a[6:] for a in argv if a.startswith("--out=")]
    missing = [d for d in dirs if not os.path.isfile(os.path.join(d, "metrics.json"))]
    if not dirs or len(out) != 1 or missing or len(dirs) + 1 != len(argv):
        print("error: usage: python -m ledgerlab.reports OUT_DIR [OUT_DIR ...] --out=FILE.md, each OUT_DIR a measure.py folder "
              "with its metrics.json" + (f" ({', '.join(missing)} has none)" if missing else ""), file=sys.stderr)
        return 2
    print(massive_activation_report(dirs, out[0], argv))
    return 0


# ----------------------------------------------------------------------------------------------
# Trajectory: the headline numbers at every kept snapshot of each run (measure.py --trajectory)

def trajectory_row(m):
    """One snapshot's headline numbers, read from its metrics (None where they do not apply)."""
    s = decoded(m)
    iv, ls = m.get("interventions") or {}, m.get("ledger_streams") or {}
    return {
        "iter": m["iter_num"], "val_loss_recorded": m["val_loss_recorded"], "measured_val_loss": m["measured_val_loss"],
        "decoded_stream": m["decoded_stream"], "dominant_dim": s["dominant_dim"],
        "pos0_ratio": s["peak_pos0_ratio"], "concentration": s["start_token_concentration_peak"],
        "concentration_released": s["released_definitions"]["start_token_concentration"],
        "concentration_normalized": s["normalized"]["start_token_concentration_peak"],
        "sink_max": m["extreme_tokens"]["sink_max"], "residual_peak": s["residual_peak"]["max"],
        "zero_delta": iv.get("zero_delta"),
        "commit_gate_per_sublayer": ls.get("commit_gate_per_sublayer"), "commit_gate_mean": ls.get("commit_gate_mean"),
        "C_over_D_norm_final": ls.get("C_over_D_norm_final"), "C_carries_D_dim": ls.get("C_carries_D_dim"),
    }


def trajectory_table(trajectories):
    """One row per snapshot, the runs one after another."""
    def ratio(v):
        return "—" if v is None else f"{v:.1f}x"

    rows = []
    for name, t in trajectories.items():
        for r in t["rows"]:
            gates = r["commit_gate_per_sublayer"]
            rows.append([name, str(r["iter"]), fmt(r["val_loss_recorded"]), f"{r['decoded_stream']} {r['dominant_dim']}",
                         ratio(r["pos0_ratio"]), ratio(r["concentration"]), f"{r['concentration_released']:.2f}x",
                         ratio(r["concentration_normalized"]), fmt(r["sink_max"], ".2f"), ratio(r["residual_peak"]),
                         fmt(r["zero_delta"], "+.3f"), fmt(r["commit_gate_mean"], ".4f"),
                         " ".join(f"{g:.4f}" for g in gates) if gates else "—", fmt(r["C_over_D_norm_final"], ".4f"),
                         "—" if r["C_carries_D_dim"] is None else ("yes" if r["C_carries_D_dim"] else "no")])
    return markdown_table(["run", "iter", "val loss", "decoded, dom dim", "pos 0: dom dim / median dim",
                           "start-token conc.", "conc., released", "conc., normalised", "sink max", "residual peak",
                           "Δloss, dim zeroed at pos 0", "mean commit gate", "commit gate per sublayer", "‖C‖ / ‖D‖ (last)",
                           "C's dom dim is D's"], rows)


def trajectory_report(trajectories, cfg, out_dir, command=()):
    """trajectory.json, trajectory.md (printed too) and trajectory.png in out_dir. trajectories:
    {run name: {"run_dir", "arch", "rows": [trajectory_row], "trained_by"}}; cfg: measure.MeasureConfig."""
    os.makedirs(out_dir, exist_ok=True)
    write_json({"settings": dataclasses.asdict(cfg), "runs": trajectories}, os.path.join(out_dir, "trajectory.json"))
    if cfg.figures:
        figures.plot_trajectory(trajectories, os.path.join(out_dir, "trajectory.png"))
    trained = {name: t["trained_by"] for name, t in trajectories.items()}
    text = (results_header("measure.py", command, trained) + "\n"
            f"# Trajectory: every kept snapshot ({cfg.split} split, {cfg.num_windows} windows, seed {cfg.seed})\n\n"
            f"{trajectory_table(trajectories)}\n\nEach row is what measure.py gives that snapshot on its own "
            f"(its metrics.json: <run>/<snapshot>/ in this folder); decoded stream, at its peak sublayer. Concentration: the dominant "
            f"dim's mean |x| at position 0 over positions 1..T-1 (released: over all positions; normalised: after "
            f"x / rms(x) per token). ‖C‖ / ‖D‖: mean token norms at the last sublayer.\n")
    with open(os.path.join(out_dir, "trajectory.md"), "w") as f:
        f.write(text)
    print(text)


# ----------------------------------------------------------------------------------------------
# The sweep: C's numbers against the commit sparsity lambda, a band over seeds, vanilla's band
# beside them as the reference (lab.py --sweep)

def ledger_value(key):
    return lambda m, s: (m.get("ledger_streams") or {}).get(key)


SWEEP_METRICS = [   # (key, title, value from a run's metrics m and its decoded stream s, log scale, vanilla has it)
    ("pos0_ratio", "ratio at position 0 (dominant dim / median dim)", lambda m, s: s["peak_pos0_ratio"], True, True),
    ("concentration", "start-token concentration", lambda m, s: s["start_token_concentration_peak"], True, True),
    ("concentration_normalized", "start-token concentration, per-token normalised",
     lambda m, s: s["normalized"]["start_token_concentration_peak"], True, True),
    ("carries_D_dim", "C's dominant dim is D's (fraction of seeds)", ledger_value("C_carries_D_dim"), False, False),
    ("zero_delta", "Δ val loss, dominant dim zeroed at position 0",
     lambda m, s: (m.get("interventions") or {}).get("zero_delta"), False, True),
    ("commit_gate", "mean commit gate", ledger_value("commit_gate_mean"), True, False),   # 0.3 to 0.0003 over lambda
    ("norm_pos0", "‖C‖ at position 0, last sublayer",
     lambda m, s: s["mean_norm_pos0_per_sublayer"][-1], True, True),
    ("norm_later", "‖C‖ at positions 1..T-1, last sublayer",
     lambda m, s: s["mean_norm_later_per_sublayer"][-1], True, True),
]


def sweep_summary(metrics):
    """Per lambda (and for vanilla), mean, min and max over seeds of every SWEEP_METRICS number."""
    ledger, vanilla = {}, []
    for m in metrics:
        # the curve and its reference are the arms as trained by default: SGD, another attention kind or a
        # loss without position 0's target is another experiment, not a point of it
        if (m.get("optimizer", "adamw") != "adamw" or m.get("attention", "softmax") != "softmax"
                or not (m.get("train_config") or {}).get("train_position0", True)):
            continue
        if m["decoded_stream"] == "C":
            ledger.setdefault(float(m["model_config"]["commit_sparsity"]), []).append(m)
        elif m["arch"] == "vanilla":
            vanilla.append(m)
    if not ledger:
        raise ConfigError("--sweep draws Ledger's numbers against the commit sparsity, but no Ledger run was measured")

    def summarize(runs, ledger_only=True):
        return {key: spread(get(m, decoded(m)) for m in runs)
                for key, _, get, _, for_vanilla in SWEEP_METRICS if ledger_only or for_vanilla}

    return {"lambdas": sorted(ledger),
            "ledger": {lam: {"runs": [os.path.basename(m["run_dir"]) for m in ledger[lam]], **summarize(ledger[lam])}
                       for lam in sorted(ledger)},
            "vanilla": {"runs": [os.path.basename(m["run_dir"]) for m in vanilla], **summarize(vanilla, False)}
            if vanilla else None}


def sweep_table(summary):
    def cell(key, stats):
        if stats is None:
            return "—"
        if key == "carries_D_dim":
            return f"{round(stats['mean'] * stats['n'])} of {stats['n']}"
        return f"{significant(stats['mean'])} [{significant(stats['min'])}, {significant(stats['max'])}]"

    keys = [key for key, *_ in SWEEP_METRICS]
    rows = [[f"{lam:g}", str(len(s["runs"])), *(cell(k, s[k]) for k in keys)] for lam, s in summary["ledger"].items()]
    if summary["vanilla"]:
        v = summary["vanilla"]
        rows.append(["vanilla (h)", str(len(v["runs"])), *(cell(k, v.get(k)) for k in keys)])
    return markdown_table(["commit sparsity λ", "runs", *(title for _, title, *_ in SWEEP_METRICS)], rows)


def sweep_report(metrics, out_dir, command=()):
    """sweep.json, sweep.md (printed too) and sweep.png from the measured runs' metrics.json."""
    summary = sweep_summary(metrics)
    os.makedirs(out_dir, exist_ok=True)
    write_json(summary, os.path.join(out_dir, "sweep.json"))
    figures.plot_sweep(summary, SWEEP_METRICS, os.path.join(out_dir, "sweep.png"))
    trained = {os.path.basename(m["run_dir"]): m.get("trained_by", []) for m in metrics}
    text = (results_header("lab.py", command, trained)
            + "\n# The commit-sparsity dose-response: Ledger's decoded stream C against λ\n\n"
            + sweep_table(summary)
            + "\n\nEach cell: mean [min, max] over seeds, at matched loss (summary.md beside this file says which "
              "checkpoints). Ratio and concentration at the decoded stream's peak sublayer; the norms are mean token "
              "norms at the last sublayer, the one the head decodes. The vanilla row is the reference band.\n")
    with open(os.path.join(out_dir, "sweep.md"), "w") as f:
        f.write(text)
    print(text)
    return summary


if __name__ == "__main__":
    sys.exit(main())
