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
level, gated attention's output gate at position 0 and elsewhere (see "Extreme-token phenomena").

With --trajectory, every kept snapshot of each run directory is measured the same way, and one
figure and one table give the headline numbers against training step, every run side by side.

Read top to bottom: config, loading, statistics, metrics, extreme tokens (sink, drain, peak),
interventions, Ledger's two streams, figures, report, main, trajectories.
"""
import contextlib
import copy
import dataclasses
import json
import math
import os
import string
import sys
import time
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
import torch.nn as nn

import train
from ledger import ARCHS, GPT, GPTConfig, arm_name
NORM_FRACTION = 0.25     # a sublayer counts for "peak" only if its stream norm is >= 25% of the final
SUN_ABS, SUN_REL = 100.0, 1000.0   # Sun et al.: massive if |x| > 100 and |x| >= 1000 x token median
SHARED_FRACTION = 0.5    # a token whose mean |x_dom| is >= half of position 0's shares the feature
RMS_EPS = 1e-6           # ledger.RMSNorm's eps: the per-token normalised metrics divide as it does


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

    # Checked by train.parse_overrides as each setting is read: one line, before anything is loaded
    LIMITS = {"num_windows": ">= 1", "batch_size": ">= 1", "seq_len": ">= 0", "threads": ">= 0",
              "top_tokens": ">= 1", "min_token_count": ">= 1", "split": ("train", "val")}


class MeasureError(Exception):
    """A bad input: reported as one line `error: ...` and exit status 2, never a traceback."""


def parse_args(argv):
    """Split argv into input paths and a MeasureConfig from `--key=value` flags (train.py's parser)."""
    paths = [a for a in argv if not a.startswith("--")]
    try:
        (settings,) = train.parse_overrides([a for a in argv if a.startswith("--")], MeasureConfig)
    except train.ConfigError as e:
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
    """train.py's safe loader (weights_only=True, format check), plus: is the arm one we know?"""
    try:
        ckpt = train.load_checkpoint(path)
    except train.ConfigError as e:
        raise MeasureError(str(e)) from None
    arch = ckpt.get("model_config", {}).get("arch")
    if arch not in ARCHS:
        raise MeasureError(f"{path} holds unknown arm {arch!r}; known arms: {', '.join(ARCHS)}")
    return ckpt


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
        config = GPTConfig(**ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise MeasureError(f"{path}: model_config does not fit ledger.GPTConfig ({e})") from None
    model = GPT(config)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise MeasureError(f"{path}: weights do not fit the saved config ({str(e).splitlines()[0]})") from None
    return model.to(device).eval()


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
# Statistics: running sums over batches, so memory never grows with the number of windows

def measured_streams(config):
    """Every stream the forward pass carries; for hc2 also their sum, which is what is decoded."""
    return config.stream_names + (("h0+h1",) if config.residual == "hc2" else ())


def stream_tensor(streams, name):
    return streams["h0"] + streams["h1"] if name == "h0+h1" else streams[name]


class StreamStats:
    """Running float64 sums for one stream over all sublayers. Each update reduces a (B, T, D)
    activation to per-dimension and per-sublayer vectors at once; nothing scales with batches."""

    def __init__(self, n_sublayers, dim):
        L, f64 = n_sublayers, torch.float64
        self.abs_sum = torch.zeros(L, dim, dtype=f64)          # sum |x| per dim, all positions
        self.abs_sum_pos0 = torch.zeros(L, dim, dtype=f64)     # ... at position 0 only
        self.sum_pos0 = torch.zeros(L, dim, dtype=f64)         # signed, for the mean intervention
        self.n_tokens = torch.zeros(L, dtype=f64)
        self.n_seqs = torch.zeros(L, dtype=f64)
        self.top_sum = torch.zeros(L, 3, dtype=f64)            # per token top-1/2/3 |x| (Sun et al.)
        self.median_sum = torch.zeros(L, dtype=f64)            # per token median |x|
        self.kurtosis_sum = torch.zeros(L, dtype=f64)          # excess kurtosis over dims, per token
        self.ratio_sum = torch.zeros(L, dtype=f64)             # per token max |x| / median |x|
        self.ratio_max = torch.zeros(L, dtype=f64)
        self.norm_sum = torch.zeros(L, dtype=f64)              # per token L2 norm
        self.norm_sum_pos0 = torch.zeros(L, dtype=f64)         # ... at position 0 only (residual peak)
        self.max_abs = torch.zeros(L, dtype=f64)
        self.sun_count = torch.zeros(L, dtype=torch.int64)     # Sun et al.'s massive entries
        self.sun_count_pos0 = torch.zeros(L, dtype=torch.int64)
        # The same sums after per-token RMS normalisation (x / rms(x), "unit"): what an RMSNorm that
        # reads this stream sees (the head's for C; every sublayer's and the head's for h), each
        # token's own scale divided out
        self.unit_abs_sum = torch.zeros(L, dim, dtype=f64)
        self.unit_abs_sum_pos0 = torch.zeros(L, dim, dtype=f64)
        self.unit_norm_sum = torch.zeros(L, dtype=f64)
        self.unit_norm_sum_pos0 = torch.zeros(L, dtype=f64)

    def state_nbytes(self):
        return sum(t.numel() * t.element_size() for t in vars(self).values())

    @torch.no_grad()
    def update(self, i, x):
        x = x.detach().float()
        B, T, D = x.shape
        a = x.abs()
        f64 = torch.float64
        self.abs_sum[i] += a.sum((0, 1), dtype=f64).cpu()
        self.abs_sum_pos0[i] += a[:, 0].sum(0, dtype=f64).cpu()
        self.sum_pos0[i] += x[:, 0].sum(0, dtype=f64).cpu()
        self.n_tokens[i] += B * T
        self.n_seqs[i] += B
        flat, signed = a.reshape(-1, D), x.reshape(-1, D)
        top = flat.topk(min(3, D), dim=-1).values
        median = flat.median(dim=-1).values      # the lower middle value when D is even
        ratio = top[:, 0] / median.clamp_min(1e-30)
        centred = signed - signed.mean(-1, keepdim=True)
        var = centred.pow(2).mean(-1)
        kurtosis = centred.pow(4).mean(-1) / var.pow(2).clamp_min(1e-30) - 3.0
        massive = (flat > SUN_ABS) & (flat >= SUN_REL * median[:, None])
        self.top_sum[i, :top.shape[1]] += top.sum(0, dtype=f64).cpu()
        self.median_sum[i] += median.sum(dtype=f64).cpu()
        self.kurtosis_sum[i] += kurtosis.sum(dtype=f64).cpu()
        self.ratio_sum[i] += ratio.sum(dtype=f64).cpu()
        self.ratio_max[i] = torch.maximum(self.ratio_max[i], ratio.max().double().cpu())
        norms = signed.norm(dim=-1)
        self.norm_sum[i] += norms.sum(dtype=f64).cpu()
        self.norm_sum_pos0[i] += norms.view(B, T)[:, 0].sum(dtype=f64).cpu()
        self.max_abs[i] = torch.maximum(self.max_abs[i], flat.max().double().cpu())
        self.sun_count[i] += int(massive.sum())
        self.sun_count_pos0[i] += int(massive.view(B, T, D)[:, 0].sum())
        unit = torch.nn.functional.rms_norm(x, (D,), eps=RMS_EPS)
        unit_abs, unit_norms = unit.abs(), unit.norm(dim=-1)
        self.unit_abs_sum[i] += unit_abs.sum((0, 1), dtype=f64).cpu()
        self.unit_abs_sum_pos0[i] += unit_abs[:, 0].sum(0, dtype=f64).cpu()
        self.unit_norm_sum[i] += unit_norms.sum(dtype=f64).cpu()
        self.unit_norm_sum_pos0[i] += unit_norms[:, 0].sum(dtype=f64).cpu()

    # per (sublayer, dim) means, as numpy arrays
    def mean_abs(self):
        return (self.abs_sum / self.n_tokens[:, None]).numpy()

    def mean_abs_pos0(self):
        return (self.abs_sum_pos0 / self.n_seqs[:, None]).numpy()

    def mean_abs_rest(self):
        n_rest = (self.n_tokens - self.n_seqs).clamp_min(1)
        return ((self.abs_sum - self.abs_sum_pos0) / n_rest[:, None]).numpy()

    def mean_pos0(self):
        return (self.sum_pos0 / self.n_seqs[:, None]).numpy()

    def dominant_dim(self):
        """The dimension with the largest mean |x| summed across depth."""
        return int(self.mean_abs().sum(0).argmax())

    def summarize(self, sublayer_names=None):
        """The paper's structure metrics for this stream (see the module docstring)."""
        mean_abs, pos0, rest = self.mean_abs(), self.mean_abs_pos0(), self.mean_abs_rest()
        L = mean_abs.shape[0]
        names = sublayer_names or [str(i) for i in range(L)]
        n = self.n_tokens.numpy()
        dom = self.dominant_dim()
        top_dim = mean_abs.argmax(1)
        # Fixed-dimension ratio: the top dimension's mean |x| over the median dimension's.
        dim_ratio = mean_abs.max(1) / np.maximum(np.median(mean_abs, 1), 1e-30)
        # The same ratio on the first token alone: how the paper states an outlier's size ("~20x the
        # median at position 0" for the precursor, 100-1000x for a massive activation).
        pos0_ratio = pos0[:, dom] / np.maximum(np.median(pos0, 1), 1e-30)
        concentration = pos0[:, dom] / np.maximum(rest[:, dom], 1e-30)
        norm = self.norm_sum.numpy() / n
        # Trap (1): C is nearly empty early on, so a ratio over its tiny median looks huge there.
        # Only sublayers whose stream norm reaches NORM_FRACTION of the final norm compete for the peak.
        eligible = norm >= NORM_FRACTION * norm[-1]
        peak = int(np.where(eligible, dim_ratio, -np.inf).argmax())
        emerged = np.flatnonzero(eligible & (top_dim == dom))
        emergence = int(emerged[0]) if len(emerged) else None
        top = self.top_sum.numpy() / n[:, None]
        median = self.median_sum.numpy() / n
        kurtosis = self.kurtosis_sum.numpy() / n
        # Residual-state peak (Guo et al. 2024): position 0's L2 norm over the mean of positions >= 1.
        # The whole vector can grow without any one dimension leaving the median behind, so the
        # per-dimension ratios can miss it. The max uses the same eligible sublayers as the peak.
        n_seqs = self.n_seqs.numpy()
        norm_pos0 = self.norm_sum_pos0.numpy() / n_seqs
        norm_later = (self.norm_sum.numpy() - self.norm_sum_pos0.numpy()) / np.maximum(n - n_seqs, 1)
        residual_peak = norm_pos0 / np.maximum(norm_later, 1e-30)
        top_peak = int(np.where(eligible, residual_peak, -np.inf).argmax())
        # The released code's definitions (its probe.py and analyze.py), for numbers comparable with
        # the paper's: the peak ratio is the max over *all* sublayers (no norm filter); the
        # start-token concentration divides position 0 by the mean over *all* positions, position 0
        # included, at the sublayer where the dominant dim is largest on average; kurtosis is the max
        # over sublayers. For a ratio r of ours at one sublayer theirs is T r / (r + T - 1), at most T.
        dom_peak = int(mean_abs[:, dom].argmax())
        concentration_all = pos0[:, dom] / np.maximum(mean_abs[:, dom], 1e-30)
        released = {
            "peak_ratio": float(dim_ratio.max()), "peak_sublayer": int(dim_ratio.argmax()),
            "peak_sublayer_name": names[int(dim_ratio.argmax())],
            "start_token_concentration": float(concentration_all[dom_peak]),
            "concentration_sublayer": dom_peak, "concentration_sublayer_name": names[dom_peak],
            "start_token_concentration_per_sublayer": concentration_all.tolist(),
            "kurtosis_max": float(kurtosis.max()),
        }
        return {
            "dominant_dim": dom,
            "persistence": float((top_dim == dom).mean()),
            "top_dim_per_sublayer": top_dim.tolist(),
            "emergence_sublayer": emergence,
            "eligible_per_sublayer": eligible.tolist(),
            "peak_sublayer": peak, "peak_sublayer_name": names[peak],
            "peak_ratio": float(dim_ratio[peak]),
            "final_ratio": float(dim_ratio[-1]),
            "ratio_per_sublayer": dim_ratio.tolist(),
            "peak_pos0_ratio": float(pos0_ratio[peak]), "final_pos0_ratio": float(pos0_ratio[-1]),
            "pos0_ratio_per_sublayer": pos0_ratio.tolist(),
            "start_token_concentration_peak": float(concentration[peak]),
            "start_token_concentration_final": float(concentration[-1]),
            "start_token_concentration_per_sublayer": concentration.tolist(),
            "dominant_mean_abs_pos0_per_sublayer": pos0[:, dom].tolist(),
            "dominant_mean_abs_rest_per_sublayer": rest[:, dom].tolist(),
            "top5_dims_at_peak": [[int(d), float(mean_abs[peak, d])] for d in np.argsort(-mean_abs[peak])[:5]],
            "mean_norm_per_sublayer": norm.tolist(),
            "top1_per_sublayer": top[:, 0].tolist(), "top2_per_sublayer": top[:, 1].tolist(),
            "top3_per_sublayer": top[:, 2].tolist(), "median_per_sublayer": median.tolist(),
            "kurtosis_per_sublayer": kurtosis.tolist(),
            "kurtosis_peak": float(kurtosis[peak]), "kurtosis_final": float(kurtosis[-1]),
            "token_max_median_ratio_mean_per_sublayer": (self.ratio_sum.numpy() / n).tolist(),
            "token_max_median_ratio_max_per_sublayer": self.ratio_max.tolist(),
            "max_abs_per_sublayer": self.max_abs.tolist(),
            "sun_massive_count_per_sublayer": self.sun_count.tolist(),
            "sun_massive_count_total": int(self.sun_count.sum()),
            "sun_massive_count_pos0": int(self.sun_count_pos0.sum()),
            "residual_peak": {"per_sublayer": residual_peak.tolist(), "max": float(residual_peak[top_peak]),
                              "max_sublayer": top_peak, "max_sublayer_name": names[top_peak],
                              "final": float(residual_peak[-1])},
            "released_definitions": released,
            "mean_norm_pos0_per_sublayer": norm_pos0.tolist(), "mean_norm_later_per_sublayer": norm_later.tolist(),
            "normalized": self.summarize_normalized(dom, peak, dom_peak, eligible),
        }

    def summarize_normalized(self, dom, peak, dom_peak, eligible):
        """The headline numbers after per-token RMS normalisation, for the same dimension and at the
        same sublayers as the raw ones beside them. A stream whose position 0 is simply larger than
        its other positions (Ledger's C while lam ~ 0: only the final norm reads it, and it divides
        the scale out) has a large raw concentration and residual peak but normalised ones near 1.
        The within-token pos-0 ratio hardly moves: it divides two dimensions of the same token. The
        normalised residual peak is ~1 by construction (every unit token has norm sqrt(D)) unless a
        token's RMS is so small (< ~1e-3) that the eps, as in the model's own norm, keeps it small."""
        n, n_seqs = self.n_tokens.numpy(), self.n_seqs.numpy()
        n_rest = np.maximum(n - n_seqs, 1)
        unit_abs = self.unit_abs_sum.numpy() / n[:, None]
        pos0 = self.unit_abs_sum_pos0.numpy() / n_seqs[:, None]
        rest = (self.unit_abs_sum.numpy() - self.unit_abs_sum_pos0.numpy()) / n_rest[:, None]
        dim_ratio = unit_abs.max(1) / np.maximum(np.median(unit_abs, 1), 1e-30)
        pos0_ratio = pos0[:, dom] / np.maximum(np.median(pos0, 1), 1e-30)
        concentration = pos0[:, dom] / np.maximum(rest[:, dom], 1e-30)
        concentration_all = pos0[:, dom] / np.maximum(unit_abs[:, dom], 1e-30)
        norm_pos0 = self.unit_norm_sum_pos0.numpy() / n_seqs
        norm_later = (self.unit_norm_sum.numpy() - self.unit_norm_sum_pos0.numpy()) / n_rest
        residual_peak = norm_pos0 / np.maximum(norm_later, 1e-30)
        return {
            "definition": f"x / sqrt(mean(x^2) + {RMS_EPS:g}) per token, as RMSNorm without its gain; the raw "
                          f"numbers' dominant dim and sublayers",
            "peak_ratio": float(dim_ratio[peak]), "ratio_per_sublayer": dim_ratio.tolist(),
            "peak_pos0_ratio": float(pos0_ratio[peak]), "pos0_ratio_per_sublayer": pos0_ratio.tolist(),
            "start_token_concentration_peak": float(concentration[peak]),
            "start_token_concentration_final": float(concentration[-1]),
            "start_token_concentration_per_sublayer": concentration.tolist(),
            "released_start_token_concentration": float(concentration_all[dom_peak]),
            "residual_peak": {"per_sublayer": residual_peak.tolist(), "max": float(residual_peak[eligible].max()),
                              "final": float(residual_peak[-1])},
        }


class DominantDimProfile:
    """Second pass, once the dominant dimension is known: mean |x_dom| per (sublayer, position) for
    the heatmap, and per token id (positions >= 1 only) at chosen sublayers for the delimiter check.
    A first pass finds the dimension; keeping (sublayer, position, dim) sums for every dim instead
    would cost 24 x 1024 x 768 x 8 bytes = 150 MB at GPT-2 size. The second pass costs one forward."""

    def __init__(self, n_sublayers, seq_len, dim, vocab_size=0, token_sublayers=()):
        self.dim = dim
        self.pos_sum = torch.zeros(n_sublayers, seq_len, dtype=torch.float64)
        self.n_seqs = torch.zeros(n_sublayers, dtype=torch.float64)
        self.token_sum = {s: torch.zeros(vocab_size, dtype=torch.float64) for s in token_sublayers}
        self.token_count = {s: torch.zeros(vocab_size, dtype=torch.float64) for s in token_sublayers}

    @torch.no_grad()
    def update(self, i, x, idx=None):
        v = x[..., self.dim].detach().abs().double().cpu()     # (B, T)
        self.pos_sum[i, :v.shape[1]] += v.sum(0)
        self.n_seqs[i] += v.shape[0]
        if i in self.token_sum and idx is not None:
            ids = idx[:, 1:].reshape(-1).cpu()
            self.token_sum[i].index_add_(0, ids, v[:, 1:].reshape(-1))
            self.token_count[i].index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))

    def position_mean(self):
        return (self.pos_sum / self.n_seqs.clamp_min(1)[:, None]).numpy()


# ----------------------------------------------------------------------------------------------
# Metrics: the passes over the windows, and the delimiter check

@torch.inference_mode()
def mean_loss(model, batch_iter, hook=None):
    total, count = 0.0, 0
    for x, y in batch_iter:
        _, loss, _ = model(x, y, stream_hook=hook)
        total += float(loss) * y.numel()
        count += y.numel()
    return total / count


def collect_stream_stats(model, batch_fn):
    """Pass 1: every statistic of every stream, and the unmodified val loss on these windows."""
    cfg = model.config
    stats = {name: StreamStats(2 * cfg.n_layer, cfg.n_embd) for name in measured_streams(cfg)}

    def hook(i, kind, streams):
        for name, s in stats.items():
            s.update(i, stream_tensor(streams, name))

    return stats, mean_loss(model, batch_fn(), hook)


@torch.inference_mode()
def collect_dominant_profiles(model, batch_fn, stats, seq_len, token_sublayers):
    """Pass 2: per (sublayer, position) |x_dom| for each stream; per token for the decoded one."""
    cfg = model.config
    L, decoded = 2 * cfg.n_layer, cfg.decoded_stream
    profiles, current = {}, {}
    for name, s in stats.items():
        extra = (cfg.vocab_size, token_sublayers) if name == decoded else (0, ())
        profiles[name] = DominantDimProfile(L, seq_len, s.dominant_dim(), *extra)

    def hook(i, kind, streams):
        for name, p in profiles.items():
            p.update(i, stream_tensor(streams, name), current["idx"])

    for x, _ in batch_fn():
        current["idx"] = x
        model(x, stream_hook=hook)
    return profiles


def is_delimiter(text):
    return text != "" and all(c in string.whitespace + string.punctuation for c in text)


def top_token_report(profile, stats, sublayer, sublayer_name, decode, k, min_count):
    """Trap (2): on which tokens, outside position 0, is the dominant dimension largest? If a
    delimiter (space, newline, period, ...) carries it about as strongly as position 0 does, it is a
    delimiter feature, not a start-token outlier."""
    total, count = profile.token_sum[sublayer], profile.token_count[sublayer]
    mean = (total / count.clamp_min(1)).numpy()
    candidates = np.flatnonzero(count.numpy() >= min_count)
    ranked = candidates[np.argsort(-mean[candidates], kind="stable")][:200]
    pos0 = float(stats.mean_abs_pos0()[sublayer, profile.dim])

    def entry(t):
        try:
            text = decode([int(t)])
        except Exception:   # e.g. a padded vocab id the tokenizer does not know
            text = f"<{int(t)}>"
        # repr() makes spaces and newlines visible in the report
        return {"id": int(t), "text": repr(text), "delimiter": is_delimiter(text), "mean_abs": float(mean[t]),
                "count": int(count[t]), "ratio_to_pos0": float(mean[t] / max(pos0, 1e-30))}

    tokens = [entry(t) for t in ranked[:k]]
    delimiter = next((e for e in map(entry, ranked) if e["delimiter"]), None)
    top = tokens[0] if tokens else None
    if top is None or top["ratio_to_pos0"] < SHARED_FRACTION:
        verdict = "start-token specific: no frequent token reaches half of position 0's magnitude"
    elif top["delimiter"]:
        verdict = (f"delimiter feature: the delimiter {top['text']} carries it at {top['ratio_to_pos0']:.2f}x "
                   f"position 0's magnitude, so it is not a start-token outlier")
    else:
        also = (f", the delimiter {delimiter['text']} at {delimiter['ratio_to_pos0']:.2f}x"
                if delimiter and delimiter["ratio_to_pos0"] >= SHARED_FRACTION else "")
        verdict = (f"not start-token specific: {top['text']} carries it at {top['ratio_to_pos0']:.2f}x{also} "
                   f"of position 0's magnitude")
    shared = bool(delimiter and delimiter["ratio_to_pos0"] >= SHARED_FRACTION)
    return {"dim": profile.dim, "sublayer": sublayer, "sublayer_name": sublayer_name, "pos0_mean_abs": pos0,
            "tokens": tokens, "largest_delimiter": delimiter, "delimiter_shares_feature": shared,
            "max_ratio_to_pos0": top["ratio_to_pos0"] if top else 0.0, "verdict": verdict}


# ----------------------------------------------------------------------------------------------
# Extreme-token phenomena: attention sink, value drain, residual peak (Guo et al. 2024)
#
# Guo et al. (2024, "Active-Dormant Attention Heads") see three faces of one mechanism on the first
# token. A head with nothing to do in this context parks its attention there (attention sink); the
# value it lands on is small, so parking adds almost nothing to the output (value drain); and the
# token's residual state grows a large norm (residual-state peak), which makes it easy to find. The
# first two are per attention head and live here; the third is per stream and sublayer and lives in
# StreamStats ("residual_peak"), as one more running norm sum.
#
# The attention kinds (ledger.ATTENTIONS) change what a head with nothing to do can do instead, and
# so what is measured beside the sink:
#   softmax, gated  weights sum to 1 over positions 0..t: a uniform query puts 1/(q+1) on position 0;
#   attn_bias       they sum to 1 over the learned key k' and positions 0..t: the weight on k' (the
#                   explicit sink) is kept apart from the weight on position 0, and uniform is 1/(q+2);
#   sigmoid         each weight stands alone and a row may sum to anything, so a head can attend to
#                   nothing: its total weight (mass) is reported, and the no-sink level of position 0
#                   is the head's own mass spread evenly over its q+1 keys (for softmax that mass is 1,
#                   which gives 1/(q+1) again);
#   gated           the gate sigmoid(W_g u) on each head's output: a closed gate is this kind's no-op,
#                   as a sink is softmax's, so its mean at position 0 and elsewhere is reported.
# The weights come from CausalSelfAttention.attention_weights, next to the forward they must agree with.

class ExtremeTokenStats:
    """Running float64 sums per (layer, head) over windows. Query 0 can attend only to key 0, so the
    sink averages over queries 1..T-1; the drain compares position 0's value norm with theirs."""

    def __init__(self, n_layer, n_head, attention="softmax"):
        L, H, f64 = n_layer, n_head, torch.float64
        self.attention = attention
        self.sink_sum = torch.zeros(L, H, dtype=f64)             # attention weight on key 0
        self.uniform_sink_sum = torch.zeros(L, dtype=f64)        # ... had every query attended evenly
        self.value_norm_pos0_sum = torch.zeros(L, H, dtype=f64)
        self.value_norm_later_sum = torch.zeros(L, H, dtype=f64)  # positions 1..T-1
        self.n_seqs = torch.zeros(L, dtype=f64)
        self.n_later = torch.zeros(L, dtype=f64)                  # windows x (T - 1)
        if attention == "attn_bias":
            self.explicit_sink_sum = torch.zeros(L, H, dtype=f64)  # weight on k', queries 1..T-1
            self.later_sum = torch.zeros(L, H, dtype=f64)          # ... on positions 1..t: the rest
            self.sink_value_norm = torch.zeros(L, H, dtype=f64)    # |v'|, a parameter: not summed
        elif attention == "sigmoid":
            self.mass_sum = torch.zeros(L, H, dtype=f64)           # each query's total weight
            self.even_share_sum = torch.zeros(L, H, dtype=f64)     # ... over its q+1 keys
        elif attention == "gated":
            self.gate_pos0_sum = torch.zeros(L, H, dtype=f64)      # mean gate over a head's dims
            self.gate_later_sum = torch.zeros(L, H, dtype=f64)

    def state_nbytes(self):
        return sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, torch.Tensor))

    @torch.no_grad()
    def update(self, layer, weights, v, sink_weight=None, sink_value=None, gate=None):
        """weights (B, H, T, T) and values (B, H, T, d) of one layer; for attn_bias also the weight on
        k' (B, H, T) and v' (1, H, 1, d); for gated the gate (B, H, T, d) (see ledger.AttentionWeights)."""
        B, H, T, _ = weights.shape
        f64 = torch.float64
        self.sink_sum[layer] += weights[:, :, 1:, 0].sum((0, 2), dtype=f64).cpu()
        extra_keys = 1 if self.attention == "attn_bias" else 0   # k' is one more key every query sees
        self.uniform_sink_sum[layer] += B * (1.0 / (torch.arange(2, T + 1, dtype=f64) + extra_keys)).sum()
        norms = v.norm(dim=-1)                                    # (B, H, T)
        self.value_norm_pos0_sum[layer] += norms[:, :, 0].sum(0, dtype=f64).cpu()
        self.value_norm_later_sum[layer] += norms[:, :, 1:].sum((0, 2), dtype=f64).cpu()
        self.n_seqs[layer] += B
        self.n_later[layer] += B * (T - 1)
        if self.attention == "attn_bias":
            self.explicit_sink_sum[layer] += sink_weight[:, :, 1:].sum((0, 2), dtype=f64).cpu()
            self.later_sum[layer] += weights[:, :, 1:, 1:].sum((0, 2, 3), dtype=f64).cpu()
            self.sink_value_norm[layer] = sink_value.detach().norm(dim=-1).reshape(H).double().cpu()
        elif self.attention == "sigmoid":
            mass = weights[:, :, 1:].sum(-1, dtype=f64)           # (B, H, T-1), queries 1..T-1
            n_keys = torch.arange(2, T + 1, dtype=f64, device=mass.device)
            self.mass_sum[layer] += mass.sum((0, 2)).cpu()
            self.even_share_sum[layer] += (mass / n_keys).sum((0, 2)).cpu()
        elif self.attention == "gated":
            g = gate.mean(-1, dtype=f64)                          # (B, H, T)
            self.gate_pos0_sum[layer] += g[:, :, 0].sum(0).cpu()
            self.gate_later_sum[layer] += g[:, :, 1:].sum((0, 2)).cpu()

    def summarize(self):
        n_later = self.n_later.clamp_min(1)[:, None]
        sink = (self.sink_sum / n_later).numpy()
        value_later = (self.value_norm_later_sum / n_later).clamp_min(1e-30)
        drain = (self.value_norm_pos0_sum / self.n_seqs.clamp_min(1)[:, None] / value_later).numpy()
        drained = np.unravel_index(drain.argmin(), drain.shape)
        if self.attention == "sigmoid":
            # Each head has its own no-sink level, so the strongest sink is the largest excess over it
            # (a ratio would crown a head that attends to almost nothing), and "over half" is of the
            # head's own total weight.
            uniform = (self.even_share_sum / n_later).numpy()
            strongest = np.unravel_index((sink - uniform).argmax(), sink.shape)
            baseline = float(uniform[strongest])
            over_half = int((self.sink_sum / self.mass_sum.clamp_min(1e-30) > 0.5).sum())
        else:
            # uniform causal attention already puts mean(1 / (q + 1)) on key 0: the no-sink level
            strongest = np.unravel_index(sink.argmax(), sink.shape)
            baseline = float(self.uniform_sink_sum[0] / n_later[0, 0])
            over_half = int((sink > 0.5).sum())
        out = {
            "sink_per_layer_head": sink.tolist(),
            "sink_uniform_baseline": baseline,
            "sink_max": float(sink[strongest]), "sink_max_layer_head": [int(i) for i in strongest],
            "sink_heads_over_half": over_half,
            "value_drain_per_layer_head": drain.tolist(),
            "value_drain_min": float(drain.min()), "value_drain_min_layer_head": [int(i) for i in drained],
            # a sink is a no-op only if the value it lands on is drained: read the two together
            "value_drain_at_sink_max": float(drain[strongest]),
            "attention": self.attention,
        }
        if self.attention == "attn_bias":
            explicit = (self.explicit_sink_sum / n_later).numpy()
            top = np.unravel_index(explicit.argmax(), explicit.shape)
            value_drain = (self.sink_value_norm / value_later).numpy()
            out.update({
                "explicit_sink_per_layer_head": explicit.tolist(),
                "later_positions_per_layer_head": (self.later_sum / n_later).numpy().tolist(),
                "explicit_sink_max": float(explicit[top]), "explicit_sink_max_layer_head": [int(i) for i in top],
                "sink_at_explicit_sink_max": float(sink[top]),
                "explicit_sink_heads_over_half": int((explicit > 0.5).sum()),
                # |v'| over the mean |v| of positions >= 1: the explicit sink's own value drain
                "explicit_sink_value_drain_per_layer_head": value_drain.tolist(),
                "explicit_sink_value_drain_at_max": float(value_drain[top]),
            })
        elif self.attention == "sigmoid":
            mass = (self.mass_sum / n_later).numpy()
            lightest = np.unravel_index(mass.argmin(), mass.shape)
            out.update({
                "sink_uniform_baseline_per_layer_head": uniform.tolist(),
                "attention_mass_per_layer_head": mass.tolist(),
                "attention_mass_min": float(mass[lightest]),
                "attention_mass_min_layer_head": [int(i) for i in lightest],
                "attention_mass_at_sink_max": float(mass[strongest]),
            })
        elif self.attention == "gated":
            pos0 = (self.gate_pos0_sum / self.n_seqs.clamp_min(1)[:, None]).numpy()
            later = (self.gate_later_sum / n_later).numpy()
            closed = np.unravel_index(later.argmin(), later.shape)
            out.update({
                "gate_pos0_per_layer_head": pos0.tolist(), "gate_later_per_layer_head": later.tolist(),
                "gate_pos0_mean": float(pos0.mean()), "gate_later_mean": float(later.mean()),
                "gate_later_min": float(later[closed]), "gate_later_min_layer_head": [int(i) for i in closed],
                "gate_pos0_at_later_min": float(pos0[closed]),
                "gate_later_at_sink_max": float(later[strongest]),
            })
        return out


@contextlib.contextmanager
def collect_extreme_tokens(model):
    """Rides along another pass, so it costs no extra forward: a pre-hook on every attention module
    recomputes that layer's weights and values and reduces them to per-head sums at once, so no
    (B, H, T, T) tensor outlives its layer."""
    attns = [sub.fn for sub in model.sublayers if sub.kind == "attn"]
    extreme = ExtremeTokenStats(len(attns), model.config.n_head, model.config.attention)

    def hook_for(layer):
        def hook(attn, args):
            a = attn.attention_weights(args[0])
            extreme.update(layer, a.weights, a.values, a.sink_weight, a.sink_value, a.gate)
        return hook

    handles = [attn.register_forward_pre_hook(hook_for(layer)) for layer, attn in enumerate(attns)]
    try:
        yield extreme
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------------------------
# Interventions (after Sun et al.): does the model need the outlier? And does it break quantization?

def position0_hook(config, stats, dim, start, mode):
    """Set x[:, 0, dim] of the decoded stream to 0 or to its mean at each sublayer >= start. For
    hc2 the decoded channel is h0 + h1: zero both, or set each stream to its own mean (so the sum
    takes its mean). Ledger's decoded stream is C: D is left alone."""
    targets = ("h0", "h1") if config.residual == "hc2" else (config.decoded_stream,)
    means = {name: stats[name].mean_pos0()[:, dim] for name in targets}

    def hook(i, kind, streams):
        if i < start:
            return None
        replaced = {}
        for name in targets:
            x = streams[name].clone()
            x[:, 0, dim] = 0.0 if mode == "zero" else float(means[name][i])
            replaced[name] = x
        return replaced
    return hook


def run_interventions(model, batch_fn, stats, summary, baseline, seed):
    cfg = model.config
    dom, start = summary["dominant_dim"], summary["emergence_sublayer"]
    if start is None:
        return {"skipped": "the dominant dim is never the top dim of a full-norm sublayer"}
    others = [d for d in range(cfg.n_embd) if d != dom]
    control = others[int(torch.randint(len(others), (1,), generator=torch.Generator().manual_seed(seed)))]
    out = {"stream": cfg.decoded_stream, "position": 0, "dim": dom, "control_dim": control,
           "from_sublayer": start, "from_sublayer_name": model.sublayer_names[start], "baseline_loss": baseline}
    for label, dim in (("", dom), ("control_", control)):
        for mode in ("zero", "mean"):
            loss = mean_loss(model, batch_fn(), position0_hook(cfg, stats, dim, start, mode))
            out[f"{label}{mode}_loss"] = loss
            out[f"{label}{mode}_delta"] = loss - baseline
    return out


@torch.no_grad()
def fake_quantize_weights(model, bits):
    """A copy of the model with every nn.Linear weight (the LM head and the gates included; not the
    embeddings, not the norms) rounded per output channel, symmetric, round-to-nearest. An outlier
    dimension inflates the per-channel scale of the weights that read it; that is how it hurts."""
    quantized = copy.deepcopy(model)
    qmax = 2 ** (bits - 1) - 1
    for module in quantized.modules():
        if isinstance(module, nn.Linear):
            w = module.weight
            scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
            w.copy_((w / scale).round().clamp(-qmax, qmax) * scale)
    return quantized


def run_quantization(model, batch_fn, baseline):
    out = {"scheme": "weight-only, per-output-channel symmetric round-to-nearest, all nn.Linear weights",
           "baseline_loss": baseline}
    for bits in (8, 4):
        out[f"w{bits}_loss"] = mean_loss(fake_quantize_weights(model, bits), batch_fn())
        out[f"w{bits}_delta"] = out[f"w{bits}_loss"] - baseline
    return out


# ----------------------------------------------------------------------------------------------
# Ledger's two streams: how much D commits to C, how large C is beside D, whose outlier C carries

@torch.inference_mode()
def mean_commit_gates(model, batch_iter):
    """The mean commit gate of each sublayer over the windows (the forward's third output is its
    mean over one batch's tokens): one plain forward pass per batch, no hooks."""
    total, count = 0.0, 0
    for x, _ in batch_iter:
        _, _, gates = model(x)
        total = total + gates.double().cpu() * len(x)
        count += len(x)
    return (total / count).tolist()


def ledger_stream_report(model, batch_fn, summaries):
    """Beside C's outlier, the numbers that say what C is: the commit gates (how much of D reaches
    C), ||C|| / ||D|| at the last sublayer (mean token norms), ||C|| at position 0 and elsewhere,
    and whether C's dominant dimension is D's (C inherits D's outlier rather than building one)."""
    gates = mean_commit_gates(model, batch_fn())
    C, D = summaries["C"], summaries["D"]
    return {
        "commit_gate_per_sublayer": gates, "commit_gate_mean": float(np.mean(gates)),
        "C_over_D_norm_final": C["mean_norm_per_sublayer"][-1] / max(D["mean_norm_per_sublayer"][-1], 1e-30),
        "C_norm_pos0_final": C["mean_norm_pos0_per_sublayer"][-1],
        "C_norm_later_final": C["mean_norm_later_per_sublayer"][-1],
        "C_dominant_dim": C["dominant_dim"], "D_dominant_dim": D["dominant_dim"],
        "C_carries_D_dim": C["dominant_dim"] == D["dominant_dim"],
    }


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
    and which of them compare one stream with another (StreamStats.summarize_normalized)."""
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


def across_seeds_table(results):
    """One row per arm measured more than once (seeds): mean [min, max] of the headline numbers, so
    that a claim about an arm rests on every run of it, not on the best one."""
    by_arch = {}   # an arm trained with another attention kind or optimizer is another row
    for m in results:
        arm = arm_name(m["arch"], m.get("attention", "softmax"))
        by_arch.setdefault(arm + ("" if m.get("optimizer", "adamw") == "adamw" else f" + {m['optimizer']}"),
                           []).append(m)
    columns = {
        "val loss": lambda m, s: m["measured_val_loss"],
        "pos-0 ratio (peak)": lambda m, s: s["peak_pos0_ratio"],
        "start-token conc. (peak)": lambda m, s: s["start_token_concentration_peak"],
        "start-token conc. (released)": lambda m, s: s["released_definitions"]["start_token_concentration"],
        "residual peak": lambda m, s: s["residual_peak"]["max"],
        "sink max": lambda m, s: m["extreme_tokens"]["sink_max"],
        "Δloss, zero pos-0 dom dim": lambda m, s: (m.get("interventions") or {}).get("zero_delta"),
        "Δloss, mean pos-0 dom dim": lambda m, s: (m.get("interventions") or {}).get("mean_delta"),
    }
    rows = []
    for arch, runs in by_arch.items():
        if len(runs) < 2:
            continue
        row = [arch, str(len(runs))]
        for get in columns.values():
            values = [get(m, m["streams"][m["decoded_stream"]]) for m in runs]
            values = [v for v in values if v is not None]
            spec = ".3f" if max(map(abs, values), default=0) < 10 else ".0f"
            row.append(f"{np.mean(values):{spec}} [{min(values):{spec}}, {max(values):{spec}}]" if values else "—")
        rows.append(row)
    return markdown_table(["arm", "runs", *columns], rows) if rows else ""


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
    top_tokens = {where: top_token_report(profiles[decoded], stats[decoded], i, names[i], data.decode,
                                          cfg.top_tokens, cfg.min_token_count)
                  for where, i in (("last", last), ("peak", peak))}
    if peak == last:
        top_tokens.pop("peak")
    lap("dominant_profile_s")
    interventions = None
    if cfg.interventions:
        interventions = run_interventions(model, batch_fn, stats, summaries[decoded], baseline, cfg.seed)
    lap("interventions_s")
    quantization = run_quantization(model, batch_fn, baseline) if cfg.quantization else None
    lap("quantization_s")
    ledger_streams = ledger_stream_report(model, batch_fn, summaries) if model.config.residual == "ledger" else None
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


def run(paths, cfg):
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
    text = (f"# Residual-stream structure ({cfg.split} split, {cfg.num_windows} {windows} of "
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
    if train.wants_help(argv):
        print(train.help_text(__doc__, MeasureConfig))
        return []
    try:
        paths, cfg = parse_args(argv)
        return run_trajectory(paths, cfg) if cfg.trajectory else run(paths, cfg)
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
                         fmt(r["zero_delta"], "+.3f"), " ".join(f"{g:.2f}" for g in gates) if gates else "—",
                         fmt(r["C_over_D_norm_final"], ".2f"),
                         "—" if r["C_carries_D_dim"] is None else ("yes" if r["C_carries_D_dim"] else "no")])
    return markdown_table(["run", "iter", "val loss", "decoded, dom dim", "pos-0 ratio", "start-token conc.",
                           "conc., released", "conc., normalised", "sink max", "residual peak",
                           "Δloss, dim zeroed at pos 0", "commit gate per sublayer", "‖C‖ / ‖D‖ (last)",
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


def run_trajectory(paths, cfg):
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
        trajectories[name] = {"run_dir": os.path.abspath(run_dir), "arch": arch, "rows": rows}
    os.makedirs(out_root, exist_ok=True)
    with open(os.path.join(out_root, "trajectory.json"), "w") as f:
        json.dump(jsonable({"settings": dataclasses.asdict(cfg), "runs": trajectories}), f, indent=1, allow_nan=False)
    if cfg.figures:
        plot_trajectory(trajectories, os.path.join(out_root, "trajectory.png"))
    text = (f"# Trajectory: every kept snapshot ({cfg.split} split, {cfg.num_windows} windows, seed {cfg.seed})\n\n"
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
