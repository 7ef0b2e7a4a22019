"""
Measure the residual-stream structure of trained checkpoints: where the outlier dimension lives,
how big it is, whether it sits on the start token, and whether the model needs it.

    python measure.py CKPT_OR_RUN_DIR [more ...] [--key=value ...]

Trained transformers grow "massive activations" (Sun et al. 2024): a few fixed hidden dimensions
of the residual stream, 100-1000x the median magnitude, concentrated on the first token. The paper
asks whether they survive when the residual is split into an erasable scratch stream D and an
append-only commitment stream C that alone is decoded (Ledger). This script measures, for every
sublayer output and every stream, the statistics the paper reports, and makes it hard to overclaim:
small CPU models grow only the precursor (one fixed dimension ~20x the median, shared by position 0
and by delimiters), so the report counts massive entries by Sun et al.'s own rule and says on which
tokens the dominant dimension is large outside position 0.

Outputs, per checkpoint: <out_dir>/metrics.json and PNG figures; for all inputs together:
summary.md (printed too), plus a comparison figure when several checkpoints are given.

Every attention kind (ledger.ATTENTIONS) is measured in its own terms: the weight on attn_bias's
explicit sink apart from position 0's, sigmoid's unnormalised weights against their own no-sink
level, gated attention's output gate at position 0 and elsewhere (metrics.py, "Extreme-token
phenomena").

With --trajectory, every kept snapshot of each run directory is measured the same way, and one
figure and one table give the headline numbers against training step, every run side by side.

What each number means, and the running sums it comes from, is in metrics.py, which reads as a
short tutorial; this file runs those passes over checkpoints and writes the report. Read top to
bottom: config, loading (checkpoints, data windows), figures, report, main, trajectories.
"""
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

import rundir
from cli import ConfigError, help_text, parse_overrides, results_header, wants_help
from ledger import ARCHS, GPT, GPTConfig, arm_name
from metrics import (NORM_FRACTION, SUN_ABS, SUN_REL, collect_dominant_profiles, collect_extreme_tokens,
                     collect_stream_stats, ledger_stream_report, run_interventions, run_quantization,
                     top_token_report)


# ----------------------------------------------------------------------------------------------
# Config

@dataclass
class MeasureConfig:
    num_windows: int = 64             # validation windows measured (the same for every pass)
    batch_size: int = 16              # windows per forward pass
    seq_len: int = 0                  # tokens per window; 0 = the checkpoint's block_size
    seed: int = 0                     # seeds the window offsets and the control dimension
    split: str = "val"                # the split of the dataset the windows come from
    out_dir: str = ""                 # "" = <run_dir>/measure (several inputs: summary in out/measure)
    match_loss: Optional[Union[float, str]] = None  # per run dir, the kept checkpoint with val loss closest to this;
                                        # "auto": the lowest val loss that every given run reached
    dataset: str = ""                 # "" = the dataset recorded in the checkpoint
    data_root: str = ""               # "" = the data_root recorded in the checkpoint
    device: str = "cpu"               # cpu, cuda, or auto
    threads: int = 0                  # CPU threads for torch; 0 = torch's default (1 helps on a busy box)
    interventions: bool = True        # val loss with the dominant dim at position 0 zeroed / set to its mean
    quantization: bool = True         # val loss after weight-only 8- and 4-bit round-to-nearest
    figures: bool = True              # write the PNG figures
    trajectory: bool = False          # measure every kept snapshot of each run dir (no per-snapshot figures):
                                        # the headline numbers against step in trajectory.png, .md and .json
    align_windows: Optional[bool] = None  # windows open on a start token (<bos>, else EOT); None: as trained
    top_tokens: int = 8               # tokens listed where the dominant dim is largest off position 0
    min_token_count: int = 5          # ... among tokens seen at least this often

    # Checked by parse_overrides as each setting is read: one line, before anything is loaded
    LIMITS = {"num_windows": ">= 1", "batch_size": ">= 1", "seq_len": ">= 0", "threads": ">= 0",
              "top_tokens": ">= 1", "min_token_count": ">= 1", "split": ("train", "val")}


class MeasureError(Exception):
    """A bad input: reported as one line `error: ...` and exit status 2, never a traceback."""


def parse_args(argv):
    """Split argv into input paths and a MeasureConfig from `--key=value` flags (train.py's parser)."""
    paths = [a for a in argv if not a.startswith("--")]
    try:
        (settings,) = parse_overrides([a for a in argv if a.startswith("--")], MeasureConfig)
    except ConfigError as e:
        raise MeasureError(str(e)) from None
    cfg = MeasureConfig(**settings)
    if isinstance(cfg.match_loss, str) and cfg.match_loss != "auto":
        raise MeasureError(f"--match_loss={cfg.match_loss}: expected a val loss or 'auto'")
    if not paths:
        raise MeasureError("give at least one checkpoint file or run directory to measure")
    return paths, cfg


# ----------------------------------------------------------------------------------------------
# Loading: checkpoints, the matched-loss choice, the model, the data windows

def load_checkpoint(path):
    try:
        return rundir.load_checkpoint(path)
    except ConfigError as e:
        raise MeasureError(str(e)) from None


def checkpoint_names(run_dir):
    names = sorted(n for n in os.listdir(run_dir) if n.startswith("ckpt") and n.endswith(".pt"))
    if not names:
        raise MeasureError(f"no checkpoint in {run_dir} (expected ckpt.pt or ckpt_<iter>.pt)")
    return names


def recorded_val_losses(run_dir):
    """{path: val_loss} of the kept checkpoints of a run that record one."""
    losses = {os.path.join(run_dir, n): load_checkpoint(os.path.join(run_dir, n)).get("val_loss")
              for n in checkpoint_names(run_dir)}
    losses = {p: v for p, v in losses.items() if v is not None}
    if not losses:
        raise MeasureError(f"no checkpoint in {run_dir} records a val_loss, so --match_loss cannot pick one")
    return losses


def auto_match_loss(run_dirs):
    """The lowest val loss that every run reached: the best matched point all arms share."""
    if not run_dirs:
        raise MeasureError("--match_loss=auto picks among the kept checkpoints of run directories; give some")
    return max(min(recorded_val_losses(d).values()) for d in run_dirs)


def select_checkpoint(run_dir, match_loss=None):
    """(path, val_loss, distance): the latest checkpoint, or the kept one whose recorded val loss is
    closest to match_loss. Comparing arms at matched loss rather than matched steps keeps a faster
    learner from looking different merely because it is further along."""
    names = checkpoint_names(run_dir)
    if match_loss is None:
        path = os.path.join(run_dir, "ckpt.pt" if "ckpt.pt" in names else names[-1])
        return path, load_checkpoint(path).get("val_loss"), None
    losses = recorded_val_losses(run_dir)
    path = min(losses, key=lambda p: abs(losses[p] - match_loss))   # ties: the earlier file name
    return path, losses[path], abs(losses[path] - match_loss)


def build_model(ckpt, path, device):
    try:
        return rundir.build_model(ckpt, path, device)
    except ConfigError as e:
        raise MeasureError(str(e)) from None


@dataclass
class Data:
    tokens: np.ndarray     # the split, as a flat memmap
    meta: dict
    decode: object         # list[int] -> str
    data_dir: str


def open_data(ckpt, cfg, path):
    """The split of the dataset the checkpoint was trained on (or --dataset / --data_root)."""
    import prepare_data   # imported here so that `measure.py --help` and bad flags stay fast
    train_cfg = ckpt.get("train_config") or {}
    dataset = cfg.dataset or train_cfg.get("dataset")
    data_root = cfg.data_root or train_cfg.get("data_root") or "data"
    if not dataset:
        raise MeasureError(f"{path} records no dataset; pass --dataset=NAME")
    data_dir = os.path.join(data_root, dataset)
    try:
        meta = prepare_data.load_meta(data_dir)
        tokens = prepare_data.open_split(data_dir, cfg.split, meta)
        decode = prepare_data.decoder(meta)
    except prepare_data.DataError as e:
        raise MeasureError(str(e)) from None
    n_vocab, data_vocab = ckpt["model_config"]["vocab_size"], meta.get("vocab_size", 0)
    trained = ckpt.get("dataset_meta") or {}
    # A model trained on other tokens measures nonsense: same size, tokenizer and (char) alphabet.
    differs = any(k in trained and trained[k] != meta.get(k) for k in ("vocab_size", "tokenizer", "itos"))
    if data_vocab > n_vocab or differs:
        raise MeasureError(f"vocab mismatch: {path} was trained with vocab {trained.get('vocab_size', n_vocab)} "
                           f"({trained.get('tokenizer', '?')}) but {data_dir} has vocab {data_vocab} "
                           f"({meta.get('tokenizer', '?')}); pass the right --dataset")
    return Data(tokens, meta, decode, data_dir)


def window_starts(data, cfg, seq_len, align):
    """Deterministic window offsets, placed as in training. Unaligned (nanoGPT style), a window
    starts anywhere, so position 0 is an arbitrary token: the paper's setup for its small text
    models. Aligned, every window opens on a start token (<bos>, else the EOT before a document)."""
    import prepare_data
    span, n = seq_len + 1, len(data.tokens)
    if n < span:
        raise MeasureError(f"{data.data_dir} {cfg.split} split has {n} tokens, fewer than seq_len+1={span}; "
                           f"pass --seq_len={n - 1} or less")
    gen = torch.Generator().manual_seed(cfg.seed)
    if not align:
        return torch.randint(0, n - span + 1, (cfg.num_windows,), generator=gen)
    try:
        starts = prepare_data.sequence_starts(data.tokens, data.meta, span)
    except prepare_data.DataError as e:
        raise MeasureError(f"{data.data_dir}: {e}; measure with --align_windows=False") from None
    if len(starts) == 0:
        raise MeasureError(f"no start token in {data.data_dir} {cfg.split} leaves room for a window of {span} tokens")
    pick = torch.randint(0, len(starts), (cfg.num_windows,), generator=gen)
    return torch.from_numpy(starts.astype(np.int64))[pick]


def batches(data, starts, seq_len, batch_size, device):
    """Yield (x, y) batches; only one batch of tokens is ever held in memory."""
    for i in range(0, len(starts), batch_size):
        rows = [np.asarray(data.tokens[s:s + seq_len + 1], dtype=np.int64)
                for s in starts[i:i + batch_size].tolist()]
        w = torch.from_numpy(np.stack(rows)).to(device)
        yield w[:, :-1], w[:, 1:]


# ----------------------------------------------------------------------------------------------
# Figures

def slug(name):
    return name.replace("+", "_plus_")


def readable_log_axis(ax):
    """Within one decade matplotlib labels a log axis '1.9 x 10^0'; plain numbers read better."""
    from matplotlib.ticker import FuncFormatter
    low, high = ax.get_ylim()
    if low > 0 and high / low < 10:
        for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))


def plot_stream(name, stats, profile, sublayer_names, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    def log_norm(a):
        positive = a[a > 0]
        low = positive.min() if positive.size else 1e-8
        return LogNorm(vmin=max(low, a.max() * 1e-6), vmax=max(a.max(), low * 10))

    paths, L = [], len(sublayer_names)
    ticks = dict(ticks=range(L), labels=sublayer_names)

    def save(fig, suffix):
        paths.append(os.path.join(out_dir, f"{slug(name)}_{suffix}.png"))
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(13, 0.35 * L + 2.5), sharey=True)
    for ax, data, title in zip(axes, (stats.mean_abs(), stats.mean_abs_pos0()), ("all positions", "position 0")):
        im = ax.imshow(data, aspect="auto", interpolation="nearest", norm=log_norm(data), cmap="viridis")
        ax.set(title=f"stream {name}: mean |x|, {title}", xlabel="hidden dimension")
        fig.colorbar(im, ax=ax, label="mean |x| (log)")
    axes[0].set_yticks(**ticks)
    axes[0].set_ylabel("sublayer output")
    save(fig, "dims")

    data = profile.position_mean()
    fig, ax = plt.subplots(figsize=(10, 0.35 * L + 2.5))
    im = ax.imshow(data, aspect="auto", interpolation="nearest", norm=log_norm(data), cmap="magma")
    ax.set(title=f"stream {name}: |x| of dominant dim {profile.dim} by position", xlabel="position in window")
    ax.set_yticks(**ticks)
    ax.set_ylabel("sublayer output")
    fig.colorbar(im, ax=ax, label="mean |x| (log)")
    save(fig, "dominant_positions")

    s = stats.summarize(sublayer_names)
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * L + 3), 4))
    for key, label in (("top1", "top-1"), ("top2", "top-2"), ("top3", "top-3"), ("median", "median")):
        ax.plot(range(L), s[f"{key}_per_sublayer"], marker="o", label=f"{label} |x|")
    ax.set_yscale("log")
    readable_log_axis(ax)
    ax.set_xticks(**ticks)
    ax.tick_params(axis="x", rotation=60)
    ax.set(title=f"stream {name}: per-token magnitudes (Sun et al. profile)", ylabel="mean over tokens",
           xlabel="sublayer output")
    ax.legend()
    save(fig, "profile")
    return paths


def plot_extreme_tokens(extreme, summaries, sublayer_names, decoded, out_dir):
    """Guo et al.'s three extreme-token phenomena side by side: which heads sink onto position 0,
    whether the values they land on are drained, and how large position 0's residual state grows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    sink, drain = np.array(extreme["sink_per_layer_head"]), np.array(extreme["value_drain_per_layer_head"])
    n_layer, L = sink.shape[0], len(sublayer_names)
    # log colours centred on 1 (white): blue heads are drained, red ones carry a large value at position 0
    spread = max(drain.max(), 1 / max(drain.min(), 1e-6), 2.0)
    fig, axes = plt.subplots(1, 3, figsize=(17, 0.3 * max(n_layer, L / 2) + 3.5),
                             gridspec_kw={"width_ratios": [1, 1, 1.6]})
    for ax, data, title, scale in (
            (axes[0], sink, f"attention sink: weight on position 0\n({no_sink_level(extreme)}: "
                            f"{extreme['sink_uniform_baseline']:.3f})", dict(vmin=0, vmax=1, cmap="viridis")),
            (axes[1], drain, "value drain: |v| at position 0 / mean |v| later",
             dict(norm=LogNorm(1 / spread, spread), cmap="coolwarm"))):
        im = ax.imshow(data, aspect="auto", interpolation="nearest", **scale)
        ax.set(title=title, xlabel="head", ylabel="layer", xticks=range(data.shape[1]), yticks=range(n_layer))
        readable_log_axis(fig.colorbar(im, ax=ax).ax)
    ax = axes[2]
    for name, s in summaries.items():
        peak = np.array(s["residual_peak"]["per_sublayer"])
        line, = ax.plot(range(L), peak, marker="o", label=f"stream {name}" + (" (decoded)" if name == decoded else ""))
        skipped = np.flatnonzero(~np.array(s["eligible_per_sublayer"]))
        ax.plot(skipped, peak[skipped], "o", color="white", markeredgecolor=line.get_color())
    ax.axhline(1.0, color="grey", linestyle=":")
    ax.set_yscale("log")
    readable_log_axis(ax)
    ax.set_xticks(range(L), sublayer_names, rotation=60)
    ax.set(title=f"residual-state peak: |x| at position 0 / mean |x| later\n(hollow: stream norm under "
                 f"{NORM_FRACTION:.0%} of the final, skipped by the table's max)", xlabel="sublayer output")
    ax.legend(fontsize=8)
    path = os.path.join(out_dir, "extreme_tokens.png")
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)
    return path


def plot_comparison(results, path):
    """The decoded channel of every arm against relative depth (arms may differ in depth)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in results:
        s = m["streams"][m["decoded_stream"]]
        L = len(s["ratio_per_sublayer"])
        depth = [(i + 1) / L for i in range(L)]
        label = f"{m['label']} ({m['decoded_stream']})"
        axes[0].plot(depth, s["ratio_per_sublayer"], marker="o", label=label)
        top_over_median = np.array(s["top1_per_sublayer"]) / np.maximum(s["median_per_sublayer"], 1e-30)
        axes[1].plot(depth, top_over_median, marker="o", label=label)
    axes[0].set(title="decoded channel: top dim / median dim of mean |x|", ylabel="fixed-dimension ratio")
    axes[1].set(title="decoded channel: mean top-1 |x| / mean median |x| of a token", ylabel="ratio")
    for ax in axes:
        ax.set_yscale("log")
        readable_log_axis(ax)
        ax.set_xlabel("relative depth (sublayer / number of sublayers)")
        ax.legend(fontsize=8)
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Report

def jsonable(obj):
    """Plain JSON: non-finite floats become null, numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def fmt(value, spec=".3f"):
    return "—" if value is None else format(value, spec)


def head_name(layer_head):
    return "L{}H{}".format(*layer_head)


def markdown_table(head, rows):
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(row) + " |" for row in rows])


def summary_table(results):
    """Four tables: the outlier's structure in the decoded channel, whether the model needs it,
    Guo et al.'s extreme-token phenomena, and the released code's definitions beside this repo's."""
    structure, function, extreme, definitions = [], [], [], []
    for m in results:
        s = m["streams"][m["decoded_stream"]]
        d = m["streams"].get("D") if m["decoded_stream"] == "C" else None
        iv, q = m.get("interventions") or {}, m.get("quantization") or {}
        structure.append([
            m["label"], str(m["iter_num"]), fmt(m["measured_val_loss"]), m["decoded_stream"],
            str(s["dominant_dim"]), fmt(s["persistence"], ".2f"),
            f"{s['peak_ratio']:.1f}x ({s['peak_sublayer_name']})", f"{s['final_ratio']:.1f}x",
            f"{s['peak_pos0_ratio']:.1f}x", f"{s['start_token_concentration_peak']:.1f}x",
            fmt(s["kurtosis_final"], ".1f"), str(s["sun_massive_count_total"]),
            f"{d['dominant_dim']}, {d['peak_ratio']:.1f}x" if d else "—"])
        function.append([m["label"], fmt(m["measured_val_loss"]), fmt(iv.get("zero_loss")),
                         fmt(iv.get("mean_loss")), fmt(iv.get("control_zero_loss")),
                         fmt(q.get("w8_loss")), fmt(q.get("w4_loss"))])
        e, peak = m["extreme_tokens"], s["residual_peak"]
        extreme.append([m["label"], f"{e['sink_max']:.2f} ({head_name(e['sink_max_layer_head'])})",
                        f"{e['sink_uniform_baseline']:.2f}",
                        f"{e['value_drain_min']:.2f} ({head_name(e['value_drain_min_layer_head'])})",
                        f"{peak['max']:.1f}x ({peak['max_sublayer_name']})", f"{peak['final']:.1f}x",
                        f"{d['residual_peak']['max']:.1f}x" if d else "—", attention_cell(e)])
        r = s["released_definitions"]
        definitions.append([m["label"], m["decoded_stream"],
                            f"{r['peak_ratio']:.1f}x ({r['peak_sublayer_name']})",
                            f"{s['peak_ratio']:.1f}x ({s['peak_sublayer_name']})",
                            f"{r['start_token_concentration']:.2f}x ({r['concentration_sublayer_name']})",
                            f"{s['start_token_concentration_peak']:.1f}x ({s['peak_sublayer_name']})",
                            fmt(r["kurtosis_max"], ".1f"), fmt(s["kurtosis_final"], ".1f")])
    return (markdown_table(["arm", "iter", "val loss", "decoded", "dom dim", "persistence",
                            "peak ratio (sublayer)", "final ratio", "pos-0 ratio (peak)",
                            "start-token conc. (peak)", "kurtosis (final)", "Sun-massive entries",
                            "scratch D: dom dim, peak ratio"], structure)
            + "\n\n" + markdown_table(["arm", "val loss", "zero pos-0 dom dim", "mean pos-0 dom dim",
                                        "zero pos-0 control dim", "w8", "w4"], function)
            + "\n\n" + markdown_table(["arm", "sink max (head)", "sink if uniform", "value drain min (head)",
                                        "residual peak (sublayer)", "residual peak final",
                                        "scratch D: residual peak", "attention: its own no-op"], extreme)
            + "\n\nExtreme tokens (Guo et al. 2024): sink is the mean attention weight that queries 1..T-1 "
              "put on position 0 (uniform attention: the next column); value drain is |v| at position 0 over "
              "the mean |v| at positions >= 1 (< 1: drained); residual peak is the decoded stream's L2 norm at "
              "position 0 over the mean norm at positions >= 1, which grows even when no dimension stands out."
            + "".join(" " + ATTENTION_NOTES[kind] for kind in ATTENTION_NOTES
                      if any(m["extreme_tokens"].get("attention", "softmax") == kind for m in results))
            + "\n\nThe released code's definitions (its probe.py, analyze.py) beside this repo's, decoded stream:\n\n"
            + markdown_table(["arm", "decoded", "peak ratio, released: max over all sublayers",
                              "peak ratio, here: sublayers >= 25% of the final norm",
                              "start-token conc., released: pos 0 / all positions, where the dim peaks",
                              "start-token conc., here: pos 0 / positions >= 1, at the peak",
                              "kurtosis, released: max", "kurtosis, here: final"], definitions)
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


def no_sink_level(e):
    """What the baseline beside a sink weight is, for this attention kind."""
    return {"attn_bias": "uniform over k' and positions",
            "sigmoid": f"sigmoid, unnormalised; no-sink level of {head_name(e['sink_max_layer_head'])}"}.get(
        e.get("attention", "softmax"), "uniform attention")


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
    and which of them compare one stream with another (metrics.StreamStats.summarize_normalized)."""
    rows = []
    for m in results:
        s = m["streams"][m["decoded_stream"]]
        u = s["normalized"]
        rows.append([m["label"], m["decoded_stream"], f"{s['peak_pos0_ratio']:.1f}x", f"{u['peak_pos0_ratio']:.1f}x",
                     f"{s['start_token_concentration_peak']:.1f}x", f"{u['start_token_concentration_peak']:.1f}x",
                     f"{s['residual_peak']['max']:.1f}x", f"{u['residual_peak']['max']:.2f}x"])
    return ("Raw and per-token normalised (x / rms(x): what the RMSNorm before the head reads), decoded stream:\n\n"
            + markdown_table(["arm", "decoded", "pos-0 ratio", "pos-0 ratio, normalised", "start-token conc.",
                              "start-token conc., normalised", "residual peak", "residual peak, normalised"], rows)
            + "\n\nThe pos-0 ratio divides two dimensions of one token, so vanilla's h and Ledger's C compare on it "
              "raw; the concentration and the residual peak divide position 0 by later tokens, so compare them "
              "normalised: raw, C's are large whenever C holds little outside position 0, which nothing but the "
              "final norm reads while lam stays near 0, so the loss hardly constrains it.")


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
                      "eval_interval", "eval_iters", "ckpt_interval", "device", "dtype", "compile"}


def experiments(results, min_runs=2):
    """{label: runs} for every experiment with at least min_runs runs: runs are seeds of one
    experiment when every training and model setting but the seed agrees (a setting a checkpoint
    predates counts as its default, as resume reads it). Experiments that trained_as cannot tell
    apart get the settings they differ in, e.g. 'vanilla (data_root=data_t1)'."""
    train_defaults = dataclasses.asdict(rundir.TrainConfig())
    groups = {}   # json key -> (the settings it stands for, runs)
    for m in results:
        settings = {"as": trained_as(m),
                    "train": {k: v for k, v in {**train_defaults, **(m.get("train_config") or {})}.items()
                              if k not in NOT_THE_EXPERIMENT},
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


def across_seeds_table(results):
    """One row per experiment measured more than once (seeds): mean [min, max] of the headline
    numbers, and how many runs meet each verdict, so that a claim about an arm rests on every run
    of it, not on the best one."""
    by_arch = experiments(results)
    columns = {
        "val loss": lambda m, s: m["measured_val_loss"],
        "pos-0 ratio (peak)": lambda m, s: s["peak_pos0_ratio"],
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
    rows = []
    for arch, runs in by_arch.items():
        row = [arch, str(len(runs))]
        for get in columns.values():
            values = [get(m, m["streams"][m["decoded_stream"]]) for m in runs]
            values = [v for v in values if v is not None]
            largest = max(map(abs, values), default=0)
            spec = ".3f" if largest < 10 else ".1f" if largest < 1000 else ".0f"
            row.append(f"{np.mean(values):{spec}} [{min(values):{spec}}, {max(values):{spec}}]" if values else "—")
        for verdict in VERDICTS.values():
            held = [verdict(m, m["streams"][m["decoded_stream"]]) for m in runs]
            row.append("—" if all(h is None for h in held) else f"{sum(bool(h) for h in held)} of {len(runs)}")
        rows.append(row)
    return markdown_table(["arm", "runs", *columns, *VERDICTS], rows) if rows else ""


def notes(m):
    """Honest one-liners under the table: what the numbers do and do not show."""
    s = m["streams"][m["decoded_stream"]]
    lines, label, dim, ratio = [], m["label"], s["dominant_dim"], s["peak_ratio"]
    pos0, conc = s["peak_pos0_ratio"], s["start_token_concentration_peak"]
    if s["sun_massive_count_total"] == 0:
        # A start-token outlier is diluted T-fold in the all-position ratio: judge it at position 0.
        if pos0 >= 10 and conc >= 10:
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
        lines.append(f"{label}: no massive activations by Sun et al.'s rule in {m['decoded_stream']} "
                     f"(largest |x| {max(s['max_abs_per_sublayer']):.1f}); {shape}.")
    else:
        lines.append(f"{label}: {s['sun_massive_count_total']} massive entries by Sun et al.'s rule "
                     f"({s['sun_massive_count_pos0']} at position 0).")
    e, peak = m["extreme_tokens"], s["residual_peak"]
    if peak["final"] >= 10:
        lines.append(f"{label}: {m['decoded_stream']} is {peak['final']:.0f}x larger at position 0 than at later "
                     f"positions, where it holds little: that alone makes any dimension's start-token "
                     f"concentration large, so read the concentration with it.")
    n_heads, kind = np.size(e["sink_per_layer_head"]), e.get("attention", "softmax")
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
    lines.append(f"{label}: {sink}; position 0's residual norm in {m['decoded_stream']} peaks at "
                 f"{peak['max']:.1f}x that of later positions ({peak['max_sublayer_name']}).")
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
    shift = (m.get("ledger_streams") or {}).get("loss_change_commit_logits_shifted")
    if shift:
        ls = m["ledger_streams"]
        lines.append(f"{label}: mean commit gate {ls['commit_gate_mean']:.4f}, ‖C‖ / ‖D‖ {ls['C_over_D_norm_final']:.3f}; "
                     f"every commit logit shifted by -2 changes the val loss by {shift['-2']:+.4f}, by +2 by "
                     f"{shift['+2']:+.4f} (small gates scale C by ~e^shift, which the final RMSNorm divides out).")
    if m["selection"]["distance"] is not None:
        lines.append(f"{label}: iter {m['iter_num']} picked to match val loss {m['selection']['match_loss']:.4f}: "
                     f"recorded {m['val_loss_recorded']:.4f}, {m['selection']['distance']:.4f} away.")
    for where, report in (m.get("top_tokens") or {}).items():
        shown = ", ".join(f"{t['text']} {t['ratio_to_pos0']:.2f}x" for t in report["tokens"][:5])
        lines.append(f"{label}: dim {report['dim']} at {report['sublayer_name']} ({where} sublayer): "
                     f"{report['verdict']}; largest off position 0: {shown} (of position 0's mean |x|).")
    return lines


# ----------------------------------------------------------------------------------------------
# Main

def default_out_dir(ckpt_path, from_run_dir):
    parent = os.path.dirname(os.path.abspath(ckpt_path))
    if from_run_dir or os.path.basename(ckpt_path) == "ckpt.pt":
        return os.path.join(parent, "measure")
    return os.path.join(parent, "measure_" + os.path.splitext(os.path.basename(ckpt_path))[0])


def measure_checkpoint(path, ckpt, cfg, out_dir, selection):
    t0 = time.time()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MeasureError(f"--device={cfg.device} but torch sees no CUDA device; use --device=cpu")
    model = build_model(ckpt, path, device)
    data = open_data(ckpt, cfg, path)
    seq_len = cfg.seq_len or model.config.block_size   # never shortened behind the user's back
    align = cfg.align_windows
    if align is None:   # as trained; checkpoints from before the setting existed were unaligned
        align = bool((ckpt.get("train_config") or {}).get("align_windows"))
    starts = window_starts(data, cfg, seq_len, align)
    batch_fn = lambda: batches(data, starts, seq_len, cfg.batch_size, device)
    names, decoded = model.sublayer_names, model.config.decoded_stream

    phases, tick = {}, time.time()

    def lap(name):   # wall time per phase, reported in metrics.json
        nonlocal tick
        phases[name], tick = time.time() - tick, time.time()

    with collect_extreme_tokens(model) as extreme:   # rides along pass 1: no extra forward
        stats, baseline = collect_stream_stats(model, batch_fn)
    lap("statistics_s")
    summaries = {name: s.summarize(names) for name, s in stats.items()}
    extreme_tokens = extreme.summarize()
    last, peak = len(names) - 1, summaries[decoded]["peak_sublayer"]
    profiles = collect_dominant_profiles(model, batch_fn, stats, seq_len, sorted({last, peak}))
    def report(i):
        return top_token_report(profiles[decoded], stats[decoded], i, names[i], data.decode, cfg.top_tokens,
                                cfg.min_token_count)
    top_tokens = {"last": report(last)}   # a peak at the last sublayer is reported once, as "last"
    if peak != last:
        top_tokens["peak"] = report(peak)
    lap("dominant_profile_s")
    interventions = None
    if cfg.interventions:
        interventions = run_interventions(model, batch_fn, stats, summaries[decoded], baseline, cfg.seed)
    lap("interventions_s")
    quantization = run_quantization(model, batch_fn, baseline) if cfg.quantization else None
    lap("quantization_s")
    ledger_streams = (ledger_stream_report(model, batch_fn, summaries, baseline)
                      if model.config.residual == "ledger" else None)
    lap("ledger_streams_s")

    os.makedirs(out_dir, exist_ok=True)
    figures = []
    if cfg.figures:
        for name in stats:
            figures += plot_stream(name, stats[name], profiles[name], names, out_dir)
        figures.append(plot_extreme_tokens(extreme_tokens, summaries, names, decoded, out_dir))
    lap("figures_s")
    seconds = time.time() - t0
    n_tokens = len(starts) * seq_len
    train_cfg = ckpt.get("train_config") or {}
    metrics = {
        "checkpoint": os.path.abspath(path), "format": ckpt["format"], "arch": model.config.arch,
        "attention": model.config.attention,
        "run_dir": os.path.dirname(os.path.abspath(path)),
        "iter_num": ckpt.get("iter_num"), "val_loss_recorded": ckpt.get("val_loss"), "selection": selection,
        "dataset": os.path.basename(data.data_dir), "data_dir": data.data_dir,
        "train_seed": train_cfg.get("seed"), "optimizer": train_cfg.get("optimizer", "adamw"),
        "trained_by": ckpt.get("trained_by", []),
        "train_config": train_cfg,
        "settings": {**dataclasses.asdict(cfg), "seq_len": seq_len, "device": device, "align_windows": align},
        "model_config": ckpt["model_config"], "sublayer_names": names,
        "measured_val_loss": baseline, "decoded_stream": decoded, "streams": summaries,
        "top_tokens": top_tokens, "extreme_tokens": extreme_tokens,
        "interventions": interventions, "quantization": quantization,
        "ledger_streams": ledger_streams,
        "sun_rule": f"|x| > {SUN_ABS:g} and |x| >= {SUN_REL:g} x the token's median |x| (Sun et al. 2024)",
        "figures": [os.path.basename(f) for f in figures],
        "timing": {"tokens": n_tokens, "seconds": seconds, "tokens_per_s": n_tokens / max(seconds, 1e-9),
                   **phases},
    }
    return metrics


def run(paths, cfg, command=()):
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    target = cfg.match_loss
    if target == "auto":
        target = auto_match_loss([p for p in paths if os.path.isdir(p)])
        print(f"--match_loss=auto: {target:.4f}, the lowest val loss every run reached")
    inputs = []   # resolve and load every input first, so that a bad one fails before any work
    for path in paths:
        if os.path.isdir(path):
            ckpt_path, _, distance = select_checkpoint(path, target)
            selection = {"checkpoint": "final" if target is None else "matched_loss", "match_loss": target,
                         "auto": cfg.match_loss == "auto", "distance": distance}
        elif os.path.isfile(path):
            ckpt_path, selection = path, {"checkpoint": "as_given", "match_loss": None, "distance": None}
        else:
            raise MeasureError(f"{path}: no such checkpoint file or run directory")
        ckpt = load_checkpoint(ckpt_path)
        block = ckpt["model_config"].get("block_size")
        if block is not None and cfg.seq_len > block:
            raise MeasureError(f"--seq_len={cfg.seq_len} exceeds the checkpoint's block_size={block} ({ckpt_path})")
        inputs.append((ckpt_path, ckpt, os.path.isdir(path), selection))
    archs = [arm_name(ckpt["model_config"]["arch"], ckpt["model_config"].get("attention", "softmax"))
             for _, ckpt, _, _ in inputs]
    results, used = [], set()
    for (ckpt_path, ckpt, from_run_dir, selection), arch in zip(inputs, archs):
        run_name = os.path.basename(os.path.dirname(os.path.abspath(ckpt_path))) or "run"
        if cfg.out_dir and len(inputs) > 1:   # one sub-folder per input under --out_dir
            name, k = run_name, 1
            while name in used:
                name, k = f"{run_name}_{k}", k + 1
            used.add(name)
            out_dir = os.path.join(cfg.out_dir, name)
        else:
            out_dir = cfg.out_dir or default_out_dir(ckpt_path, from_run_dir)
        if selection["distance"] is not None:
            print(f"{ckpt_path}: val loss {ckpt['val_loss']:.4f}, {selection['distance']:.4f} "
                  f"from {target:.4f}")
        m = measure_checkpoint(ckpt_path, ckpt, cfg, out_dir, selection)
        # the same arm twice (seeds, matched losses): the run folder tells the rows apart
        m["label"] = f"{arch} ({run_name})" if archs.count(arch) > 1 else arch
        m["out_dir"] = os.path.abspath(out_dir)
        m["notes"] = notes(m)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(jsonable(m), f, indent=1, allow_nan=False)
        print(f"{ckpt_path}: measured {m['timing']['tokens']} tokens in {m['timing']['seconds']:.1f} s "
              f"({m['timing']['tokens_per_s']:.0f} tokens/s) -> {out_dir}")
        results.append(m)
    several_dir = cfg.out_dir or os.path.join("out", "measure")
    summary_dir = results[0]["out_dir"] if len(results) == 1 else several_dir
    os.makedirs(summary_dir, exist_ok=True)
    if len(results) > 1 and cfg.figures:
        plot_comparison(results, os.path.join(summary_dir, "comparison_decoded.png"))
    seeds = across_seeds_table(results)
    windows = ("windows opening on the start token" if results[0]["settings"]["align_windows"]
               else "windows at random offsets")
    trained = {os.path.basename(m["run_dir"]): m["trained_by"] for m in results}
    text = (results_header("measure.py", command, trained) + "\n"
            f"# Residual-stream structure ({cfg.split} split, {cfg.num_windows} {windows} of "
            f"{results[0]['settings']['seq_len']} tokens, seed {cfg.seed})\n\n{checkpoint_choice(results)}\n\n"
            f"{summary_table(results)}\n\n"
            + (f"Across runs of the same arm, mean [min, max], decoded stream:\n\n{seeds}\n\n" if seeds else "")
            + f"{normalized_table(results)}\n\n"
            + f"Ratios are mean |x| of the top dimension over the median dimension (pos-0 ratio: at position 0 "
            f"only); start-token concentration is the dominant dimension's mean |x| at position 0 over "
            f"positions 1..T-1. Peaks skip sublayers whose "
            f"stream norm is under {NORM_FRACTION:.0%} of the final norm. Sun-massive entries: |x| > {SUN_ABS:g} "
            f"and >= {SUN_REL:g}x the token's median. Losses: val loss on the same windows.\n\n"
            + "\n".join(f"- {line}" for m in results for line in m["notes"]) + "\n")
    with open(os.path.join(summary_dir, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(help_text(__doc__, MeasureConfig))
        return []
    try:
        paths, cfg = parse_args(argv)
        return run_trajectory(paths, cfg, argv) if cfg.trajectory else run(paths, cfg, argv)
    except MeasureError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)



# ----------------------------------------------------------------------------------------------
# Trajectories (--trajectory): the headline numbers at every kept snapshot of a run
#
# A matched-loss measurement shows one snapshot; a trajectory shows when the outlier appears,
# whether it lasts, and whether a Ledger run's commit gates close before C could take D's
# dimension. Each snapshot goes through measure_checkpoint exactly as it would on its own (figures
# off), so a row holds the numbers a one-checkpoint measurement gives, and the time is one
# measurement per snapshot.

def trajectory_snapshots(run_dir):
    """[(path, ckpt)] of a run's kept snapshots in training order, plus ckpt.pt when it holds a step
    that no snapshot does (a run stopped between two snapshots)."""
    by_iter = {}
    for name in sorted(checkpoint_names(run_dir), key=lambda n: n == "ckpt.pt"):   # snapshots first
        path = os.path.join(run_dir, name)
        ckpt = load_checkpoint(path)
        if ckpt.get("iter_num") is None:
            raise MeasureError(f"{path} records no iter_num, so it has no place on a trajectory")
        by_iter.setdefault(ckpt["iter_num"], (path, ckpt))
    return [by_iter[i] for i in sorted(by_iter)]


def trajectory_row(m):
    """One snapshot's headline numbers, read from its metrics (None where they do not apply)."""
    s = m["streams"][m["decoded_stream"]]
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
    return markdown_table(["run", "iter", "val loss", "decoded, dom dim", "pos-0 ratio", "start-token conc.",
                           "conc., released", "conc., normalised", "sink max", "residual peak",
                           "Δloss, dim zeroed at pos 0", "mean commit gate", "commit gate per sublayer", "‖C‖ / ‖D‖ (last)",
                           "C's dom dim is D's"], rows)


TRAJECTORY_PANELS = [   # (row key, title, log scale)
    ("pos0_ratio", "ratio at position 0 (dominant dim / median dim)", True),
    ("concentration", "start-token concentration\n(solid: here; dashed: per-token normalised)", True),
    ("concentration_released", "start-token concentration, released definition", True),
    ("residual_peak", "residual peak: ‖x‖ at position 0 / later", True),
    ("sink_max", "attention sink, strongest head", False),
    ("zero_delta", "Δ val loss, dominant dim zeroed at position 0", False),
    ("commit_gate_mean", "Ledger: mean commit gate over sublayers", False),
    ("C_over_D_norm_final", "Ledger: ‖C‖ / ‖D‖ at the last sublayer", True),
    ("C_carries_D_dim", "Ledger: C's dominant dim is D's (1) or not (0)", False),
]


def plot_trajectory(trajectories, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def values(rows, key):   # None (a number that does not apply) leaves a gap
        return [np.nan if r[key] is None else float(r[key]) for r in rows]

    fig, axes = plt.subplots(3, 3, figsize=(16, 11))
    for ax, (key, title, log) in zip(axes.flat, TRAJECTORY_PANELS):
        for name, t in trajectories.items():
            steps = [r["iter"] for r in t["rows"]]
            line, = ax.plot(steps, values(t["rows"], key), marker="o", label=name)
            if key == "concentration":
                ax.plot(steps, values(t["rows"], "concentration_normalized"), linestyle="--", color=line.get_color())
        if log and any(np.nanmin(values(t["rows"], key), initial=np.inf) > 0 for t in trajectories.values()):
            ax.set_yscale("log")
            readable_log_axis(ax)
        if key == "C_carries_D_dim":
            ax.set_ylim(-0.05, 1.05)
        ax.set(title=title, xlabel="training step")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)


def run_trajectory(paths, cfg, command=()):
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.match_loss is not None:
        raise MeasureError("--trajectory measures every kept snapshot; drop --match_loss")
    runs = []   # every snapshot of every run found and loaded first, so that a bad input fails before any work
    for path in paths:
        if not os.path.isdir(path):
            raise MeasureError(f"{path}: --trajectory takes run directories (it measures their kept snapshots)")
        snapshots = trajectory_snapshots(path)
        for ckpt_path, ckpt in snapshots:
            block = ckpt["model_config"].get("block_size")
            if block is not None and cfg.seq_len > block:
                raise MeasureError(f"--seq_len={cfg.seq_len} exceeds the checkpoint's block_size={block} ({ckpt_path})")
        runs.append((path, snapshots))
    out_root = cfg.out_dir or (os.path.join(paths[0], "measure") if len(paths) == 1 else os.path.join("out", "measure"))
    snapshot_cfg = dataclasses.replace(cfg, figures=False)
    selection = {"checkpoint": "trajectory", "match_loss": None, "distance": None}
    trajectories = {}
    for run_dir, snapshots in runs:
        base = os.path.basename(os.path.abspath(run_dir)) or "run"
        name, k = base, 1
        while name in trajectories:   # two run folders of the same name
            name, k = f"{base}_{k}", k + 1
        rows = []
        for ckpt_path, ckpt in snapshots:
            stem = os.path.splitext(os.path.basename(ckpt_path))[0]
            out_dir = os.path.join(out_root, stem) if len(runs) == 1 else os.path.join(out_root, name, stem)
            m = measure_checkpoint(ckpt_path, ckpt, snapshot_cfg, out_dir, selection)
            with open(os.path.join(out_dir, "metrics.json"), "w") as f:
                json.dump(jsonable(m), f, indent=1, allow_nan=False)
            rows.append(trajectory_row(m))
            print(f"{ckpt_path}: iter {m['iter_num']} measured in {m['timing']['seconds']:.1f} s -> {out_dir}")
        arch = snapshots[-1][1]["model_config"]["arch"]
        trajectories[name] = {"run_dir": os.path.abspath(run_dir), "arch": arch, "rows": rows,
                              "trained_by": snapshots[-1][1].get("trained_by", [])}
    os.makedirs(out_root, exist_ok=True)
    with open(os.path.join(out_root, "trajectory.json"), "w") as f:
        json.dump(jsonable({"settings": dataclasses.asdict(cfg), "runs": trajectories}), f, indent=1, allow_nan=False)
    if cfg.figures:
        plot_trajectory(trajectories, os.path.join(out_root, "trajectory.png"))
    trained = {name: t["trained_by"] for name, t in trajectories.items()}
    text = (results_header("measure.py", command, trained) + "\n"
            f"# Trajectory: every kept snapshot ({cfg.split} split, {cfg.num_windows} windows, seed {cfg.seed})\n\n"
            f"{trajectory_table(trajectories)}\n\nEach row is what measure.py gives that snapshot on its own "
            f"(its metrics.json: <run>/<snapshot>/ in this folder); decoded stream, at its peak sublayer. Concentration: the dominant "
            f"dim's mean |x| at position 0 over positions 1..T-1 (released: over all positions; normalised: after "
            f"x / rms(x) per token). ‖C‖ / ‖D‖: mean token norms at the last sublayer.\n")
    with open(os.path.join(out_root, "trajectory.md"), "w") as f:
        f.write(text)
    print(text)
    return trajectories


if __name__ == "__main__":
    main()
