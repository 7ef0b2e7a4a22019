"""
The paper's question asked of a real massive activation: Ledger retrofitted around SmolLM2-135M's
own sublayers (ledgerlab/retrofit.py), trained, and measured where the model's massive dimension
goes. `make retrofit` trains the runs, then calls

    python -m ledgerlab.retrofit_answer out/retrofit/ledger-corner-s1337 [more run folders] --out_dir=out/retrofit/answer

Every kept snapshot of every run, and the pretrained model itself, go through the same passes on the
same validation windows (the pretrained model is the vanilla arm: its weights are frozen, so a
vanilla retrofit has nothing to train and is the model as it is):

  - the dimension's |x| at position 0 in D and in C after every sublayer (vanilla: in h), beside
    its mean |x| at the other positions and the median |x| of the whole stream (Sun et al.'s scale);
  - every sublayer's commit gate at position 0 and at the other positions;
  - the loss with the dimension zeroed at position 0 after every sublayer: in D, in C, in both;
  - the sink: the attention weight each layer's queries (positions >= 1) put on position 0;
  - the validation loss, beside the pretrained model's on the same windows.

It writes answer.md (the paper's three claims asked of this dimension, one line each), answer.json
and four figures. The dimension is the pretrained model's largest at position 0, found here, not
assumed (for SmolLM2-135M, 507).
"""
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from ledgerlab import cli, figures
from ledgerlab.data import load_meta, open_split, random_offsets
from ledgerlab.device import resolve_device
from ledgerlab.metrics import SUN_ABS, SUN_REL, lower_median, mean_loss, where_written
from ledgerlab.pretrained import load_transformers
from ledgerlab.retrofit import RetrofitLM, check_weights, retrofit_config, retrofit_of_checkpoint
from ledgerlab.rundir import load_checkpoint


@dataclass
class AnswerConfig:
    out_dir: str = "out/retrofit/answer"  # answer.md, answer.json and the figures
    num_windows: int = 16            # validation windows, the same for every model measured
    batch_size: int = 8              # windows per forward pass
    seed: int = 0                    # seeds the window offsets
    device: str = "auto"             # auto (cuda > mps > cpu), cpu, cuda, mps
    threads: int = 0                 # CPU threads for torch; 0 = torch's default

    LIMITS = {"num_windows": ">= 1", "batch_size": ">= 1", "threads": ">= 0"}


# ----------------------------------------------------------------------------------------------
# One model measured: the passes every snapshot and the pretrained model go through

@torch.no_grad()
def measure_model(model: RetrofitLM, batches, dim=None):
    """The numbers above for one model on `batches` (a list of (x, y)), for dimension `dim`; None: the
    model's own largest at position 0 (the pretrained model's, which every snapshot is then asked about)."""
    n_sub, streams = len(model.sublayers), model.config.stream_names
    pos0 = {s: torch.zeros(n_sub, model.config.n_embd, dtype=torch.float64) for s in streams}
    rest = {s: torch.zeros(n_sub, model.config.n_embd, dtype=torch.float64) for s in streams}
    median = {s: torch.zeros(n_sub, dtype=torch.float64) for s in streams}
    gate_pos0, gate_rest = torch.zeros(n_sub, dtype=torch.float64), torch.zeros(n_sub, dtype=torch.float64)
    sink = torch.zeros(model.config.n_layer, dtype=torch.float64)

    def stream_hook(i, kind, state):
        for s in streams:
            a = state[s].abs()
            pos0[s][i] += a[:, 0].sum(0).double().cpu()   # every dimension: the largest may be found after
            rest[s][i] += a[:, 1:].mean(1).sum(0).double().cpu()
            median[s][i] += lower_median(a.flatten(1)).sum().item()   # per window, over tokens and dimensions

    def gate_hook(i):
        def hook(module, args, logit):   # the commit gate's logit, (B, T, 1)
            c = torch.sigmoid(logit[..., 0]).double()
            gate_pos0[i] += c[:, 0].sum().item()
            gate_rest[i] += c[:, 1:].mean(1).sum().item()
        return hook

    def on_layer(layer, weights, values):   # weights (B, H, T, T): each query's attention over keys
        sink[layer] += weights[:, :, 1:, 0].mean((1, 2)).sum().item()

    handles = model.attention_capture(on_layer)
    if model.config.residual == "ledger":
        handles += [sub.residual.commit_gate.register_forward_hook(gate_hook(i)) for i, sub in enumerate(model.sublayers)]
    try:
        loss = mean_loss(model, batches, stream_hook)
    finally:
        for h in handles:
            h.remove()
    n = sum(len(x) for x, _ in batches)
    if dim is None:
        dim = largest_at_position0(pos0[streams[0]])
    out = {"dim": dim, "val_loss": loss, "sink_per_layer": (sink / n).tolist()}
    for s in streams:
        out[s] = {"pos0": (pos0[s][:, dim] / n).tolist(), "rest": (rest[s][:, dim] / n).tolist(),
                  "median": (median[s] / n).tolist(),
                  "top_dim_pos0_final": int((pos0[s][-1]).argmax())}
    if model.config.residual == "ledger":
        out["commit_gate_pos0"], out["commit_gate_rest"] = (gate_pos0 / n).tolist(), (gate_rest / n).tolist()
    # Does the model need the dimension, and in which stream? Zeroed at position 0 after every sublayer.
    out["zeroed_loss_change"] = {"+".join(names): mean_loss(model, batches, zero_at_position0(names, dim)) - loss
                                 for names in ([[s] for s in streams] + ([list(streams)] if len(streams) > 1 else []))}
    return out


def zero_at_position0(names, dim):
    def hook(i, kind, state):
        replaced = {}
        for s in names:
            x = state[s].clone()
            x[:, 0, dim] = 0.0
            replaced[s] = x
        return replaced
    return hook


def largest_at_position0(pos0_h):
    """The dimension with the largest mean |x| at position 0 after any sublayer."""
    return int(pos0_h.max(dim=0).values.argmax())


# ----------------------------------------------------------------------------------------------
# The runs: every kept snapshot, around one copy of the pretrained weights

def run_snapshots(run_dir):
    """(iteration, path) of every kept snapshot and of a ckpt.pt beyond the last one, in step order."""
    found = {}
    for name in sorted(os.listdir(run_dir)):
        if name.startswith("ckpt_") and name.endswith(".pt"):
            found[int(name[5:-3])] = os.path.join(run_dir, name)
    final = os.path.join(run_dir, "ckpt.pt")
    if os.path.exists(final):
        it = load_checkpoint(final)["iter_num"]
        found.setdefault(it, final)
    if not found:
        raise cli.ConfigError(f"{run_dir}: no checkpoint; train it first (make retrofit)")
    return sorted(found.items())


def windows(data_dir, cfg, seq_len, device):
    """The fixed validation windows: (x, y) batches, the same for every model."""
    meta = load_meta(data_dir)
    tokens = open_split(data_dir, "val", meta)
    offsets = random_offsets(len(tokens), seq_len + 1, cfg.num_windows, cfg.seed)
    rows = torch.stack([torch.from_numpy(tokens[o:o + seq_len + 1].astype(np.int64)) for o in offsets.tolist()])
    rows = rows.to(device)
    return [(rows[i:i + cfg.batch_size, :-1], rows[i:i + cfg.batch_size, 1:])
            for i in range(0, len(rows), cfg.batch_size)]


def describe(ckpt):
    mc, named = ckpt["model_config"], ckpt["retrofit"]
    return {"arch": mc["arch"], "route": named["route"], "commit_sparsity": mc["commit_sparsity"],
            "gamma_iters": ckpt["train_config"].get("retrofit_gamma_iters") if named["route"] == "corner" else 0,
            "max_iters": ckpt["train_config"]["max_iters"]}


def answer(run_dirs, cfg, command=()):
    if not run_dirs:
        raise cli.ConfigError("name the retrofit run folders to measure, e.g. out/retrofit/ledger-corner-s1337")
    if os.path.isfile(cfg.out_dir):
        raise cli.ConfigError(f"--out_dir={cfg.out_dir} is a file; give a folder (it is made if it does not exist)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    plan = {}
    for run_dir in run_dirs:
        if not os.path.isdir(run_dir):
            raise cli.ConfigError(f"{run_dir} is not a run folder")
        plan[os.path.basename(os.path.normpath(run_dir))] = run_snapshots(run_dir)
    first = load_checkpoint(plan[next(iter(plan))][-1][1])
    if "retrofit" not in first:
        raise cli.ConfigError(f"{run_dirs[0]} holds no retrofit (train.py --init_from=MODEL); measure it with measure.py")
    spec, fingerprint = first["retrofit"]["model"], first["retrofit"]["weights_sha256"]
    data_dir = os.path.join(first["train_config"]["data_root"], first["train_config"]["dataset"])
    seq_len = first["model_config"]["block_size"]
    device = resolve_device(cfg.device)
    batches = windows(data_dir, cfg, seq_len, device)

    t0 = time.time()
    hf_model = load_transformers(spec, "float32")[0].to(device)
    pretrained = RetrofitLM(hf_model, retrofit_config(hf_model.config, "vanilla", block_size=seq_len), spec).eval()
    check_weights(pretrained, first["retrofit"])
    measured = measure_model(pretrained, batches)
    dim = measured["dim"]
    result = {"model": spec, "weights_sha256": fingerprint, "dim": dim, "data_dir": data_dir,
              "windows": {"count": cfg.num_windows, "seq_len": seq_len, "seed": cfg.seed, "split": "val"},
              "sublayer_names": pretrained.sublayer_names, "pretrained": measured,
              "runs": {}}
    total = sum(len(s) for s in plan.values())
    done = 0
    print(f"{spec}: dimension {dim} (largest at position 0); measuring {total} snapshots of {len(plan)} runs "
          f"on {cfg.num_windows} windows of {seq_len} tokens", flush=True)
    for name, snapshots in plan.items():
        run = None
        for it, path in snapshots:
            ckpt = load_checkpoint(path)
            if ckpt.get("retrofit", {}).get("weights_sha256") != fingerprint:
                raise cli.ConfigError(f"{path} was not built on {spec}; measure each model's runs apart")
            run = run or {**describe(ckpt), "snapshots": []}
            model = retrofit_of_checkpoint(ckpt, hf_model).to(device).eval()
            run["snapshots"].append({"iter": it, **measure_model(model, batches, dim)})
            done += 1
            left = (time.time() - t0) / done * (total - done)
            print(f"  {name} iter {it}: val loss {run['snapshots'][-1]['val_loss']:.4f}  "
                  f"[{done}/{total}, {cli.duration(left)} left]", flush=True)
        result["runs"][name] = run
    os.makedirs(cfg.out_dir, exist_ok=True)
    cli.atomic_write(os.path.join(cfg.out_dir, "answer.json"), lambda f: f.write(json.dumps(result, indent=1).encode()))
    text = cli.results_header("-m ledgerlab.retrofit_answer", list(command)) + "\n" + report(result)
    cli.atomic_write(os.path.join(cfg.out_dir, "answer.md"), lambda f: f.write(text.encode()))
    figures.plot_retrofit(result, cfg.out_dir)
    print(text)
    print(f"answer: {os.path.join(cfg.out_dir, 'answer.md')}, answer.json and the figures beside it")
    return result


# ----------------------------------------------------------------------------------------------
# The report: answer.md

def num(v):
    """Large values with a thousands separator, small ones to three significant digits."""
    return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"


def gate(v):
    return f"{v:.3f}" if v >= 0.01 else f"{v:.1e}"


def ratio(stream, i):
    return f"{stream['pos0'][i] / max(stream['median'][i], 1e-30):,.0f}x"


def sun_massive(value, median):
    return value > SUN_ABS and value >= SUN_REL * median


def report(r):
    dim, names, pre = r["dim"], r["sublayer_names"], r["pretrained"]
    h = pre["h"]
    placed = where_written(h["pos0"], names)
    w, e, last = placed["written_at"], placed["erased_at"], len(names) - 1
    peak = int(np.argmax(h["pos0"]))
    at = sorted({w, peak, *((e,) if e is not None else ()), last})
    lines = [f"# Ledger retrofitted onto {r['model']}: where dimension {dim} goes", "",
             f"One seed, a fine-tune: the pretrained weights are frozen and only the residual operators train. "
             f"{r['windows']['count']} validation windows of {r['windows']['seq_len']} tokens ({r['data_dir']}), "
             f"the same for every model; position 0 is ordinary text.", "",
             f"**The pretrained model (vanilla):** dimension {dim} at position 0 is written by {names[w]} and "
             + (f"erased by {names[e]}" if e is not None else "never erased")
             + f"; it peaks at {num(h['pos0'][peak])} after {names[peak]} ({h['pos0'][peak] / h['median'][peak]:,.0f}x "
             f"the stream's median, {h['pos0'][peak] / h['rest'][peak]:,.0f}x its mean at the other positions) "
             f"and is {num(h['pos0'][last])} after the last sublayer. Zeroing it at position 0 costs "
             f"{pre['zeroed_loss_change']['h']:+.3f} nats; val loss {pre['val_loss']:.4f}.", ""]

    def largest(stream):
        i = int(np.argmax(stream["pos0"]))
        return f"{num(stream['pos0'][i])} ({names[i]})"

    lines += ["## The answer in one table, at the end of training", "",
              f"Dimension {dim} at position 0: its largest mean |x| in the carrying stream (h, or Ledger's scratch "
              f"D), and after the last sublayer in the stream the head reads (h, or C). Massive: Sun et al.'s "
              f"rule there. C's scale is the gates' choice (the final RMSNorm divides it out), so its size beside "
              f"h's says little; its size beside its own median is scale-free. Δloss: the dimension zeroed at "
              f"position 0 after every sublayer in that stream.", "",
              "| model | route | val loss | largest in h or D (where) | in h or C, last | / its median | massive, last "
              "| Δloss, zeroed in h or C | commit gate, position 0 / others |", "|---|---|---|---|---|---|---|---|---|",
              f"| pretrained (vanilla) | | {pre['val_loss']:.4f} | {largest(h)} | {num(h['pos0'][last])} | "
              f"{ratio(h, last)} | {'yes' if sun_massive(h['pos0'][last], h['median'][last]) else 'no'} | "
              f"{pre['zeroed_loss_change']['h']:+.3f} | |"]
    for name, run in r["runs"].items():
        s = run["snapshots"][-1]
        c = s["C"]
        lines.append(f"| {name} | {run['route']} | {s['val_loss']:.4f} | {largest(s['D'])} | {num(c['pos0'][last])} | "
                     f"{ratio(c, last)} | {'yes' if sun_massive(c['pos0'][last], c['median'][last]) else 'no'} | "
                     f"{s['zeroed_loss_change']['C']:+.3f} | "
                     f"{gate(np.mean(s['commit_gate_pos0']))} / {gate(np.mean(s['commit_gate_rest']))} |")
    lines += ["", "## Loss", "", "| run | route | commit sparsity | step-0 val loss | final val loss (step) | "
              "pretrained's |", "|---|---|---|---|---|---|"]
    for name, run in r["runs"].items():
        s0, s1 = run["snapshots"][0], run["snapshots"][-1]
        lines.append(f"| {name} | {run['route']} | {run['commit_sparsity']:g} | {s0['val_loss']:.4f} (step {s0['iter']}) "
                     f"| {s1['val_loss']:.4f} ({s1['iter']}) | {pre['val_loss']:.4f} |")

    head = " | ".join(f"{names[i]} D | {names[i]} C" for i in at)
    lines += ["", f"## Where dimension {dim} lives at position 0 (mean |x|), at the start and the end", "",
              "The pretrained model's h at these sublayers: "
              + ", ".join(f"{names[i]} {num(h['pos0'][i])}" for i in at) + ". "
              f"C massive: Sun et al.'s rule (> {SUN_ABS:g} and >= {SUN_REL:g}x the median of C) after the last sublayer.",
              "", f"| run | step | {head} | C / its median, last | C massive | C's top dim at position 0 |",
              "|---|---|" + "---|---|" * len(at) + "---|---|---|"]
    for name, run in r["runs"].items():
        for s in (run["snapshots"][0], run["snapshots"][-1]):
            D, C = s["D"], s["C"]
            cells = " | ".join(f"{num(D['pos0'][i])} | {num(C['pos0'][i])}" for i in at)
            lines.append(f"| {name} | {s['iter']} | {cells} | {ratio(C, last)} | "
                         f"{'yes' if sun_massive(C['pos0'][last], C['median'][last]) else 'no'} | "
                         f"{C['top_dim_pos0_final']} |")

    lines += ["", "## The commit gates at position 0 against the other positions, at the end", "",
              f"Mean over sublayers, and at the sublayers above. Does the model close the gate where D carries "
              f"the dimension ({names[w]} to {names[e] if e is not None else names[last]})?", "",
              "| run | mean, position 0 | mean, others | " + " | ".join(f"{names[i]} (0 / others)" for i in at)
              + " | sublayers open at position 0 (> 0.5) |", "|---|---|---|" + "---|" * len(at) + "---|"]
    for name, run in r["runs"].items():
        s = run["snapshots"][-1]
        g0, g1 = s["commit_gate_pos0"], s["commit_gate_rest"]
        open0 = [names[i] for i, g in enumerate(g0) if g > 0.5]
        lines.append(f"| {name} | {gate(np.mean(g0))} | {gate(np.mean(g1))} | "
                     + " | ".join(f"{gate(g0[i])} / {gate(g1[i])}" for i in at)
                     + f" | {len(open0)}: {', '.join(open0[:6])}{' ...' if len(open0) > 6 else ''} |")

    lines += ["", f"## What zeroing dimension {dim} at position 0 costs (nats, after every sublayer), at the end", "",
              "| run | in D | in C | in both |", "|---|---|---|---|",
              f"| pretrained (h) | {pre['zeroed_loss_change']['h']:+.3f} | | |"]
    for name, run in r["runs"].items():
        z = run["snapshots"][-1]["zeroed_loss_change"]
        lines.append(f"| {name} | {z['D']:+.3f} | {z['C']:+.3f} | {z['D+C']:+.3f} |")

    sink = np.asarray(pre["sink_per_layer"])
    lines += ["", "## The sink: attention from positions >= 1 to position 0, per layer, at the end", "",
              "| model | mean over layers | layers above 0.5 | " + " | ".join(f"L{i}" for i in range(0, len(sink), 5))
              + " |", "|---|---|---|" + "---|" * len(range(0, len(sink), 5)),
              sink_row("pretrained", sink)]
    for name, run in r["runs"].items():
        lines.append(sink_row(name, np.asarray(run["snapshots"][-1]["sink_per_layer"])))

    lines += ["", f"## The paper's three claims, asked of dimension {dim} (one seed, a fine-tune)", ""]
    lines += claims(r, last)
    return "\n".join(lines) + "\n"


def sink_row(label, sink):
    return (f"| {label} | {sink.mean():.3f} | {int((sink > 0.5).sum())} | "
            + " | ".join(f"{sink[i]:.3f}" for i in range(0, len(sink), 5)) + " |")


# One run per arm and route: two numbers within this fraction of each other are called equal, not one
# larger, so that no line reads a verdict into a difference of one seed's size
EQUAL_WITHIN = 0.10


def versus(a, b):
    """'larger', 'smaller' or 'about equal' (within EQUAL_WITHIN): a against b."""
    if abs(a - b) <= EQUAL_WITHIN * max(abs(a), abs(b)):
        return "about equal"
    return "larger" if a > b else "smaller"


CONCENTRATION = {"larger": "more concentrated", "smaller": "less concentrated"}


def claims(r, last):
    """One line per claim and run (claim 3: per route), each with the numbers it rests on."""
    dim, pre, out = r["dim"], r["pretrained"]["h"], []
    peak = int(np.argmax(pre["pos0"]))
    conc_h = pre["pos0"][peak] / max(pre["rest"][peak], 1e-30)
    by_route = {}
    for name, run in r["runs"].items():
        by_route.setdefault(run["route"], []).append((name, run))
    for route, runs in by_route.items():
        for name, run in runs:
            s0, s1 = run["snapshots"][0]["C"], run["snapshots"][-1]["C"]
            massive = sun_massive(s1["pos0"][last], s1["median"][last])
            out.append(f"- **1. C rebuilds the start-token outlier** ({name}): "
                       f"{'yes' if massive else 'no'}: C's dimension {dim} at position 0 after the last sublayer went "
                       f"from {num(s0['pos0'][last])} to {num(s1['pos0'][last])} "
                       f"({ratio(s1, last)} C's median, Sun's rule {'met' if massive else 'not met'}; C's largest "
                       f"dimension at position 0: {s1['top_dim_pos0_final']}); zeroing it in C costs "
                       f"{run['snapshots'][-1]['zeroed_loss_change']['C']:+.3f} nats.")
        for name, run in runs:
            c = run["snapshots"][-1]["C"]
            conc_c = c["pos0"][last] / max(c["rest"][last], 1e-30)
            size, sharpness = versus(c["pos0"][last], pre["pos0"][peak]), versus(conc_c, conc_h)
            out.append(f"- **2. smaller but more concentrated on token 0 than vanilla's** ({name}): "
                       f"{'yes' if (size, sharpness) == ('smaller', 'larger') else 'no'}: C's {num(c['pos0'][last])} "
                       f"against the pretrained peak {num(pre['pos0'][peak])} ({size}); position 0 over the others "
                       f"{conc_c:,.0f}x against {conc_h:,.0f}x ({CONCENTRATION.get(sharpness, sharpness)}).")
        lam = sorted(runs, key=lambda nr: nr[1]["commit_sparsity"])
        if len(lam) >= 2:
            (lo_name, lo), (hi_name, hi) = lam[0], lam[-1]
            c_lo, c_hi = lo["snapshots"][-1]["C"], hi["snapshots"][-1]["C"]
            scale_free = versus(c_hi["pos0"][last] / max(c_hi["median"][last], 1e-30),
                                c_lo["pos0"][last] / max(c_lo["median"][last], 1e-30))
            out.append(f"- **3. stronger with more commit sparsity** (route {route}): "
                       f"{'yes' if scale_free == 'larger' else 'no'}: C's dimension {dim} at position 0 over C's median "
                       f"is {ratio(c_hi, last)} at lambda {hi['commit_sparsity']:g} ({hi_name}) against "
                       f"{ratio(c_lo, last)} at {lo['commit_sparsity']:g} ({lo_name}): {scale_free} "
                       f"({num(c_hi['pos0'][last])} against {num(c_lo['pos0'][last])} in C's own scale).")
    out += ["", f"One seed of a fine-tune of a few hundred steps with frozen weights: it shows where this model's "
            f"routing puts the dimension when it may choose, not what pretraining with Ledger would grow. Each line "
            f"is one run, and two numbers within {EQUAL_WITHIN:.0%} of each other are called about equal; none is a "
            f"verdict over seeds."]
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    (settings,) = cli.run_main(lambda: cli.parse_overrides([a for a in argv if a.startswith("-")], AnswerConfig,
                                                           doc=__doc__))
    return cli.run_main(lambda: answer([a for a in argv if not a.startswith("-")], AnswerConfig(**settings), argv))


if __name__ == "__main__":
    main()
