"""metrics.py, measure.py and summary.py: the metrics give known answers on constructed tensors,
memory does not grow with the number of batches, and every arm's tiny trained checkpoint is measured
end to end (in process and through the CLI), deterministically, with one-line errors for bad inputs."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import measure
from ledgerlab import summary
from ledger import ARCHS, ATTENTIONS, GPT, CausalSelfAttention, GPTConfig
from ledgerlab.rundir import CHECKPOINT_FORMAT as CKPT_FORMAT
from measure import (Data, ConfigError, checkpoints_with_val_loss, closest_checkpoint, final_checkpoint, parse_args,
                     window_starts)
from ledgerlab.figures import max_pooled_columns, top_dims
from ledgerlab.metrics import (DominantDimProfile, ExtremeTokenStats, StreamStats, collect_extreme_tokens,
                     fake_quantize_weights, position0_hook, top_token_report)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--num_windows=6", "--batch_size=4", "--seq_len=32", "--threads=1"]


def signs(shape, gen):
    """Entries of +-1: |x| is exactly 1 everywhere, so every ratio below is known in closed form."""
    return torch.randint(0, 2, shape, generator=gen).float() * 2 - 1


def planted_stats(n_sublayers=6, B=4, T=16, D=32, dim=7, value=40.0, seed=0):
    gen, stats = torch.Generator().manual_seed(seed), StreamStats(n_sublayers, D)
    for i in range(n_sublayers):
        x = signs((B, T, D), gen)
        x[:, 0, dim] = value
        stats.update(i, x)
    return stats


# ----------------------------------------------------------------------------------------------
# Metrics on constructed tensors

def test_planted_outlier_gives_its_dim_ratio_and_concentration():
    T, value = 16, 40.0
    s = planted_stats(T=T, value=value).summarize()
    assert s["dominant_dim"] == 7
    assert s["persistence"] == 1.0
    assert s["emergence_sublayer"] == 0
    # dim 7 averages (40 + 15 * 1) / 16 over positions; every other dim is exactly 1
    assert s["peak_ratio"] == pytest.approx((value + T - 1) / T)
    assert s["final_ratio"] == pytest.approx((value + T - 1) / T)
    assert s["start_token_concentration_peak"] == pytest.approx(value)
    assert s["peak_pos0_ratio"] == pytest.approx(value)   # at position 0 alone: 40 over a median of 1
    # Sun et al.'s layer-wise numbers: each window's largest entries are 40, 1, 1, its median 1
    assert [s[f"layer_{k}_per_sublayer"][0] for k in ("top1", "top2", "top3", "median")] == [value, 1.0, 1.0, 1.0]
    assert s["peak_top1_over_layer_median"] == value
    assert s["sun_massive_count_total"] == 0          # 40 is far from |x| > 100


def test_planted_massive_activation_is_counted_on_every_layer_at_position_0():
    s = planted_stats(n_sublayers=3, B=4, value=2000.0).summarize()
    assert s["sun_massive_count_per_sublayer"] == [4, 4, 4]
    assert s["sun_massive_count_total"] == s["sun_massive_count_pos0"] == 12


def test_sun_rule_needs_both_the_absolute_and_the_relative_threshold():
    D = 32
    x = torch.ones(2, 2, D)
    x[1] *= 0.01          # window 1's median is 0.01, window 0's is 1
    x[0, 0, 5] = 2000.0   # > 100 and >= 1000 x its window's median 1: massive
    x[0, 1, 5] = 500.0    # > 100 but only 500 x the median: not massive
    x[1, 0, 5] = 50.0     # 5000 x its window's median 0.01 but not > 100: not massive
    x[1, 1, 5] = 150.0    # > 100 and 15000 x the median 0.01: massive
    stats = StreamStats(1, D)
    stats.update(0, x)
    s = stats.summarize()
    assert s["sun_massive_count_total"] == 2
    assert s["sun_massive_count_pos0"] == 1


def test_the_fast_median_is_torchs_lower_median():
    # numpy's partition stands in for torch.median on a CPU: the same value, ties and even counts included
    from ledgerlab.metrics import lower_median
    torch.manual_seed(0)
    for a in (torch.randn(4, 6).abs(), torch.randn(3, 5, 7).abs(), torch.tensor([[1.0, 1.0, 2.0, 3.0]])):
        assert torch.equal(lower_median(a), a.median(dim=-1).values)


def test_sun_rule_divides_by_the_median_of_the_windows_whole_output_not_the_tokens():
    """Sun et al.'s code takes torch.median over one sequence's whole layer output. Three windows of
    4 tokens x 8 dims (32 entries: the median is the 16th smallest, the lower middle one) where each
    token's own median says otherwise."""
    x = torch.ones(3, 4, 8)
    # SmolLM2's position 0: the whole vector grows (to 50) with its outlier (20000). Token 0's median is
    # 50 and 20000 < 1000 x 50, but the window's is 1 (24 of 32 entries are 1): massive.
    x[0, 0], x[0, 0, 5] = 50.0, 20000.0
    # A quiet token: its median 0.01 makes 150 massive per token, but the window's median is 1.
    x[1, 3], x[1, 3, 2] = 0.01, 150.0
    # Half the window at 0.05: the lower middle entry is 0.05 (the mean of the two middle ones would
    # be 0.525, over which 200 is under 1000x), so 200 is massive; token 1's own median is 1.
    x[2, 2:], x[2, 1, 4] = 0.05, 200.0
    stats = StreamStats(1, 8)
    stats.update(0, x)
    s = stats.summarize()
    assert (s["sun_massive_count_total"], s["sun_massive_count_pos0"]) == (2, 1)   # 20000 (pos 0), 200
    assert (s["per_token_median_massive_count_total"], s["per_token_median_massive_count_pos0"]) == (1, 0)   # 150
    # their Table 1 columns, the mean over the three windows
    assert s["layer_top1_per_sublayer"] == [pytest.approx((20000 + 150 + 200) / 3)]
    assert s["layer_top2_per_sublayer"] == s["layer_top3_per_sublayer"] == [pytest.approx((50 + 1 + 1) / 3)]
    assert s["layer_median_per_sublayer"] == [pytest.approx((1 + 1 + 0.05) / 3)]
    assert s["top1_over_layer_median_per_sublayer"] == [pytest.approx(20350 / 2.05)]   # the ratio of the means


def test_sun_sums_over_batches_equal_one_computation_over_all_windows():
    """Windows fed in batches of 2, 3 and 1 give what sorting each window's entries at once gives."""
    gen, B, T, D = torch.Generator().manual_seed(0), 6, 8, 16
    xs = [torch.randn(B, T, D, generator=gen) for _ in range(2)]          # two sublayers
    for x in xs:
        x[:, 0] *= 30.0 * torch.rand(B, 1, generator=gen)                 # position 0 grows as a whole, by window
        x[::2, 0, 3] = 5000.0                                              # and holds an outlier in every other window
    stats = StreamStats(2, D)
    for i, x in enumerate(xs):
        for batch in x.split([2, 3, 1]):
            stats.update(i, batch)
    s = stats.summarize()
    for i, x in enumerate(xs):
        a = x.abs()
        ordered = a.reshape(B, -1).sort(-1).values.double()
        top, median = ordered.flip(-1)[:, :3].mean(0), ordered[:, (T * D - 1) // 2]   # lower middle of T x D
        massive = (a > 100) & (a >= 1000 * median[:, None, None])
        per_token = (a > 100) & (a >= 1000 * a.sort(-1).values[..., (D - 1) // 2, None])
        assert [s[f"layer_top{k}_per_sublayer"][i] for k in (1, 2, 3)] == pytest.approx(top.tolist())
        assert s["layer_median_per_sublayer"][i] == pytest.approx(float(median.mean()))
        assert s["top1_over_layer_median_per_sublayer"][i] == pytest.approx(float(top[0] / median.mean()))
        assert s["sun_massive_count_per_sublayer"][i] == int(massive.sum()) > 0
        assert s["per_token_median_massive_count_per_sublayer"][i] == int(per_token.sum())
    assert s["sun_massive_count_pos0"] == s["sun_massive_count_total"]
    assert s["per_token_median_massive_count_total"] < s["sun_massive_count_total"]   # position 0's growth hides some


def test_the_heatmap_keeps_one_massive_column_at_page_width_and_labels_it():
    """SmolLM2's shape: 576 dims, one of them (507) massive at some sublayers. Binned to at most 128
    columns, its bin keeps its peak, and it is the first dimension labelled."""
    data = np.ones((4, 576))
    data[2, 507], data[0, 12] = 26000.0, 50.0
    pooled, width = max_pooled_columns(data)
    assert width == 5 and pooled.shape == (4, 116)         # 576 = 115 bins of 5 and one of 1, padded
    assert pooled[2, 507 // width] == 26000.0 and pooled[0, 12 // width] == 50.0
    assert (pooled[1] == 1.0).all()                          # a padded zero never shows
    assert top_dims(data) == [507, 12]                      # the third largest, 1, is no more than the median
    assert top_dims(np.ones((4, 576))) == [0]                # nothing stands out: only the largest is labelled
    narrow, width = max_pooled_columns(data[:, :100])
    assert width == 1 and np.array_equal(narrow, data[:, :100])   # a narrow model: every dim its own column


def test_gaussian_stream_has_no_structure():
    L, gen, stats = 16, torch.Generator().manual_seed(3), StreamStats(16, 256)
    for i in range(L):
        stats.update(i, torch.randn(4, 32, 256, generator=gen))
    s = stats.summarize()
    assert all(abs(k) < 0.1 for k in s["kurtosis_per_sublayer"])   # excess kurtosis of a Gaussian: 0
    assert s["persistence"] <= 0.25                                  # chance is 1/256 per sublayer
    assert s["peak_ratio"] < 1.5
    assert s["sun_massive_count_total"] == 0


def test_peak_ignores_sublayers_with_a_nearly_empty_stream():
    """Trap (1): an early C holds almost nothing, so its top/median ratio can be huge; the peak
    skips sublayers under 25% of the final norm, and the final value is reported as well."""
    gen, T, stats = torch.Generator().manual_seed(0), 16, StreamStats(4, 32)
    tiny = signs((2, T, 32), gen) * 1e-3
    tiny[:, :, 5] = 50e-3
    stats.update(0, tiny)
    for i in (1, 2, 3):
        x = signs((2, T, 32), gen)
        x[:, 0, 7] = 40.0
        stats.update(i, x)
    s = stats.summarize()
    assert s["ratio_per_sublayer"][0] == pytest.approx(50.0)
    assert s["eligible_per_sublayer"] == [False, True, True, True]
    assert s["peak_sublayer"] != 0
    assert s["peak_ratio"] == pytest.approx((40 + T - 1) / T)
    assert s["dominant_dim"] == 7 and s["persistence"] == 0.75 and s["emergence_sublayer"] == 1


def test_released_definitions_on_a_planted_outlier():
    """The released code's formulas (probe.py, analyze.py) beside ours, on a dim planted at position
    0 with a size that changes with depth: 40, 80, 20 times every other entry."""
    gen, B, T, D, stats = torch.Generator().manual_seed(0), 4, 16, 32, StreamStats(3, 32)
    for i, value in enumerate((40.0, 80.0, 20.0)):
        x = signs((B, T, D), gen)
        x[:, 0, 7] = value
        stats.update(i, x)
    s = stats.summarize()
    r = s["released_definitions"]
    # ours: position 0 over positions 1..T-1, at the peak sublayer (the 80x one)
    assert s["peak_sublayer"] == 1 and s["start_token_concentration_peak"] == pytest.approx(80.0)
    # released: position 0 over all T positions, where dim 7 is largest on average (also sublayer 1)
    assert r["concentration_sublayer"] == 1
    assert r["start_token_concentration"] == pytest.approx(80.0 / ((80.0 + T - 1) / T))
    for ours, theirs in zip(s["start_token_concentration_per_sublayer"], r["start_token_concentration_per_sublayer"]):
        assert theirs == pytest.approx(T * ours / (ours + T - 1))   # the two are tied, and theirs < T
    assert r["peak_ratio"] == pytest.approx((80.0 + T - 1) / T) and r["peak_sublayer"] == 1
    # kurtosis: released takes the max over sublayers, ours the final sublayer
    kurtosis = s["kurtosis_per_sublayer"]
    assert r["kurtosis_max"] == max(kurtosis) == kurtosis[1] > kurtosis[2] == s["kurtosis_final"]


def test_released_peak_ratio_keeps_a_nearly_empty_stream_that_ours_skips():
    gen, T, stats = torch.Generator().manual_seed(0), 16, StreamStats(2, 32)
    tiny = signs((2, T, 32), gen) * 1e-3
    tiny[:, :, 5] = 50e-3
    stats.update(0, tiny)
    x = signs((2, T, 32), gen)
    x[:, 0, 7] = 40.0
    stats.update(1, x)
    s = stats.summarize()
    assert s["released_definitions"]["peak_ratio"] == pytest.approx(50.0)   # the empty sublayer 0
    assert s["released_definitions"]["peak_sublayer"] == 0
    assert s["peak_ratio"] == pytest.approx((40 + T - 1) / T)               # ours skips it


def test_accumulator_memory_does_not_grow_with_batches():
    sizes = []
    for n_batches in (2, 8):
        stats, profile = StreamStats(4, 64), DominantDimProfile(4, 32, 3, vocab_size=50, token_sublayers=(3,))
        for _ in range(n_batches):
            for i in range(4):
                x = torch.randn(4, 32, 64)
                stats.update(i, x)
                profile.update(i, x, torch.randint(0, 50, (4, 32)))
        tensors = [*(t for t in vars(stats).values() if isinstance(t, torch.Tensor)), profile.pos_sum, *profile.token_sum.values(),
                   *profile.token_count.values()]
        sizes.append((stats.state_nbytes(), sum(t.numel() for t in tensors)))
    assert sizes[0] == sizes[1]


# ----------------------------------------------------------------------------------------------
# Extreme-token phenomena (Guo et al. 2024) on constructed tensors

def causal_weights(T, sink=None):
    """(T, T) causal attention in which every query >= 1 puts `sink` on key 0 and spreads the rest
    evenly over its other keys; sink=None: evenly over all its keys. Query 0 sees only key 0."""
    w = torch.zeros(T, T)
    w[0, 0] = 1.0
    for q in range(1, T):
        w[q, :q + 1] = 1.0 / (q + 1)
        if sink is not None:
            w[q, 0], w[q, 1:q + 1] = sink, (1.0 - sink) / q
    return w


def test_planted_attention_gives_its_sink_strength():
    B, T = 3, 8
    weights = torch.stack([causal_weights(T, 0.9), causal_weights(T)]).expand(B, 2, T, T)
    acc = ExtremeTokenStats(2, 2)
    acc.update(0, weights * 0.5, torch.ones(B, 2, T, 4))
    acc.update(1, weights, torch.ones(B, 2, T, 4))
    e = acc.summarize()
    uniform = sum(1 / (q + 1) for q in range(1, T)) / (T - 1)   # query 0 (all on key 0) is left out
    assert e["sink_per_layer_head"][1] == pytest.approx([0.9, uniform])
    assert e["sink_per_layer_head"][0] == pytest.approx([0.45, uniform / 2])
    assert e["sink_uniform_baseline"] == pytest.approx(uniform)
    assert e["sink_max"] == pytest.approx(0.9) and e["sink_max_layer_head"] == [1, 0]
    assert e["sink_heads_over_half"] == 1


def test_planted_values_give_their_value_drain():
    gen, B, T = torch.Generator().manual_seed(0), 4, 10
    v = torch.nn.functional.normalize(torch.randn(B, 2, T, 8, generator=gen), dim=-1)   # every |v| = 1
    v[:, 0, 0] *= 0.05    # head 0: position 0's value drained to 5% of the others'
    v[:, 1, 0] *= 3.0     # head 1: position 0's value three times the others'
    weights = torch.stack([causal_weights(T, 0.9), causal_weights(T)]).expand(B, 2, T, T)
    acc = ExtremeTokenStats(2, 2)
    for layer in (0, 1):
        acc.update(layer, weights, v * (layer + 1))   # a ratio: the overall scale of v drops out
    e = acc.summarize()
    for row in e["value_drain_per_layer_head"]:
        assert row == pytest.approx([0.05, 3.0])
    assert e["value_drain_min"] == pytest.approx(0.05) and e["value_drain_min_layer_head"][1] == 0
    assert e["value_drain_at_sink_max"] == pytest.approx(0.05)   # the sink head is the drained one


def test_residual_peak_sees_a_whole_vector_scale_up_that_no_dimension_ratio_shows():
    gen, c, stats = torch.Generator().manual_seed(0), 6.0, StreamStats(3, 32)
    for i, (scale, pos0) in enumerate(((1e-3, 50.0), (1.0, c), (1.0, 1.0))):
        x = signs((4, 16, 32), gen) * scale
        x[:, 0] *= pos0     # position 0 is `pos0` times longer, in every dimension alike
        stats.update(i, x)
    s = stats.summarize()
    peak = s["residual_peak"]
    assert peak["per_sublayer"] == pytest.approx([50.0, c, 1.0])
    # the max skips the nearly empty sublayer 0, as the dimension-ratio peak does
    assert peak["max"] == pytest.approx(c) and peak["max_sublayer"] == 1 and peak["final"] == pytest.approx(1.0)
    assert s["pos0_ratio_per_sublayer"][1] == pytest.approx(1.0)   # no dimension stands out at position 0
    assert s["ratio_per_sublayer"][1] == pytest.approx(1.0)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("qk_norm", [False, True])
def test_recomputed_attention_weights_reproduce_the_module_output(qk_norm, attention):
    torch.manual_seed(0)
    B, T, C, H = 2, 12, 32, 4
    attn = CausalSelfAttention(GPTConfig(vocab_size=10, block_size=T, n_layer=1, n_head=H, n_embd=C,
                                         qk_norm=qk_norm, attention=attention))
    with torch.no_grad():
        attn.qkv.weight.normal_(std=0.3)   # logits of order 1 or more: a wrong scale, mask or norm shows
        if qk_norm:
            attn.q_norm.weight.uniform_(0.5, 2.0)
            attn.k_norm.weight.uniform_(0.5, 2.0)
        if attention == "attn_bias":   # a sink key that matters, and a value that shows if it is left out
            attn.sink_key.normal_(std=3.0)
            attn.sink_value.normal_(std=1.0)
        if attention == "gated":
            attn.gate.bias.normal_(std=2.0)
        u = torch.randn(B, T, C)
        a = attn.attention_weights(u)
        y = a.weights @ a.values
        total = a.weights.sum(-1)
        if attention == "attn_bias":
            y = y + a.sink_weight[..., None] * a.sink_value
            total = total + a.sink_weight
            assert a.sink_weight.mean() > 0.05   # the sink is seen, with weight of its own
        if attention == "gated":
            y = y * a.gate
        merged = y.transpose(1, 2).reshape(B, T, C)
        assert not a.weights.triu(1).any()
        if attention == "sigmoid":   # not normalised: each weight is sigmoid(logit) in (0, 1)
            assert not torch.allclose(total, torch.ones(B, H, T), atol=0.05)
            assert ((a.weights > 0) | torch.ones(T, T).triu(1).bool()).all()
        else:
            assert torch.allclose(total, torch.ones(B, H, T))
        assert torch.allclose(attn.proj(merged), attn(u), atol=1e-5)


def test_explicit_sink_and_position_0_are_reported_apart_and_sum_with_the_rest_to_1():
    B, H, T = 3, 2, 8
    weights = torch.zeros(B, H, T, T)      # head 0: 0.6 on k', 0.3 on position 0, 0.1 spread later
    sink_weight = torch.zeros(B, H, T)     # head 1: nothing on k', uniform over positions 0..t
    sink_weight[:, 0] = 0.6
    weights[:, 0, 0, 0] = 0.4
    weights[:, 1] = causal_weights(T)
    for q in range(1, T):
        weights[:, 0, q, 0], weights[:, 0, q, 1:q + 1] = 0.3, 0.1 / q
    acc = ExtremeTokenStats(1, H, "attn_bias")
    acc.update(0, weights, torch.ones(B, H, T, 4), sink_weight, torch.full((1, H, 1, 4), 0.5))
    e = acc.summarize()
    uniform = sum(1 / (q + 1) for q in range(1, T)) / (T - 1)
    assert e["explicit_sink_per_layer_head"][0] == pytest.approx([0.6, 0.0])
    assert e["sink_per_layer_head"][0] == pytest.approx([0.3, uniform])
    assert e["later_positions_per_layer_head"][0] == pytest.approx([0.1, 1 - uniform])
    # k' is one more key every query sees: uniform attention puts 1/(q+2) on position 0
    assert e["sink_uniform_baseline"] == pytest.approx(sum(1 / (q + 2) for q in range(1, T)) / (T - 1))
    assert e["explicit_sink_max"] == pytest.approx(0.6) and e["explicit_sink_max_layer_head"] == [0, 0]
    assert e["sink_at_explicit_sink_max"] == pytest.approx(0.3) and e["explicit_sink_heads_over_half"] == 1
    assert e["explicit_sink_value_drain_per_layer_head"][0] == pytest.approx([0.5, 0.5])   # |v'| = 1, |v| = 2
    # and a real attn_bias model: the three parts of every head add up to 1
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16, attention="attn_bias"))
    with collect_extreme_tokens(model.eval()) as extreme, torch.no_grad():
        model(torch.randint(0, 20, (3, 16)))
    e = extreme.summarize()
    parts = np.add(np.add(e["explicit_sink_per_layer_head"], e["sink_per_layer_head"]),
                   e["later_positions_per_layer_head"])
    assert parts == pytest.approx(np.ones((2, 2))) and min(map(min, e["explicit_sink_per_layer_head"])) > 0


def test_sigmoid_weights_are_judged_against_the_heads_own_mass_not_one_over_q_plus_1():
    B, T = 2, 8
    mask = torch.ones(T, T).tril()
    weights = torch.stack([0.3 * mask, 0.1 * mask]).expand(B, 2, T, T).clone()
    weights[:, 1, :, 0] = 0.9        # head 0: 0.3 on every key, no sink; head 1: 0.9 on key 0, 0.1 elsewhere
    acc = ExtremeTokenStats(1, 2, "sigmoid")
    acc.update(0, weights, torch.ones(B, 2, T, 4))
    e = acc.summarize()
    sink_head = sum((0.9 + 0.1 * q) / (q + 1) for q in range(1, T)) / (T - 1)
    assert e["sink_uniform_baseline_per_layer_head"][0] == pytest.approx([0.3, sink_head])
    assert e["sink_per_layer_head"][0] == pytest.approx([0.3, 0.9])   # the raw weights, not normalised
    assert e["attention_mass_per_layer_head"][0] == pytest.approx(
        [0.3 * (T + 2) / 2, sum(0.9 + 0.1 * q for q in range(1, T)) / (T - 1)])
    # head 0 weighs position 0 as every key: no sink, though 0.3 is far above softmax's 1/(q+1)
    assert e["sink_max_layer_head"] == [0, 1] and e["sink_uniform_baseline"] == pytest.approx(sink_head)
    assert e["sink_heads_over_half"] == 1 and e["attention_mass_min_layer_head"] == [0, 1]
    note = " ".join(summary.notes({"label": "x", "decoded_stream": "h", "selection": {"distance": None},
                                   "extreme_tokens": e, "streams": {"h": NOTE_STREAM}}))
    assert "weights not normalised" in note and "uniform attention" not in note


def test_gate_means_at_position_0_and_elsewhere_on_a_planted_gate():
    torch.manual_seed(0)
    B, T, C = 3, 10, 16
    attn = CausalSelfAttention(GPTConfig(vocab_size=10, block_size=T, n_layer=1, n_head=2, n_embd=C,
                                         attention="gated"))
    with torch.no_grad():
        attn.gate.weight.zero_()
        attn.gate.weight[:8, 0] = 1.0                   # head 0 reads u[..., 0]: large at position 0 only
        attn.gate.bias[:8], attn.gate.bias[8:] = 0.0, -math.log(3)   # head 1: sigmoid = 0.25 everywhere
        u = torch.randn(B, T, C)
        u[:, 0, 0], u[:, 1:, 0] = math.log(3), 0.0     # head 0: 0.75 at position 0, 0.5 later
        acc = ExtremeTokenStats(1, 2, "gated")
        a = attn.attention_weights(u)
        acc.update(0, a.weights, a.values, gate=a.gate)
    e = acc.summarize()
    assert e["gate_pos0_per_layer_head"][0] == pytest.approx([0.75, 0.25])
    assert e["gate_later_per_layer_head"][0] == pytest.approx([0.5, 0.25])
    assert e["gate_pos0_mean"] == pytest.approx(0.5) and e["gate_later_mean"] == pytest.approx(0.375)
    assert e["gate_later_min_layer_head"] == [0, 1] and e["gate_pos0_at_later_min"] == pytest.approx(0.25)


def test_extreme_token_hooks_ride_along_a_pass_with_flat_memory_and_come_off():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()
    with torch.no_grad():   # layer 0: every query reads dim 1 (on every token), key 0 reads dim 2
        model.wte.weight[:, 1], model.wpe.weight[0, 2] = 10.0, 10.0
        qkv = model.sublayers[0].fn.qkv.weight
        qkv.zero_()
        qkv[:16, 1], qkv[16:32, 2] = 3.0, 3.0               # q . k is large at key 0 only: a sink
        model.sublayers[2].fn.qkv.weight[:32].zero_()       # layer 1: q = k = 0, so exactly uniform
    x = torch.randint(0, 20, (3, 16))
    plain = model(x)[0]
    sizes = []
    for n_batches in (1, 4):
        with collect_extreme_tokens(model) as extreme:
            for _ in range(n_batches):
                assert torch.equal(model(x)[0], plain)      # the hooks only watch
        sizes.append(extreme.state_nbytes())
    assert sizes[0] == sizes[1]
    assert not any(sub.fn._forward_pre_hooks for sub in model.sublayers)
    assert extreme.n_seqs.tolist() == [12.0, 12.0]            # each layer seen once per forward
    e = extreme.summarize()
    assert e["sink_per_layer_head"][1] == pytest.approx([e["sink_uniform_baseline"]] * 2)
    assert min(e["sink_per_layer_head"][0]) > 0.99 and e["sink_heads_over_half"] == 2


def test_dominant_dim_heatmap_and_token_report_flag_a_delimiter_feature():
    itos = ["a", "b", " ", "\n", "."]
    decode = lambda ids: "".join(itos[i] for i in ids)
    idx = torch.tensor([[0, 2, 1, 3, 0, 4, 1, 2]])
    T = idx.shape[1]

    def report(delimiter_value, letter_value=1.0):
        x = torch.full((1, T, 4), 0.5)
        x[0, 0, 1] = 10.0                                  # position 0
        for t in range(1, T):
            x[0, t, 1] = delimiter_value if itos[idx[0, t]] in " \n." else letter_value
        stats, profile = StreamStats(1, 4), DominantDimProfile(1, T, 1, vocab_size=5, token_sublayers=(0,))
        stats.update(0, x)
        profile.update(0, x, idx)
        assert profile.position_mean()[0, 0] == 10.0
        return top_token_report(profile, stats, 0, "0.attn", decode, k=3, min_count=1)

    shared = report(9.0)
    assert shared["verdict"].startswith("delimiter feature")
    assert shared["tokens"][0]["text"] in (repr(" "), repr("\n"), repr("."))
    assert shared["tokens"][0]["ratio_to_pos0"] == pytest.approx(0.9) and shared["delimiter_shares_feature"]
    specific = report(1.0)
    assert specific["verdict"].startswith("start-token specific") and not specific["delimiter_shares_feature"]
    letters_lead = report(9.0, letter_value=9.5)
    assert letters_lead["verdict"].startswith("not start-token specific")
    assert "the delimiter" in letters_lead["verdict"]
    assert letters_lead["delimiter_shares_feature"]


@pytest.mark.parametrize("arch", ["hc2", "ledger"])
def test_position0_interventions_touch_only_the_decoded_channel(arch):
    config = GPTConfig(arch=arch, vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=4)
    names = config.stream_names
    streams = {n: torch.full((2, 3, 4), 1.0 + k) for k, n in enumerate(names)}
    stats = {n: StreamStats(2, 4) for n in names}
    for k, n in enumerate(names):
        for i in range(2):
            stats[n].update(i, streams[n] * (3.0 if k == 0 else -1.0))   # pos-0 means: 3 and -2
    assert position0_hook(config, stats, [2], range(1, 2), "zero")(0, "attn", streams) is None   # before emergence
    zeroed = position0_hook(config, stats, [2], range(1, 2), "zero")(1, "mlp", streams)
    meaned = position0_hook(config, stats, [2], range(1, 2), "mean")(1, "mlp", streams)
    targets = ("h0", "h1") if arch == "hc2" else ("C",)
    assert set(zeroed) == set(targets)                 # ledger: D is left alone
    for n in targets:
        assert torch.all(zeroed[n][:, 0, 2] == 0)
        assert torch.equal(meaned[n][:, 0, 2], torch.full((2,), float(stats[n].mean_pos0()[1, 2])))
        untouched = torch.ones(2, 3, 4, dtype=torch.bool)
        untouched[:, 0, 2] = False
        assert torch.equal(zeroed[n][untouched], streams[n][untouched])
    if arch == "hc2":   # each stream takes its own mean, so the decoded sum takes its mean
        total = meaned["h0"][:, 0, 2] + meaned["h1"][:, 0, 2]
        assert torch.allclose(total, torch.full((2,), 3.0 * 1.0 - 1.0 * 2.0))


def test_fake_quantization_rounds_linear_weights_per_output_channel_only():
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch="ledger", vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16, gate_rank=4))
    q4, q8 = fake_quantize_weights(model, 4), fake_quantize_weights(model, 8)
    for (name, w), w4, w8 in zip(model.state_dict().items(), q4.state_dict().values(), q8.state_dict().values()):
        module = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else None
        if isinstance(module, torch.nn.Linear) and name.endswith("weight"):
            assert all(len(torch.unique(row)) <= 15 for row in w4)          # 4 bits: values in -7..7
            assert (w8 - w).abs().max() <= w.abs().amax() / 127 / 2 + 1e-7
            assert w.abs().max() == 0 or not torch.equal(w4, w)
        else:
            assert torch.equal(w4, w), name                                 # embeddings, norms, biases


NOTE_STREAM = {"sun_massive_count_total": 0, "dominant_dim": 7, "peak_ratio": 3.0, "max_abs_per_sublayer": [50.0],
               "peak_pos0_ratio": 2.0, "start_token_concentration_peak": 1.0,
               "residual_peak": {"max": 2.0, "final": 2.0, "max_sublayer_name": "0.mlp"}}


def test_notes_judge_a_start_token_outlier_at_position_0_and_flag_a_stream_empty_elsewhere():
    def note(pos0, conc, final_peak):
        stream = {"sun_massive_count_total": 0, "dominant_dim": 7, "peak_ratio": 3.0, "max_abs_per_sublayer": [50.0],
                  "peak_pos0_ratio": pos0, "start_token_concentration_peak": conc,
                  "residual_peak": {"max": final_peak, "final": final_peak, "max_sublayer_name": "0.mlp"}}
        m = {"label": "x", "decoded_stream": "C", "streams": {"C": stream}, "selection": {"distance": None},
             "extreme_tokens": {"sink_per_layer_head": [[0.9]], "sink_max_layer_head": [0, 0], "sink_max": 0.9,
                                "sink_uniform_baseline": 0.2, "value_drain_at_sink_max": 0.1, "sink_heads_over_half": 1}}
        return " ".join(summary.notes(m))
    assert "a start-token outlier, short of the 100-1000x" in note(40.0, 12.0, 2.0)
    assert "but only 3.0x larger there" in note(40.0, 3.0, 2.0)
    assert "no pronounced fixed dimension" in note(2.0, 1.0, 2.0)   # an all-position ratio of 3x is no outlier
    assert "read the concentration with it" in note(40.0, 5000.0, 86.0)
    assert "read the concentration with it" not in note(40.0, 12.0, 2.0)


def test_windows_are_seeded_and_aligned_ones_open_on_the_start_token():
    tokens = np.array(([1, 2, 3, 4, 5, 6, 7, 9] * 20), dtype=np.uint16)     # 9 = EOT
    data = Data(tokens, {"eot_id": 9}, None, "x")
    cfg = measure.MeasureConfig(num_windows=12, seed=5)
    a, b = window_starts(data, cfg, 8, False), window_starts(data, cfg, 8, False)
    assert torch.equal(a, b)
    assert not torch.equal(a, window_starts(data, measure.MeasureConfig(num_windows=12, seed=6), 8, False))
    aligned = window_starts(data, cfg, 8, True)
    assert all(tokens[s] == 9 for s in aligned.tolist()) and max(aligned.tolist()) + 9 <= len(tokens)
    bos_data = Data(tokens, {"eot_id": 9, "bos_id": 1}, None, "x")    # a <bos> wins over the EOT
    assert all(tokens[s] == 1 for s in window_starts(bos_data, cfg, 8, True).tolist())


def test_parse_args():
    paths, cfg = parse_args(["runs/a", "--num_windows=3", "--figures=False", "--match_loss=2.5", "runs/b"])
    assert paths == ["runs/a", "runs/b"] and cfg.num_windows == 3 and cfg.figures is False and cfg.match_loss == 2.5
    assert parse_args(["x", "--match_loss=auto"])[1].match_loss == "auto"
    with pytest.raises(ConfigError, match="did you mean 'num_windows'"):
        parse_args(["x", "--num_window=3"])
    with pytest.raises(ConfigError, match="batch_size='big'"):
        parse_args(["x", "--batch_size=big"])
    with pytest.raises(ConfigError, match="checkpoint"):
        parse_args(["--seed=1"])


def test_select_checkpoint_picks_the_kept_checkpoint_closest_in_val_loss(tmp_path):
    for name, loss in (("ckpt_000010.pt", 3.0), ("ckpt_000020.pt", 2.5), ("ckpt_000030.pt", 2.2), ("ckpt.pt", 2.2)):
        torch.save({"format": CKPT_FORMAT, "model_config": {"arch": "vanilla"}, "val_loss": loss}, tmp_path / name)
    path, ckpt, distance = closest_checkpoint(checkpoints_with_val_loss(str(tmp_path)), 2.6)
    assert os.path.basename(path) == "ckpt_000020.pt" and ckpt["val_loss"] == 2.5 and distance == pytest.approx(0.1)
    path, ckpt = final_checkpoint(str(tmp_path))
    assert os.path.basename(path) == "ckpt.pt" and ckpt["val_loss"] == 2.2
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no checkpoint"):
        final_checkpoint(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------------------------
# End to end on tiny trained checkpoints of every arm

TEXT = ("The king said: hello, and then the queen went home.\nA dog ran; a cat sat. "
        "They all slept, and the night was long.\n")


def make_char_dataset(root, texts, name="docs"):
    folder = root / name
    folder.mkdir()
    for i, text in enumerate(texts):
        (folder / f"doc{i}.txt").write_text(text)
    out = subprocess.run([sys.executable, "prepare_data.py", "--dataset=text", f"--input={folder}/*.txt",
                          "--tokenizer=char", f"--out_root={root / (name + '_data')}", "--val_fraction=0.4",
                          "--num_proc=1"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return str(root / (name + "_data"))


# One run per attention kind besides softmax, each on another arm (QK-norm composes with gated), for 10
# iterations: measurement needs one checkpoint of each.
KIND_RUNS = {"vanilla+attn_bias": ("vanilla", "attn_bias"), "ledger+sigmoid": ("ledger", "sigmoid"),
             "suppress+gated": ("suppress", "gated")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Train every arm for 20 iterations (checkpoints at 10 and 20), and each attention kind for 10,
    all at once to save time."""
    root = tmp_path_factory.mktemp("measure")
    data_root = make_char_dataset(root, [TEXT * (8 + i) for i in range(6)])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {}
    plan = {**{arch: (arch, "softmax", 20) for arch in ARCHS}, **{n: (*k, 10) for n, k in KIND_RUNS.items()}}
    for name, (arch, attention, iters) in plan.items():
        cmd = [sys.executable, "train.py", f"--arch={arch}", f"--attention={attention}", "--dataset=text_char",
               f"--data_root={data_root}", f"--out_dir={root / name}", "--n_layer=2", "--n_head=2", "--n_embd=32",
               "--block_size=64", "--batch_size=4", "--gradient_accumulation_steps=1", f"--max_iters={iters}",
               "--eval_interval=10", "--eval_iters=2", "--ckpt_interval=10", "--learning_rate=3e-3",
               "--warmup_iters=2", "--device=cpu", "--seed=1", "--log_interval=5"]
        procs[name] = subprocess.Popen(cmd, cwd=REPO, env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for name, p in procs.items():
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"train.py {name} failed: {err}"
    return {"root": root, "data_root": data_root, **{name: str(root / name) for name in plan}}


def load_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arm_is_measured_end_to_end(runs, arch, tmp_path):
    out = tmp_path / "m"
    [result] = measure.main([runs[arch], f"--out_dir={out}", "--figures=False", *FAST])
    m = load_metrics(out)
    config = GPTConfig(**m["model_config"])
    expected = set(config.stream_names) | ({"h0+h1"} if arch == "hc2" else set())
    assert m["arch"] == arch and m["iter_num"] == 20 and set(m["streams"]) == expected
    assert m["decoded_stream"] == config.decoded_stream and os.path.basename(m["checkpoint"]) == "ckpt.pt"
    for s in m["streams"].values():
        assert len(s["ratio_per_sublayer"]) == 4 and 0 <= s["dominant_dim"] < 32 and 0 <= s["persistence"] <= 1
        for key in ("peak_ratio", "final_ratio", "start_token_concentration_peak", "kurtosis_final",
                    "sun_massive_count_total", "layer_top1_per_sublayer", "layer_median_per_sublayer",
                    "peak_sublayer_name"):
            assert s[key] is not None, key
    assert m["measured_val_loss"] > 0 and m["val_loss_recorded"] > 0
    iv, q = m["interventions"], m["quantization"]
    if "skipped" not in iv:
        assert {"zero_loss", "mean_loss", "control_zero_loss", "control_mean_loss", "baseline_loss"} <= set(iv)
        assert iv["control_dim"] != iv["dim"]
    assert q["w8_loss"] == pytest.approx(m["measured_val_loss"], abs=0.05) and q["w4_loss"] > 0
    assert m["top_tokens"] and all(r["tokens"] for r in m["top_tokens"].values())
    e = m["extreme_tokens"]
    assert np.shape(e["sink_per_layer_head"]) == np.shape(e["value_drain_per_layer_head"]) == (2, 2)
    assert all(0 <= w <= 1 for row in e["sink_per_layer_head"] for w in row) and e["value_drain_min"] > 0
    assert all(len(s["residual_peak"]["per_sublayer"]) == 4 and s["residual_peak"]["max"] > 0
               for s in m["streams"].values())
    assert m["settings"]["seq_len"] == 32 and m["timing"]["tokens"] == 6 * 32
    summary = (out / "summary.md").read_text()
    assert f"| {arch} | 20 |" in summary and "Sun" in summary and "Extreme tokens" in summary
    assert m["attention"] == e["attention"] == "softmax" and "sigmoid (Gu" not in summary


@pytest.mark.slow
@pytest.mark.parametrize("name", KIND_RUNS)
def test_every_attention_kind_is_measured_end_to_end_with_its_own_numbers(runs, name, tmp_path):
    arch, attention = KIND_RUNS[name]
    figures = f"--figures={attention == 'sigmoid'}"   # sigmoid's figure is titled its own way
    [m] = measure.main([runs[name], f"--out_dir={tmp_path}", figures, "--interventions=False", "--quantization=False",
                        *FAST])
    e, summary = load_metrics(tmp_path)["extreme_tokens"], (tmp_path / "summary.md").read_text()
    assert m["arch"] == arch and m["attention"] == e["attention"] == attention and m["label"] == name
    assert f"| {name} | 10 |" in summary and attention in summary.split("Extreme tokens")[1]
    assert (tmp_path / "extreme_tokens.png").exists() == (attention == "sigmoid")
    notes = " ".join(m["notes"])
    if attention == "attn_bias":
        parts = np.add(np.add(e["explicit_sink_per_layer_head"], e["sink_per_layer_head"]),
                       e["later_positions_per_layer_head"])
        assert parts == pytest.approx(np.ones((2, 2))) and "explicit sink" in notes and "k'" in summary
    elif attention == "sigmoid":
        assert np.shape(e["attention_mass_per_layer_head"]) == (2, 2) and e["attention_mass_min"] > 0
        assert e["sink_uniform_baseline"] in np.ravel(e["sink_uniform_baseline_per_layer_head"])
        assert "weights not normalised" in notes and "uniform attention" not in notes
    else:
        assert 0 < e["gate_later_min"] <= e["gate_later_mean"] < 1 and 0 < e["gate_pos0_mean"] < 1
        assert "output gate" in notes and "gated: gate" in summary


def test_matched_loss_picks_the_closest_kept_checkpoint(runs, tmp_path):
    path, _, distance = closest_checkpoint(checkpoints_with_val_loss(runs["ledger"]), 99.0)   # the highest loss: the earliest
    assert os.path.basename(path) == "ckpt_000010.pt"
    measure.main([runs["ledger"], "--match_loss=99", f"--out_dir={tmp_path}", "--figures=False",
                  "--interventions=False", "--quantization=False", *FAST])
    m = load_metrics(tmp_path)
    assert m["checkpoint"] == os.path.abspath(path) and m["iter_num"] == 10
    assert m["selection"]["distance"] == pytest.approx(distance) and m["interventions"] is None


def test_auto_match_loss_is_the_lowest_loss_every_run_reached(runs, tmp_path, monkeypatch):
    dirs = [runs["vanilla"], runs["delta"]]
    target = max(min(c["val_loss"] for c in checkpoints_with_val_loss(d).values()) for d in dirs)
    opened = []
    load = measure.load_checkpoint
    monkeypatch.setattr(measure, "load_checkpoint", lambda path: opened.append(path) or load(path))
    results = measure.main([*dirs, "--match_loss=auto", f"--out_dir={tmp_path}", "--figures=False",
                            "--interventions=False", "--quantization=False", *FAST])
    kept = [os.path.join(d, n) for d in dirs for n in os.listdir(d) if n.endswith(".pt")]
    assert sorted(opened) == sorted(kept)   # each kept checkpoint opened once, the measured ones too
    for m in results:
        assert m["selection"]["match_loss"] == target and m["selection"]["auto"]
        assert m["selection"]["distance"] == pytest.approx(abs(m["val_loss_recorded"] - target))
    assert (tmp_path / "vanilla" / "metrics.json").exists()
    summary = (tmp_path / "summary.md").read_text()
    assert f"Checkpoints: matched loss, the kept snapshot of each run whose val loss is closest to {target:.4f}" in summary
    assert all(m["selection"]["checkpoint"] == "matched_loss" for m in results)


def test_without_match_loss_the_summary_says_it_measured_the_final_checkpoints_at_equal_steps(runs, tmp_path):
    results = measure.main([runs["vanilla"], runs["ledger"], f"--out_dir={tmp_path}", "--figures=False",
                            "--interventions=False", "--quantization=False", *FAST])
    assert [m["selection"]["checkpoint"] for m in results] == ["final", "final"]
    summary = (tmp_path / "summary.md").read_text()
    assert "Checkpoints: the final one of each input (iter 20, 20), equal steps, as the released code" in summary
    assert "The released code's definitions" in summary and "| ledger | C |" in summary
    # the answer first: the claims whose arms were measured, right under the title
    parts = summary.split("\n\n")
    title = next(k for k, part in enumerate(parts) if part.startswith("# Residual-stream structure"))
    answer, claims = parts[title + 1], parts[title + 2]
    assert answer.startswith("The paper's claims, asked of these runs") and "docs/results/lab-seeds.md" in answer
    assert claims.startswith("1. C rebuilds the start-token outlier. This run: ") and "\n2. It is smaller" in claims
    assert "\n3." not in claims   # no ledger-hs run: no third claim


def test_two_runs_give_identical_numbers(runs, tmp_path):
    def numbers(out):
        measure.main([runs["hc2"], f"--out_dir={out}", "--figures=False", *FAST])
        m = load_metrics(out)
        for key in ("timing", "out_dir", "settings"):
            m.pop(key)
        return m
    assert numbers(tmp_path / "a") == numbers(tmp_path / "b")


def test_cli_measures_several_arms_with_figures(runs, tmp_path):
    out = subprocess.run([sys.executable, "measure.py", runs["ledger"], runs["hc2"], f"--out_dir={tmp_path}", *FAST,
                          "--num_windows=4", "--interventions=False", "--quantization=False"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "| ledger |" in out.stdout and "| hc2 |" in out.stdout and "tokens/s" in out.stdout
    assert (tmp_path / "summary.md").exists() and (tmp_path / "comparison_decoded.png").exists()
    for run, streams in (("ledger", ("D", "C")), ("hc2", ("h0", "h1", "h0_plus_h1"))):
        files = set(os.listdir(tmp_path / run))
        assert {"metrics.json", "extreme_tokens.png"} <= files
        for s in streams:
            assert {f"{s}_dims.png", f"{s}_dominant_positions.png", f"{s}_sun_layerwise.png"} <= files
            assert (tmp_path / run / f"{s}_sun_layerwise.png").stat().st_size > 0


# ----------------------------------------------------------------------------------------------
# Clear errors

def expect_error(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        measure.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert fragment in err, err


def test_clear_one_line_errors(runs, tmp_path, capsys):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    expect_error(capsys, [str(text)], "not a readable checkpoint")
    torch.save({"format": "nanogpt"}, tmp_path / "other.pt")
    expect_error(capsys, [str(tmp_path / "other.pt")], "not a ledger-residuals checkpoint")
    torch.save({"format": CKPT_FORMAT, "model_config": {"arch": "mamba"}}, tmp_path / "arm.pt")
    expect_error(capsys, [str(tmp_path / "arm.pt")], "unknown arm 'mamba'")
    torch.save({"format": CKPT_FORMAT, "model_config": {"arch": "vanilla", "attention": "sigmod"}},
               tmp_path / "kind.pt")
    expect_error(capsys, [str(tmp_path / "kind.pt"), f"--out_dir={tmp_path}"], "unknown attention 'sigmod'")
    expect_error(capsys, [str(tmp_path / "missing")], "no such file or folder; measure.py takes a checkpoint file")
    ckpt = os.path.join(runs["vanilla"], "ckpt.pt")
    expect_error(capsys, [ckpt, f"--out_dir={tmp_path}", f"--data_root={tmp_path / 'nowhere'}"], "prepare_data.py")
    other = make_char_dataset(tmp_path, ["abc abc\n" * 300, "cab\n" * 300], name="small")
    expect_error(capsys, [ckpt, f"--out_dir={tmp_path}", f"--data_root={other}"], "vocab mismatch")
    expect_error(capsys, [ckpt, f"--out_dir={tmp_path}", "--seq_len=1000"],
                 "exceeds the checkpoint's block_size=64")
    expect_error(capsys, [ckpt, "--num_window=3"], "did you mean 'num_windows'")
    expect_error(capsys, [ckpt, "--figures=maybe"], "figures='maybe'")
