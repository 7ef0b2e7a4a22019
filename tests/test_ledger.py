"""The model's contracts, as the paper states them: Ledger is exactly vanilla at one gate setting,
every arm is causal, C is append-only, and the arms cost about the same number of parameters. And
for the attention kinds (the positive controls): every arm is causal and trains with every kind, and
gated attention with its gate pinned open is exactly vanilla."""
import copy
import os

import pytest
import torch

from ledger import ARCHS, ATTENTIONS, GPT, GPTConfig, LedgerResidual, pin_to_vanilla_corner

TINY = dict(vocab_size=97, block_size=32, n_layer=3, n_head=2, n_embd=32, gate_rank=8)
# `make bench-gpu` runs the exact-reduction and causality tests again with LEDGER_TEST_DEVICE=cuda.
DEVICE = os.environ.get("LEDGER_TEST_DEVICE", "cpu")


def tiny(arch, **overrides):
    torch.manual_seed(0)
    return GPT(GPTConfig(arch=arch, **{**TINY, **overrides})).to(DEVICE)


def tokens(batch=2, length=24, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=generator).to(DEVICE)


def vanilla_and_pinned(arch, dtype, **overrides):
    """A vanilla model, and an `arch` model pinned to its corner carrying the vanilla weights."""
    vanilla = tiny("vanilla").to(dtype)
    other = tiny(arch, **overrides).to(dtype)
    missing, unexpected = other.load_state_dict(vanilla.state_dict(), strict=False)
    assert not unexpected
    # Only the residual operator's own parameters are left out: everything else is shared.
    assert missing and all(".residual." in k or k == "decode_gamma" for k in missing)
    # Perturb the free residual weights first, so the test proves the pin, not a lucky init.
    with torch.no_grad():
        for name, p in other.named_parameters():
            if ".residual." in name:
                p.add_(torch.randn_like(p))
    return vanilla, pin_to_vanilla_corner(other)


@pytest.mark.parametrize("arch,overrides", [("ledger", {}), ("ledger-hs", {}), ("ledger", {"gate_rank": 0}),
                                            ("delta", {"delta_untied_gates": True})])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pinned_model_reduces_exactly_to_vanilla(arch, overrides, dtype):
    """Bit for bit, not approximately: at the corner every extra term is an exact 0 or 1."""
    vanilla, pinned = vanilla_and_pinned(arch, dtype, **overrides)
    x = tokens()
    with torch.no_grad():
        diff = (vanilla(x)[0] - pinned(x)[0]).abs().max().item()
    assert diff == 0, f"{arch} pinned differs from vanilla by {diff}"


def test_unpinned_ledger_differs_from_vanilla():
    """The reduction test can fail: without the pin the same weights give other logits."""
    vanilla = tiny("vanilla")
    ledger = tiny("ledger")
    ledger.load_state_dict(vanilla.state_dict(), strict=False)
    x = tokens()
    with torch.no_grad():
        assert (vanilla(x)[0] - ledger(x)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("arch,overrides", [("ledger", {}), ("ledger", {"gate_rank": 0}), ("delta", {}),
                                            ("delta", {"delta_untied_gates": True})])
def test_every_gate_is_sigmoid_of_its_bias_for_every_token_at_init(arch, overrides):
    """As in the released code: the gate maps' output weights start at zero, so at step 0 no gate
    depends on the token yet (the commit gate included)."""
    model = tiny(arch, **overrides)
    u = torch.randn(2, 5, TINY["n_embd"], device=DEVICE)
    cfg = model.config
    for i, sub in enumerate(model.sublayers):
        res = sub.residual
        erase, write = torch.sigmoid(res.erase_gate(u)), torch.sigmoid(res.write_gate(u))
        tied = arch == "delta" and not cfg.delta_untied_gates
        want_write = cfg.erase_bias if tied else cfg.write_bias   # one gate: both are beta_e
        assert torch.equal(erase, torch.full_like(erase, torch.sigmoid(torch.tensor(cfg.erase_bias)).item()))
        assert torch.equal(write, torch.full_like(write, torch.sigmoid(torch.tensor(want_write)).item()))
        if isinstance(res, LedgerResidual):
            c = torch.sigmoid(res.commit_gate(u))
            assert torch.equal(c, torch.full_like(c, torch.sigmoid(res.commit_gate.bias).item()))
            # the bias runs from commit_bias_early to commit_bias_late with depth
            depth = i / (len(model.sublayers) - 1)
            assert res.commit_gate.bias.item() == pytest.approx(-4.0 + 8.0 * depth)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arm_has_mlp_biases_and_no_attention_or_head_biases(arch):
    model = tiny(arch)
    for sub in model.sublayers:
        if sub.kind == "mlp":
            assert sub.fn.up.bias is not None and sub.fn.down.bias is not None
        else:
            assert sub.fn.qkv.bias is None and sub.fn.proj.bias is None
    assert model.lm_head.bias is None


def test_delta_and_hc2_start_as_the_released_code_starts_them():
    """delta_only: full-rank maps, one gate with bias -3, a write map that is the identity.
    hc2: read and output mixes (0.5, 0.5) and a width mix I, so the two streams start equal and stay
    equal through every sublayer until training breaks the symmetry."""
    delta = tiny("delta")
    for sub in delta.sublayers:
        res = sub.residual
        assert res.write_gate is res.erase_gate and res.erase_gate.up.bias[0].item() == -3.0
        for lowrank in (res.erase_key, res.erase_gate, res.write_map):
            assert lowrank.down is None and lowrank.up.weight.shape == (TINY["n_embd"], TINY["n_embd"])
        assert torch.equal(res.write_map.up.weight, torch.eye(TINY["n_embd"], device=DEVICE))
    hc2 = tiny("hc2")
    for sub in hc2.sublayers:
        res = sub.residual
        assert res.read_weights.tolist() == [0.5, 0.5] and res.output_weights.tolist() == [0.5, 0.5]
        assert torch.equal(res.width_mix, torch.eye(2, device=DEVICE))
    streams = []
    with torch.no_grad():
        hc2(tokens(), stream_hook=lambda i, k, s: streams.append(s))
    assert all(torch.equal(s["h0"], s["h1"]) for s in streams)
    zhu = tiny("hc2", hc2_init="zhu")   # this repo's earlier init, kept as a setting
    assert [sub.residual.read_weights.tolist() for sub in zhu.sublayers[:2]] == [[1.0, 0.0], [0.0, 1.0]]
    with pytest.raises(ValueError, match="hc2_init"):
        GPTConfig(arch="hc2", hc2_init="other")


def test_tied_delta_and_gateless_arms_refuse_the_pin():
    with pytest.raises(ValueError, match="delta_untied_gates"):
        pin_to_vanilla_corner(tiny("delta"))
    with pytest.raises(ValueError, match="no gates"):
        pin_to_vanilla_corner(tiny("vanilla"))


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_changing_token_t_never_changes_earlier_logits(arch, attention):
    model = tiny(arch, attention=attention).double()
    x = tokens(batch=1, length=20)
    with torch.no_grad():
        base = model(x)[0]
        for t in (0, 7, 19):
            changed = x.clone()
            changed[0, t] = (changed[0, t] + 1) % TINY["vocab_size"]
            out = model(changed)[0]
            assert torch.equal(out[:, :t], base[:, :t]), f"{arch}+{attention}: position < {t} saw token {t}"
            assert not torch.equal(out[:, t:], base[:, t:])  # and the change is seen from t on


def test_commitment_only_ever_receives_commits_of_the_new_scratch():
    """With lam = 0 and every erase gate forced wide open, each sublayer changes C by exactly
    c * (D + P(D)) with 0 < c < 1 per token: C keeps everything it held before."""
    model = tiny("ledger")
    with torch.no_grad():
        for sub in model.sublayers:
            sub.residual.erase_gate.up.bias.fill_(1e4)   # beta_e = 1: erase along k
            sub.residual.commit_gate.bias.fill_(0.0)            # c ~ 0.5: keep committing
            sub.residual.promote_map.up.weight.normal_(std=0.1)  # a non-trivial promotion P
    streams = []
    with torch.no_grad():
        model(tokens(), stream_hook=lambda i, kind, s: streams.append(dict(s)))
        for sub, before, after in zip(model.sublayers[1:], streams, streams[1:]):
            increment = after["C"] - before["C"]
            promoted = after["D"] + sub.residual.promote_map(after["D"])
            c = (increment * promoted).sum(-1, keepdim=True) / (promoted * promoted).sum(-1, keepdim=True)
            assert ((c > 0) & (c < 1)).all()
            assert torch.allclose(before["C"] + c * promoted, after["C"], atol=1e-5)


def test_commitment_holds_what_was_committed_when_commits_stop():
    """Close the commit gate after sublayer 2 and wipe D hard: C keeps exactly what it held."""
    model = tiny("ledger")
    with torch.no_grad():
        for i, sub in enumerate(model.sublayers):
            sub.residual.commit_gate.bias.fill_(2.0 if i < 2 else -1e4)
            sub.residual.erase_gate.up.bias.fill_(1e4)
    streams = []
    with torch.no_grad():
        model(tokens(), stream_hook=lambda i, kind, s: streams.append({k: v.clone() for k, v in s.items()}))
    committed = streams[1]["C"]
    assert committed.abs().sum() > 0
    for s in streams[2:]:
        assert torch.equal(s["C"], committed)
        assert not torch.equal(s["D"], streams[1]["D"])  # while the scratch keeps changing


def test_ledger_decodes_only_the_commitment_stream():
    """With gamma = 0 the logits depend on D only through what was committed to C: replacing D
    after the last sublayer changes nothing."""
    model = tiny("ledger")
    x = tokens()
    last = len(model.sublayers) - 1
    with torch.no_grad():
        base = model(x)[0]
        hooked = model(x, stream_hook=lambda i, k, s: {"D": torch.randn_like(s["D"])} if i == last else None)[0]
    assert torch.equal(base, hooked)


def test_ledger_costs_at_most_ten_percent_more_parameters_at_160m():
    counts = {}
    with torch.device("meta"):
        for arch in ARCHS:
            model = GPT(GPTConfig(arch=arch, n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024))
            counts[arch] = model.num_params()
    print("\nparameters at the 160M config:", {a: f"{n / 1e6:.2f}M" for a, n in counts.items()})
    assert counts["ledger"] <= 1.10 * counts["vanilla"]
    assert counts["ledger"] > counts["vanilla"]
    assert counts["ledger-hs"] == counts["ledger"]
    assert abs(counts["suppress"] - counts["vanilla"]) < 0.001 * counts["vanilla"]


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_arm_trains_with_finite_gradients(arch, attention):
    model = tiny(arch, attention=attention)
    x = tokens()
    logits, loss, gates = model(x, targets=x)
    total = loss + (model.config.commit_sparsity * gates.mean() if gates is not None else 0)
    total.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if arch in ("ledger", "ledger-hs"):
        assert gates.shape == (2 * TINY["n_layer"],)


def test_commit_sparsity_penalty_reaches_the_commit_gates():
    model = tiny("ledger")
    _, _, gates = model(tokens())
    gates.mean().backward()
    for sub in model.sublayers:
        gate = sub.residual.commit_gate
        assert gate.bias.grad is not None and gate.bias.grad.item() > 0  # penalty pushes c down
        assert gate.weight.grad.abs().sum() > 0


def test_arm_defaults_follow_the_paper():
    assert GPTConfig(arch="suppress").qk_norm is True
    assert GPTConfig(arch="vanilla").qk_norm is False
    assert GPTConfig(arch="ledger", qk_norm=True).qk_norm is True  # QK-norm combines with any arm
    assert GPTConfig(arch="ledger").commit_sparsity == 0.02
    assert GPTConfig(arch="ledger-hs").commit_sparsity == 0.3
    assert GPTConfig(arch="vanilla").commit_sparsity == 0.0
    assert GPTConfig(arch="ledger-hs", commit_sparsity=0.5).commit_sparsity == 0.5
    ledger = tiny("ledger")
    biases = [sub.residual.commit_gate.bias.item() for sub in ledger.sublayers]
    assert biases[0] == pytest.approx(-4.0) and biases[-1] == pytest.approx(4.0)
    assert all(a < b for a, b in zip(biases, biases[1:]))  # commitment opens with depth


def test_commit_budget_caps_the_commitment_norm():
    model = tiny("ledger", commit_budget=0.5)
    norms = []
    with torch.no_grad():
        model(tokens(), stream_hook=lambda i, k, s: norms.append(s["C"].norm(dim=-1).max().item()))
    assert max(norms) <= 0.5 + 1e-5
    assert max(norms) > 0.4  # the cap is reached, so it is what bounds C


def test_too_long_sequences_and_unknown_arms_fail_clearly():
    with pytest.raises(ValueError, match="exceeds block_size 32"):
        tiny("vanilla")(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown arch 'ledgr'"):
        GPTConfig(arch="ledgr")
    with pytest.raises(ValueError, match="qk_norm=False"):
        GPTConfig(arch="suppress", qk_norm=False)
    with pytest.raises(ValueError, match="unknown attention 'gate'; choose one of softmax, attn_bias, sigmoid, gated"):
        GPTConfig(attention="gate")


def test_stream_hook_sees_every_sublayer_and_can_replace_a_stream():
    model = tiny("hc2")
    seen = []
    x = tokens()
    with torch.no_grad():
        base = model(x)[0]
        out = model(x, stream_hook=lambda i, kind, s: seen.append((i, kind, sorted(s))))[0]
    assert torch.equal(base, out)  # a hook that returns None changes nothing
    assert seen == [(i, "attn" if i % 2 == 0 else "mlp", ["h0", "h1"]) for i in range(2 * TINY["n_layer"])]
    with torch.no_grad():
        zeroed = model(x, stream_hook=lambda i, k, s: {n: torch.zeros_like(v) for n, v in s.items()}
                       if i == len(seen) - 1 else None)[0]
    assert zeroed.abs().max() == 0  # the head decoded the replaced (zero) streams


# ----------------------------------------------------------------------------------------------
# Attention kinds (the positive controls)

@pytest.mark.parametrize("attention,extra", [("softmax", set()), ("attn_bias", {"sink_key", "sink_value"}),
                                             ("sigmoid", set()), ("gated", {"gate.weight", "gate.bias"})])
def test_each_attention_kind_adds_only_its_own_parameters(attention, extra):
    """A softmax model is the model of before; the others carry every softmax weight, so a vanilla
    checkpoint loads into them with only the kind's own parameters left out."""
    plain, model = tiny("ledger").state_dict(), tiny("ledger", attention=attention).state_dict()
    added = set(model) - set(plain)
    assert set(plain) <= set(model) and all(model[k].shape == plain[k].shape for k in plain)
    assert added == {f"sublayers.{i}.fn.{name}" for i in range(0, 2 * TINY["n_layer"], 2) for name in extra}


def pin_gates_open(model):
    """Gated attention with W_g = 0 and bias 1e4: sigmoid(1e4) is exactly 1 in float32 and float64."""
    with torch.no_grad():
        for sub in model.sublayers:
            if sub.kind == "attn":
                sub.fn.gate.weight.zero_()
                sub.fn.gate.bias.fill_(1e4)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gated_attention_pinned_open_reduces_exactly_to_vanilla(dtype):
    vanilla = tiny("vanilla").to(dtype)
    gated = tiny("vanilla", attention="gated").to(dtype)
    missing, unexpected = gated.load_state_dict(vanilla.state_dict(), strict=False)
    assert not unexpected and missing and all(".fn.gate." in k for k in missing)
    x = tokens()
    with torch.no_grad():
        base = vanilla(x)[0]
        assert not torch.equal(gated(x)[0], base)   # the test can fail: at init the gate is ~0.5
        assert torch.equal(pin_gates_open(gated)(x)[0], base)


def test_column_major_low_rank_maps_compute_what_plain_contiguous_ones_do():
    """The speed trick stores a low-rank map's output factor column-major; the map, its gradients and
    its state_dict are those of the plain (contiguous) layout, up to float rounding."""
    from ledger import LowRank
    torch.manual_seed(0)
    fast = LowRank(32, 8, bias=True)
    assert not fast.up.weight.is_contiguous() and fast.up.weight.t().is_contiguous()
    plain = copy.deepcopy(fast)
    plain.up.weight = torch.nn.Parameter(plain.up.weight.detach().contiguous())
    assert plain.up.weight.is_contiguous()
    x = torch.randn(4, 7, 32)
    for m in (fast, plain):
        m(x).square().sum().backward()
    torch.testing.assert_close(fast(x), plain(x))
    for a, b in zip(fast.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), plain.state_dict().values()))
