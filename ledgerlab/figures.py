"""
The figures, all of them drawn here with matplotlib (docs/metrics.md, "Figures", says how to read
them): per stream and per checkpoint for measure.py, the decoded channel of every run measured
together, the headline numbers against training step (--trajectory), and C's numbers against the
commit sparsity (lab.py --sweep). Each function takes numbers already measured and writes PNG files.
"""
import os

import numpy as np

from ledgerlab.metrics import NORM_FRACTION, no_sink_level


def pyplot():
    import matplotlib
    matplotlib.use("Agg")   # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def readable_log_axis(ax):
    """Within one decade matplotlib labels a log axis '1.9 x 10^0'; plain numbers read better."""
    from matplotlib.ticker import FuncFormatter
    low, high = ax.get_ylim()
    if low > 0 and high / low < 10:
        for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))


def log_norm(a):
    """Log colours for a heatmap whose smallest entries may be 0."""
    from matplotlib.colors import LogNorm
    positive = a[a > 0]
    low = positive.min() if positive.size else 1e-8
    return LogNorm(vmin=max(low, a.max() * 1e-6), vmax=max(a.max(), low * 10))


# ----------------------------------------------------------------------------------------------
# One checkpoint: every stream, and the extreme-token phenomena

def plot_checkpoint(stats, summaries, profiles, extreme, sublayer_names, decoded, out_dir):
    """Every figure of one checkpoint; returns their paths."""
    paths = []
    for name in stats:
        paths += plot_stream(name, stats[name], summaries[name], profiles[name], sublayer_names, out_dir)
    return paths + [plot_extreme_tokens(extreme, summaries, sublayer_names, decoded, out_dir)]


def plot_stream(name, stats, summary, profile, sublayer_names, out_dir):
    plt, L = pyplot(), len(sublayer_names)
    ticks = dict(ticks=range(L), labels=sublayer_names)

    def path(suffix):
        return os.path.join(out_dir, f"{name.replace('+', '_plus_')}_{suffix}.png")

    fig, axes = plt.subplots(1, 2, figsize=(13, 0.35 * L + 2.5), sharey=True)
    for ax, data, title in zip(axes, (stats.mean_abs(), stats.mean_abs_pos0()), ("all positions", "position 0")):
        pooled, width = max_pooled_columns(data)
        im = ax.imshow(pooled, aspect="auto", interpolation="nearest", norm=log_norm(pooled), cmap="viridis",
                       extent=(-0.5, pooled.shape[1] * width - 0.5, L - 0.5, -0.5))
        binned = f" (max of each {width} dims)" if width > 1 else ""
        ax.set(title=f"stream {name}: mean |x|, {title}{binned}", xlabel="hidden dimension")
        labelled = top_dims(data)
        ax.secondary_xaxis("top").set_xticks(labelled, [str(d) for d in labelled])
        fig.colorbar(im, ax=ax, label="mean |x| (log)")
    axes[0].set_yticks(**ticks)
    axes[0].set_ylabel("sublayer output")
    paths = [save(fig, path("dims"))]

    data = profile.position_mean()
    fig, ax = plt.subplots(figsize=(10, 0.35 * L + 2.5))
    im = ax.imshow(data, aspect="auto", interpolation="nearest", norm=log_norm(data), cmap="magma")
    ax.set(title=f"stream {name}: |x| of dominant dim {profile.dim} by position", xlabel="position in window")
    ax.set_yticks(**ticks)
    ax.set_ylabel("sublayer output")
    fig.colorbar(im, ax=ax, label="mean |x| (log)")
    paths.append(save(fig, path("dominant_positions")))

    fig, ax = plt.subplots(figsize=(max(6, 0.4 * L + 3), 4))
    for key, label in (("top1", "top-1"), ("top2", "top-2"), ("top3", "top-3"), ("median", "median")):
        ax.plot(range(L), summary[f"layer_{key}_per_sublayer"], marker="o", label=f"{label} |x|")
    ax.set_yscale("log")
    readable_log_axis(ax)
    ax.set_xticks(**ticks)
    ax.tick_params(axis="x", rotation=60)
    ax.set(title=f"stream {name}: Sun et al.'s layer-wise |x|, over a window's whole output",
           ylabel="mean over windows", xlabel="sublayer output")
    ax.legend()
    return paths + [save(fig, path("sun_layerwise"))]


def max_pooled_columns(data, max_columns=128):
    """(sublayer, bin) maxima of a (sublayer, dimension) map, bins of `width` neighbouring dimensions, and
    width. At page width a 576-dimension heatmap gets under one pixel per dimension and resampling thins a
    single massive column out; its bin's max keeps it, a few pixels wide."""
    width = -(-data.shape[1] // max_columns)
    padded = np.pad(data, ((0, 0), (0, -data.shape[1] % width)))   # |x| >= 0: a padded zero is never a max
    return padded.reshape(len(data), -1, width).max(-1), width


def top_dims(data, k=3, stands_out=10.0):
    """The columns a heatmap labels: of the k dimensions whose largest value over sublayers is largest,
    the first and those >= stands_out x the median dimension's (a label on noise would crowd them)."""
    peak = data.max(0)
    ranked = np.argsort(-peak, kind="stable")[:k]
    return [int(d) for d in ranked if d == ranked[0] or peak[d] >= stands_out * np.median(peak)]


def plot_position0_dims(stats, sublayer_names, out_dir, k=5):
    """The k dimensions largest at position 0 anywhere in depth: their mean |x| at position 0 through
    the sublayers, against the median dimension's. A massive activation is one line far above the
    rest from the sublayer that writes it to the one that erases it."""
    plt, L = pyplot(), len(sublayer_names)
    pos0 = stats.mean_abs_pos0()
    fig, ax = plt.subplots(figsize=(max(7, 0.25 * L + 3), 4.5))
    for dim in np.argsort(pos0.max(0))[::-1][:k]:
        ax.plot(range(L), pos0[:, dim], marker=".", label=f"dim {dim}")
    ax.plot(range(L), np.median(pos0, 1), color="grey", linestyle=":", label="median dim")
    ax.set_yscale("log")
    readable_log_axis(ax)
    ax.set_xticks(range(L), sublayer_names, rotation=90, fontsize=7)
    ax.set(title="position 0: mean |x| of its largest dimensions", xlabel="sublayer output", ylabel="mean |x|")
    ax.legend(fontsize=8)
    return save(fig, os.path.join(out_dir, "h_position0_dims.png"))


def plot_extreme_tokens(extreme, summaries, sublayer_names, decoded, out_dir):
    """Guo et al.'s three extreme-token phenomena side by side: which heads sink onto position 0,
    whether the values they land on are drained, and how large position 0's residual state grows."""
    from matplotlib.colors import LogNorm
    plt = pyplot()
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
    return save(fig, os.path.join(out_dir, "extreme_tokens.png"))


# ----------------------------------------------------------------------------------------------
# Several runs: side by side, against training step, against the commit sparsity

def plot_comparison(results, path):
    """The decoded channel of every arm against relative depth (arms may differ in depth)."""
    fig, axes = pyplot().subplots(1, 2, figsize=(12, 4.5))
    for m in results:
        s = m["streams"][m["decoded_stream"]]
        L = len(s["ratio_per_sublayer"])
        depth = [(i + 1) / L for i in range(L)]
        label = f"{m['label']} ({m['decoded_stream']})"
        axes[0].plot(depth, s["ratio_per_sublayer"], marker="o", label=label)
        axes[1].plot(depth, s["top1_over_layer_median_per_sublayer"], marker="o", label=label)
    axes[0].set(title="decoded channel: top dim / median dim of mean |x|", ylabel="fixed-dimension ratio")
    axes[1].set(title="decoded channel: top-1 |x| / layer-wide median |x| (Sun et al.)", ylabel="ratio")
    for ax in axes:
        ax.set_yscale("log")
        readable_log_axis(ax)
        ax.set_xlabel("relative depth (sublayer / number of sublayers)")
        ax.legend(fontsize=8)
    save(fig, path)


TRAJECTORY_PANELS = [   # (key of a reports.trajectory_row, title, log scale)
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
    def values(rows, key):   # None (a number that does not apply) leaves a gap
        return [np.nan if r[key] is None else float(r[key]) for r in rows]

    fig, axes = pyplot().subplots(3, 3, figsize=(16, 11))
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
    save(fig, path)


def plot_sweep(summary, panels, path):
    """C's numbers against lambda: a min-max band over seeds and the mean, vanilla's band beside them.
    panels: reports.SWEEP_METRICS."""
    lams = summary["lambdas"]
    fig, axes = pyplot().subplots(2, 4, figsize=(18, 8))
    for ax, (key, title, _, log, _) in zip(axes.flat, panels):
        stats = [summary["ledger"][lam][key] for lam in lams]
        have = [(lam, s) for lam, s in zip(lams, stats) if s is not None]
        if have:
            x = [lam for lam, _ in have]
            ax.fill_between(x, [s["min"] for _, s in have], [s["max"] for _, s in have], alpha=0.25,
                            label="Ledger C, min-max over seeds")
            ax.plot(x, [s["mean"] for _, s in have], marker="o", label="Ledger C, mean")
        v = (summary["vanilla"] or {}).get(key)
        if v is not None:
            ax.axhspan(v["min"], v["max"], color="grey", alpha=0.2, label="vanilla h, min-max")
            ax.axhline(v["mean"], color="grey", linestyle="--", label="vanilla h, mean")
        positive = [s["min"] for _, s in have] + ([v["min"]] if v else [])
        if log and positive and min(positive) > 0:
            ax.set_yscale("log")
            readable_log_axis(ax)
        # lambda = 0 belongs on the axis: linear near 0, logarithmic from the smallest lambda > 0 on
        nonzero = [lam for lam in lams if lam > 0]
        if nonzero:
            ax.set_xscale("symlog", linthresh=min(nonzero))
        ax.set_xticks(lams, [f"{lam:g}" for lam in lams])
        if key == "carries_D_dim":
            ax.set_ylim(-0.05, 1.05)
        ax.set(title=title, xlabel="commit sparsity λ")
    axes.flat[0].legend(fontsize=8)
    save(fig, path)


def plot_retrofit(r, out_dir):
    """ledgerlab/retrofit_answer.py's figures: the dimension in D and C per sublayer at the start and the end,
    the commit gates at position 0 and elsewhere, the sink per layer, and loss and C's dimension against step."""
    plt = pyplot()
    dim, names, pre = r["dim"], r["sublayer_names"], r["pretrained"]
    runs = list(r["runs"].items())
    x = np.arange(len(names))
    ticks = x[1::10]

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.6), sharey=True, squeeze=False)
    for ax, (name, run) in zip(axes[0], runs):
        ax.plot(x, pre["h"]["pos0"], color="0.6", lw=2.5, label="pretrained h")
        for s, style in ((run["snapshots"][0], "--"), (run["snapshots"][-1], "-")):
            for stream, color in (("D", "tab:blue"), ("C", "tab:orange")):
                ax.plot(x, np.maximum(s[stream]["pos0"], 1e-3), style, color=color, label=f"{stream}, step {s['iter']}")
        ax.set(yscale="log", title=name, xlabel="sublayer")
        ax.set_xticks(ticks, [names[i] for i in ticks], rotation=45, fontsize=7)
    axes[0][0].set_ylabel(f"|x[{dim}]| at position 0")
    axes[0][-1].legend(fontsize=7)
    save(fig, os.path.join(out_dir, "dim_in_streams.png"))

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), sharey=True, squeeze=False)
    for ax, (name, run) in zip(axes[0], runs):
        s = run["snapshots"][-1]
        ax.plot(x, s["commit_gate_pos0"], color="tab:red", label="position 0")
        ax.plot(x, s["commit_gate_rest"], color="tab:green", label="other positions")
        ax.set(title=f"{name}, step {s['iter']}", xlabel="sublayer", yscale="log", ylim=(1e-5, 1.5))   # closed gates are ~1e-4
        ax.set_xticks(ticks, [names[i] for i in ticks], rotation=45, fontsize=7)
    axes[0][0].set_ylabel("commit gate")
    axes[0][-1].legend(fontsize=7)
    save(fig, os.path.join(out_dir, "commit_gates.png"))

    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(pre["sink_per_layer"], color="0.4", lw=2.5, label="pretrained")
    for name, run in runs:
        ax.plot(run["snapshots"][-1]["sink_per_layer"], label=name)
    ax.set(xlabel="layer", ylabel="attention to position 0", ylim=(0, 1))
    ax.legend(fontsize=7)
    save(fig, os.path.join(out_dir, "sink.png"))

    fig, (ax_loss, ax_c) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax_loss.axhline(pre["val_loss"], color="0.5", ls=":", label="pretrained")
    for name, run in runs:
        steps = [s["iter"] for s in run["snapshots"]]
        ax_loss.plot(steps, [s["val_loss"] for s in run["snapshots"]], "o-", label=name)
        ax_c.plot(steps, [max(s["C"]["pos0"][-1], 1e-3) for s in run["snapshots"]], "o-", label=name)
    ax_loss.set(xlabel="step", ylabel="val loss", yscale="log")
    ax_c.set(xlabel="step", ylabel=f"C's |x[{dim}]| at position 0, last sublayer", yscale="log")
    ax_loss.legend(fontsize=7)
    save(fig, os.path.join(out_dir, "trajectory.png"))
