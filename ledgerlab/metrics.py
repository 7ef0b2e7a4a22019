"""
The paper's metrics, each defined once; measure.py runs them over checkpoints and writes the report.

A massive activation (Sun et al. 2024) is a fixed hidden dimension of the residual stream, 100-1000x
the median magnitude, concentrated on the first token. Every stream the forward pass carries is
reduced at every sublayer output to running float64 sums over the windows, and from those, in order:

  ratio            the top dimension's mean |x| over the median dimension's; the pos-0 ratio is the
                   dominant dimension's at position 0 alone, which is how the paper states a size
  concentration    the dominant dimension's mean |x| at position 0 over positions 1..T-1 (the released
                   code's: over all positions, position 0 included, so it never exceeds T)
  peak             the sublayer where the ratio is largest, among those with >= 25% of the final norm
  kurtosis         excess kurtosis over the dimensions of a token (0 for a Gaussian)
  Sun layer-wise   per window, the top-1, top-2, top-3 and median |x| of the sublayer's whole output,
                   every token and dimension (Sun et al.'s Table 1 and Figure 2), and top-1 over median
  Sun-massive      entries with |x| > 100 and >= 1000x that window median (Sun et al.'s rule); over
                   each token's own median instead, a token whose whole vector grows hides its outlier
  residual peak    position 0's L2 norm over the mean norm of later positions (Guo et al. 2024)
  released         the released code's definitions: peak over all sublayers, kurtosis as the max
  normalised       pos-0 ratio, concentration and residual peak after x / rms(x), as a norm reads it:
                   the same sums over a second StreamStats, fed x / rms(x)
  top tokens       the tokens off position 0 that carry the dominant dimension: a delimiter feature?
  sink             per head, the attention weight that queries 1..T-1 put on position 0
  value drain      per head, |v| at position 0 over the mean |v| later: small makes a sink a no-op
  zeroing cost     val loss with the dominant dimension at position 0 zeroed, or set to its mean
  w8, w4           val loss after weight-only round-to-nearest quantization
  Ledger streams   the commit gates, ||C|| / ||D||, and whether C's dominant dimension is D's
"""
import contextlib
import copy
import string
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

NORM_FRACTION = 0.25     # a sublayer counts for "peak" only if its stream norm is >= 25% of the final
SUN_ABS, SUN_REL = 100.0, 1000.0   # Sun et al.: massive if |x| > 100 and |x| >= 1000 x the window median
SUN_RULE = (f"|x| > {SUN_ABS:g} and |x| >= {SUN_REL:g} x the median |x| of the sublayer's whole output for that "
            f"window, every token and dimension (Sun et al. 2024)")
SHARED_FRACTION = 0.5    # a token whose mean |x_dom| is >= half of position 0's shares the feature
RMS_EPS = 1e-6           # ledger.RMSNorm's eps: the per-token normalised metrics divide as it does


# ----------------------------------------------------------------------------------------------
# The streams: every one the forward pass carries, and for hc2 the sum that is decoded

def measured_streams(config):
    """Every stream the forward pass carries; for hc2 also their sum, which is what is decoded."""
    return config.stream_names + (("h0+h1",) if config.residual == "hc2" else ())


def stream_tensor(streams, name):
    return streams["h0"] + streams["h1"] if name == "h0+h1" else streams[name]


# ----------------------------------------------------------------------------------------------
# Statistics: running sums over batches, so memory never grows with the number of windows

def lower_median(a):
    """torch.median over the last dimension, the lower middle value when the count is even, as Sun et
    al.'s code takes it. On a CPU numpy's partition finds the same value several times faster, which
    keeps the statistics pass near the cost of a plain forward pass."""
    if a.is_cuda:
        return a.median(dim=-1).values
    k = (a.shape[-1] - 1) // 2
    return torch.from_numpy(np.partition(a.numpy(), k, axis=-1)[..., k])


class StreamStats:
    """Running float64 sums for one stream over all sublayers. Each update reduces a (B, T, D)
    activation to per-dimension and per-sublayer vectors at once; nothing scales with batches."""

    def __init__(self, n_sublayers, dim, raw=True):
        L, f64 = n_sublayers, torch.float64
        self.abs_sum = torch.zeros(L, dim, dtype=f64)          # sum |x| per dim, all positions
        self.abs_sum_pos0 = torch.zeros(L, dim, dtype=f64)     # ... at position 0 only
        self.sum_pos0 = torch.zeros(L, dim, dtype=f64)         # signed, for the mean intervention
        self.n_tokens = torch.zeros(L, dtype=f64)
        self.n_seqs = torch.zeros(L, dtype=f64)
        self.layer_top_sum = torch.zeros(L, 3, dtype=f64)      # per window top-1/2/3 |x| (Sun et al.)
        self.layer_median_sum = torch.zeros(L, dtype=f64)      # per window median |x|
        self.sun_count = torch.zeros(L, dtype=torch.int64)     # Sun et al.'s massive entries
        self.sun_count_pos0 = torch.zeros(L, dtype=torch.int64)
        self.kurtosis_sum = torch.zeros(L, dtype=f64)          # excess kurtosis over dims, per token
        self.ratio_sum = torch.zeros(L, dtype=f64)             # per token max |x| / the token's median |x|
        self.ratio_max = torch.zeros(L, dtype=f64)
        self.per_token_count = torch.zeros(L, dtype=torch.int64)   # Sun's rule over the token's median
        self.per_token_count_pos0 = torch.zeros(L, dtype=torch.int64)
        self.norm_sum = torch.zeros(L, dtype=f64)              # per token L2 norm
        self.norm_sum_pos0 = torch.zeros(L, dtype=f64)         # ... at position 0 only (residual peak)
        self.max_abs = torch.zeros(L, dtype=f64)
        # The same sums over x / rms(x), each token's own scale divided out: what an RMSNorm that
        # reads this stream sees (the head's for C; every sublayer's and the head's for h). A token's
        # shape (top-k over median, kurtosis) does not change when it is divided by its own scale, so
        # that copy keeps only the per-dimension sums and norms.
        self.normalized = StreamStats(L, dim, raw=False) if raw else None

    def state_nbytes(self):
        own = sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, torch.Tensor))
        return own + (self.normalized.state_nbytes() if self.normalized else 0)

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
        norms = x.norm(dim=-1)
        self.norm_sum[i] += norms.sum(dtype=f64).cpu()
        self.norm_sum_pos0[i] += norms[:, 0].sum(dtype=f64).cpu()
        if self.normalized is None:
            return
        self.normalized.update(i, torch.nn.functional.rms_norm(x, (D,), eps=RMS_EPS))
        # Sun et al.'s code (main_llm.py) takes, per sequence, torch.median(feat_abs) of the layer's whole
        # output, every token and dimension: over T x D entries, the lower middle value when that is even
        window = a.reshape(B, T * D)
        window_top, window_median = window.topk(3, dim=-1).values, lower_median(window)   # (B, 3), (B,)
        token_median = lower_median(a)   # (B, T)
        ratio = a.amax(-1) / token_median.clamp_min(1e-30)
        centred = x - x.mean(-1, keepdim=True)
        var = centred.pow(2).mean(-1)
        kurtosis = centred.pow(4).mean(-1) / var.pow(2).clamp_min(1e-30) - 3.0
        large = a > SUN_ABS
        massive = large & (a >= SUN_REL * window_median[:, None, None])
        per_token = large & (a >= SUN_REL * token_median[..., None])
        self.layer_top_sum[i] += window_top.sum(0, dtype=f64).cpu()
        self.layer_median_sum[i] += window_median.sum(dtype=f64).cpu()
        self.sun_count[i] += int(massive.sum())
        self.sun_count_pos0[i] += int(massive[:, 0].sum())
        self.kurtosis_sum[i] += kurtosis.sum(dtype=f64).cpu()
        self.ratio_sum[i] += ratio.sum(dtype=f64).cpu()
        self.ratio_max[i] = torch.maximum(self.ratio_max[i], ratio.max().double().cpu())
        self.per_token_count[i] += int(per_token.sum())
        self.per_token_count_pos0[i] += int(per_token[:, 0].sum())
        self.max_abs[i] = torch.maximum(self.max_abs[i], window_top[:, 0].max().double().cpu())

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

    def ratios(self, dom):
        """The per-sublayer ratios of this stream for dimension `dom` (see SublayerRatios)."""
        mean_abs, pos0, rest = self.mean_abs(), self.mean_abs_pos0(), self.mean_abs_rest()
        n, n_seqs = self.n_tokens.numpy(), self.n_seqs.numpy()
        norm_pos0 = self.norm_sum_pos0.numpy() / n_seqs
        norm_later = (self.norm_sum.numpy() - self.norm_sum_pos0.numpy()) / np.maximum(n - n_seqs, 1)
        return SublayerRatios(
            ratio=mean_abs.max(1) / np.maximum(np.median(mean_abs, 1), 1e-30),
            pos0_ratio=pos0[:, dom] / np.maximum(np.median(pos0, 1), 1e-30),
            concentration=pos0[:, dom] / np.maximum(rest[:, dom], 1e-30),
            concentration_all=pos0[:, dom] / np.maximum(mean_abs[:, dom], 1e-30),
            norm=self.norm_sum.numpy() / n, norm_pos0=norm_pos0, norm_later=norm_later,
            residual_peak=norm_pos0 / np.maximum(norm_later, 1e-30))

    def summarize(self, sublayer_names=None):
        """The paper's structure metrics for this stream (see the module docstring; metrics_json.py
        lists every key)."""
        mean_abs, n = self.mean_abs(), self.n_tokens.numpy()
        names = sublayer_names or [str(i) for i in range(mean_abs.shape[0])]
        dom = self.dominant_dim()
        top_dim = mean_abs.argmax(1)
        r = self.ratios(dom)
        # Trap (1): C is nearly empty early on, so a ratio over its tiny median looks huge there.
        # Only sublayers whose stream norm reaches NORM_FRACTION of the final norm compete for the peak.
        eligible = r.norm >= NORM_FRACTION * r.norm[-1]
        peak = int(np.where(eligible, r.ratio, -np.inf).argmax())
        emerged = np.flatnonzero(eligible & (top_dim == dom))
        # The residual peak's max uses the same eligible sublayers as the ratio's peak.
        top_peak = int(np.where(eligible, r.residual_peak, -np.inf).argmax())
        n_seqs = self.n_seqs.numpy()
        top, median = self.layer_top_sum.numpy() / n_seqs[:, None], self.layer_median_sum.numpy() / n_seqs
        # the ratio of the two means, as a reader of Sun et al.'s Table 1 divides its columns
        top_over_median = top[:, 0] / np.maximum(median, 1e-30)
        kurtosis = self.kurtosis_sum.numpy() / n
        released = released_definitions(self, dom, names)
        return {
            "dominant_dim": dom,
            "persistence": float((top_dim == dom).mean()),
            "top_dim_per_sublayer": top_dim.tolist(),
            "emergence_sublayer": int(emerged[0]) if len(emerged) else None,
            "eligible_per_sublayer": eligible.tolist(),
            "peak_sublayer": peak, "peak_sublayer_name": names[peak],
            "peak_ratio": float(r.ratio[peak]), "final_ratio": float(r.ratio[-1]),
            "ratio_per_sublayer": r.ratio.tolist(),
            "peak_pos0_ratio": float(r.pos0_ratio[peak]), "final_pos0_ratio": float(r.pos0_ratio[-1]),
            "pos0_ratio_per_sublayer": r.pos0_ratio.tolist(),
            "start_token_concentration_peak": float(r.concentration[peak]),
            "start_token_concentration_final": float(r.concentration[-1]),
            "start_token_concentration_per_sublayer": r.concentration.tolist(),
            "dominant_mean_abs_pos0_per_sublayer": self.mean_abs_pos0()[:, dom].tolist(),
            "dominant_mean_abs_rest_per_sublayer": self.mean_abs_rest()[:, dom].tolist(),
            "top5_dims_at_peak": [[int(d), float(mean_abs[peak, d])] for d in np.argsort(-mean_abs[peak])[:5]],
            "mean_norm_per_sublayer": r.norm.tolist(),
            "layer_top1_per_sublayer": top[:, 0].tolist(), "layer_top2_per_sublayer": top[:, 1].tolist(),
            "layer_top3_per_sublayer": top[:, 2].tolist(), "layer_median_per_sublayer": median.tolist(),
            "top1_over_layer_median_per_sublayer": top_over_median.tolist(),
            "peak_top1_over_layer_median": float(top_over_median[peak]),
            "kurtosis_per_sublayer": kurtosis.tolist(),
            "kurtosis_peak": float(kurtosis[peak]), "kurtosis_final": float(kurtosis[-1]),
            "token_max_median_ratio_mean_per_sublayer": (self.ratio_sum.numpy() / n).tolist(),
            "token_max_median_ratio_max_per_sublayer": self.ratio_max.tolist(),
            "max_abs_per_sublayer": self.max_abs.tolist(),
            "sun_massive_count_per_sublayer": self.sun_count.tolist(),
            "sun_massive_count_total": int(self.sun_count.sum()),
            "sun_massive_count_pos0": int(self.sun_count_pos0.sum()),
            "per_token_median_massive_count_per_sublayer": self.per_token_count.tolist(),
            "per_token_median_massive_count_total": int(self.per_token_count.sum()),
            "per_token_median_massive_count_pos0": int(self.per_token_count_pos0.sum()),
            "residual_peak": {"per_sublayer": r.residual_peak.tolist(), "max": float(r.residual_peak[top_peak]),
                              "max_sublayer": top_peak, "max_sublayer_name": names[top_peak],
                              "final": float(r.residual_peak[-1])},
            "released_definitions": released,
            "mean_norm_pos0_per_sublayer": r.norm_pos0.tolist(), "mean_norm_later_per_sublayer": r.norm_later.tolist(),
            "normalized": normalized_summary(self.normalized.ratios(dom), peak, released["concentration_sublayer"],
                                             eligible),
        }


@dataclass
class SublayerRatios:
    """Per sublayer (numpy arrays), for one dimension dom of a stream."""
    ratio: np.ndarray              # the top dimension's mean |x| over the median dimension's
    pos0_ratio: np.ndarray         # the same at position 0, of dom: how the paper states an outlier's
                                   # size ("~20x the median at position 0" for the precursor)
    concentration: np.ndarray      # dom's mean |x| at position 0 over positions 1..T-1
    concentration_all: np.ndarray  # ... over all positions, position 0 included (the released code's)
    norm: np.ndarray               # mean token L2 norm
    norm_pos0: np.ndarray          # ... at position 0
    norm_later: np.ndarray         # ... at positions 1..T-1
    # Residual-state peak (Guo et al. 2024): position 0's L2 norm over the mean of positions >= 1.
    # The whole vector can grow without any one dimension leaving the median behind, so the
    # per-dimension ratios can miss it.
    residual_peak: np.ndarray


def released_definitions(stats, dom, names):
    """The released code's definitions (its probe.py and analyze.py), from the same sums, for numbers
    comparable with the paper's: the peak ratio is the max over *all* sublayers (no norm filter); the
    start-token concentration divides position 0 by the mean over *all* positions, position 0
    included, at the sublayer where the dominant dim is largest on average; kurtosis is the max over
    sublayers. For a ratio r of ours at one sublayer theirs is T r / (r + T - 1), at most T."""
    r = stats.ratios(dom)
    dom_peak = int(stats.mean_abs()[:, dom].argmax())
    return {
        "peak_ratio": float(r.ratio.max()), "peak_sublayer": int(r.ratio.argmax()),
        "peak_sublayer_name": names[int(r.ratio.argmax())],
        "start_token_concentration": float(r.concentration_all[dom_peak]),
        "concentration_sublayer": dom_peak, "concentration_sublayer_name": names[dom_peak],
        "start_token_concentration_per_sublayer": r.concentration_all.tolist(),
        "kurtosis_max": float((stats.kurtosis_sum.numpy() / stats.n_tokens.numpy()).max()),
    }


def normalized_summary(r, peak, dom_peak, eligible):
    """The headline numbers of the normalised sums (StreamStats.normalized), for the same dimension
    and at the same sublayers as the raw ones beside them. A stream whose position 0 is simply larger
    than its other positions (Ledger's C while lam ~ 0: only the final norm reads it, and it divides
    the scale out) has a large raw concentration and residual peak but normalised ones near 1. The
    within-token pos-0 ratio hardly moves: it divides two dimensions of the same token. The
    normalised residual peak is ~1 by construction (every unit token has norm sqrt(D)) unless a
    token's RMS is so small (< ~1e-3) that the eps, as in the model's own norm, keeps it small."""
    return {
        "definition": f"x / sqrt(mean(x^2) + {RMS_EPS:g}) per token, as RMSNorm without its gain; the raw "
                      f"numbers' dominant dim and sublayers",
        "peak_ratio": float(r.ratio[peak]), "ratio_per_sublayer": r.ratio.tolist(),
        "peak_pos0_ratio": float(r.pos0_ratio[peak]), "pos0_ratio_per_sublayer": r.pos0_ratio.tolist(),
        "start_token_concentration_peak": float(r.concentration[peak]),
        "start_token_concentration_final": float(r.concentration[-1]),
        "start_token_concentration_per_sublayer": r.concentration.tolist(),
        "released_start_token_concentration": float(r.concentration_all[dom_peak]),
        "residual_peak": {"per_sublayer": r.residual_peak.tolist(), "max": float(r.residual_peak[eligible].max()),
                          "final": float(r.residual_peak[-1])},
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
# The passes over the windows, and the delimiter check

@torch.inference_mode()
def mean_loss(model, batch_iter, hook=None):
    """Val loss over the windows, weighted by tokens so that a short last batch counts for what it
    holds. The hook may replace streams: the interventions measure their cost through it."""
    total, count = 0.0, 0
    for x, y in batch_iter:
        _, loss, _ = model(x, y, stream_hook=hook)
        total += float(loss) * y.numel()
        count += y.numel()
    return total / count


def collect_stream_stats(model, batch_fn):
    """Pass 1: every statistic of every stream, and the unmodified val loss on these windows."""
    cfg = model.config
    stats = {name: StreamStats(len(model.sublayer_names), cfg.n_embd) for name in measured_streams(cfg)}

    def hook(i, kind, streams):
        for name, s in stats.items():
            s.update(i, stream_tensor(streams, name))

    return stats, mean_loss(model, batch_fn(), hook)


@torch.inference_mode()
def collect_dominant_profiles(model, batch_fn, stats, seq_len, token_sublayers):
    """Pass 2: per (sublayer, position) |x_dom| for each stream; per token for the decoded one."""
    cfg = model.config
    L, decoded = len(model.sublayer_names), cfg.decoded_stream
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
    """Whitespace and punctuation only: the tokens that separate, which in small text models can
    carry position 0's feature too."""
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
        return {**out, **self.summarize_kind(sink, strongest, n_later, value_later)}

    def summarize_kind(self, sink, strongest, n_later, value_later):
        """The attention kind's own numbers beside the sink: attn_bias's explicit sink, sigmoid's
        mass, gated attention's gate (none for softmax)."""
        if self.attention == "attn_bias":
            explicit = (self.explicit_sink_sum / n_later).numpy()
            top = np.unravel_index(explicit.argmax(), explicit.shape)
            value_drain = (self.sink_value_norm / value_later).numpy()
            return {
                "explicit_sink_per_layer_head": explicit.tolist(),
                "later_positions_per_layer_head": (self.later_sum / n_later).numpy().tolist(),
                "explicit_sink_max": float(explicit[top]), "explicit_sink_max_layer_head": [int(i) for i in top],
                "sink_at_explicit_sink_max": float(sink[top]),
                "explicit_sink_heads_over_half": int((explicit > 0.5).sum()),
                # |v'| over the mean |v| of positions >= 1: the explicit sink's own value drain
                "explicit_sink_value_drain_per_layer_head": value_drain.tolist(),
                "explicit_sink_value_drain_at_max": float(value_drain[top]),
            }
        if self.attention == "sigmoid":
            mass = (self.mass_sum / n_later).numpy()
            lightest = np.unravel_index(mass.argmin(), mass.shape)
            return {
                "sink_uniform_baseline_per_layer_head": (self.even_share_sum / n_later).numpy().tolist(),
                "attention_mass_per_layer_head": mass.tolist(),
                "attention_mass_min": float(mass[lightest]),
                "attention_mass_min_layer_head": [int(i) for i in lightest],
                "attention_mass_at_sink_max": float(mass[strongest]),
            }
        if self.attention == "gated":
            pos0 = (self.gate_pos0_sum / self.n_seqs.clamp_min(1)[:, None]).numpy()
            later = (self.gate_later_sum / n_later).numpy()
            closed = np.unravel_index(later.argmin(), later.shape)
            return {
                "gate_pos0_per_layer_head": pos0.tolist(), "gate_later_per_layer_head": later.tolist(),
                "gate_pos0_mean": float(pos0.mean()), "gate_later_mean": float(later.mean()),
                "gate_later_min": float(later[closed]), "gate_later_min_layer_head": [int(i) for i in closed],
                "gate_pos0_at_later_min": float(pos0[closed]),
                "gate_later_at_sink_max": float(later[strongest]),
            }
        return {}


def head_name(layer_head):
    """A (layer, head) as the tables and figures name it: L0H1."""
    return "L{}H{}".format(*layer_head)


def no_sink_level(e):
    """What the baseline beside a sink weight is, for this attention kind (e: ExtremeTokenStats.summarize())."""
    return {"attn_bias": "uniform over k' and positions",
            "sigmoid": f"sigmoid, unnormalised; no-sink level of {head_name(e['sink_max_layer_head'])}"}.get(
        e.get("attention", "softmax"), "uniform attention")


@contextlib.contextmanager
def collect_extreme_tokens(model):
    """Rides along another pass, so it costs no extra forward: a pre-hook on every attention module
    recomputes that layer's weights and values and reduces them to per-head sums at once, so no
    (B, H, T, T) tensor outlives its layer. A pretrained model (pretrained.py) hands over the
    weights and values its own attention computed."""
    extreme = ExtremeTokenStats(model.config.n_layer, model.config.n_head, model.config.attention)
    if hasattr(model, "attention_capture"):
        handles = model.attention_capture(lambda layer, weights, values: extreme.update(layer, weights, values))
    else:
        def hook_for(layer):
            def hook(attn, args):
                a = attn.attention_weights(args[0])
                extreme.update(layer, a.weights, a.values, a.sink_weight, a.sink_value, a.gate)
            return hook
        attns = [sub.fn for sub in model.sublayers if sub.kind == "attn"]
        handles = [attn.register_forward_pre_hook(hook_for(layer)) for layer, attn in enumerate(attns)]
    try:
        yield extreme
    finally:
        for handle in handles:
            handle.remove()


def where_written(pos0, sublayer_names):
    """Which sublayer writes a dimension at position 0 and which erases it, from its mean |x| there
    after each sublayer: the largest rise and the largest fall (the first sublayer's rise is from 0,
    as the embedding is small beside a massive activation). No fall: never erased."""
    step = np.diff(np.asarray(pos0, dtype=np.float64), prepend=0.0)
    written, erased = int(step.argmax()), int(step.argmin())
    falls = step[erased] < 0
    return {"written_at": written, "written_at_name": sublayer_names[written], "written_by": float(step[written]),
            "erased_at": erased if falls else None, "erased_at_name": sublayer_names[erased] if falls else None,
            "erased_by": float(-step[erased]) if falls else 0.0}


# ----------------------------------------------------------------------------------------------
# Interventions (after Sun et al.): does the model need the outlier? And does it break quantization?

def position0_hook(config, stats, dims, at, mode):
    """Set x[:, 0, d] of the decoded stream, for each d in dims, to 0 or to its mean at each sublayer
    in `at`. For hc2 the decoded channel is h0 + h1: zero both, or set each stream to its own mean (so
    the sum takes its mean). Ledger's decoded stream is C: D is left alone."""
    targets = ("h0", "h1") if config.residual == "hc2" else (config.decoded_stream,)
    means = {name: stats[name].mean_pos0() for name in targets}

    def hook(i, kind, streams):
        if i not in at:
            return None
        replaced = {}
        for name in targets:
            x = streams[name].clone()
            for d in dims:
                x[:, 0, d] = 0.0 if mode == "zero" else float(means[name][i, d])
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
    from_start = range(start, len(model.sublayer_names))
    for label, dim in (("", dom), ("control_", control)):
        for mode in ("zero", "mean"):
            loss = mean_loss(model, batch_fn(), position0_hook(cfg, stats, [dim], from_start, mode))
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


# Why the commit gates close. While lam (how much C feeds each sublayer's input) stays near 0, only
# the final RMSNorm reads C, and it divides out C's scale. A small gate is ~exp(its logit), so one
# shift of every commit logit scales all of C by ~e^shift: if that costs no loss, the sparsity
# penalty buys closed gates for free. Open gates (no penalty) are not in that regime, and a shift
# changes how much each sublayer contributes, which should cost loss.
COMMIT_SHIFTS = (-2.0, 2.0)


@torch.no_grad()
def commit_shift_cost(model, batch_fn, baseline):
    """{shift: val loss change} with the bias of every commit gate moved by shift."""
    biases = [m.commit_gate.bias for m in model.modules() if hasattr(m, "commit_gate")]
    kept = [b.clone() for b in biases]
    cost = {}
    for shift in COMMIT_SHIFTS:
        for b in biases:
            b.add_(shift)
        try:
            cost[f"{shift:+g}"] = mean_loss(model, batch_fn()) - baseline
        finally:
            for b, k in zip(biases, kept):
                b.copy_(k)
    return cost


def ledger_stream_report(model, batch_fn, summaries, baseline):
    """Beside C's outlier, the numbers that say what C is: the commit gates (how much of D reaches
    C), ||C|| / ||D|| at the last sublayer (mean token norms), ||C|| at position 0 and elsewhere,
    whether C's dominant dimension is D's (C inherits D's outlier rather than building one), and
    what shifting every commit gate costs (commit_shift_cost)."""
    gates = mean_commit_gates(model, batch_fn())
    C, D = summaries["C"], summaries["D"]
    return {
        "commit_gate_per_sublayer": gates, "commit_gate_mean": float(np.mean(gates)),
        "C_over_D_norm_final": C["mean_norm_per_sublayer"][-1] / max(D["mean_norm_per_sublayer"][-1], 1e-30),
        "C_norm_pos0_final": C["mean_norm_pos0_per_sublayer"][-1],
        "C_norm_later_final": C["mean_norm_later_per_sublayer"][-1],
        "C_dominant_dim": C["dominant_dim"], "D_dominant_dim": D["dominant_dim"],
        "C_carries_D_dim": C["dominant_dim"] == D["dominant_dim"],
        "loss_change_commit_logits_shifted": commit_shift_cost(model, batch_fn, baseline),
    }
