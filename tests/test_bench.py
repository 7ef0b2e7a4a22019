"""bench.py's contracts: its FLOP count is the 6N + 12LdT formula, one short run of every arm, and of
arms with another attention kind, prints the table and writes the JSON, and its step is train.py's."""
import contextlib
import json

import pytest
import torch

import bench
import ledger

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--gate_rank=4", "--vocab_size=50",
        "--batch_size=2", "--device=cpu"]


def test_vanilla_flops_per_token_are_6N_plus_12LdT():
    L, d, T, V = 3, 48, 64, 101
    params, flops = bench.costs(ledger.GPTConfig(n_layer=L, n_head=4, n_embd=d, block_size=T, vocab_size=V))
    # per layer: qkv 3d^2 + proj d^2 + MLP 8d^2 and its biases 4d + d, two RMSNorm gains; the final
    # norm; the untied head
    non_embedding = L * (12 * d * d + 5 * d + 2 * d) + d + d * V
    assert params == non_embedding + V * d + T * d  # plus token and position embeddings
    assert flops == 6 * non_embedding + 12 * L * d * T


def test_a_short_run_of_every_arm_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main([*TINY, "--arms=all", "--steps=1", "--rounds=2", "--warmup=0", f"--out_json={out}"])
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("arm "))
    assert [line.split()[0] for line in lines[header + 1:header + 7]] == list(ledger.ARCHS)  # one line per arm
    result = json.loads(out.read_text())
    assert result["tokens_per_step"] == 2 * 16 and result["compile"] is False
    arms = result["arms"]
    assert list(arms) == list(ledger.ARCHS)
    for arm in arms.values():
        assert len(arm["ms_per_step_rounds"]) == 2 and arm["tokens_per_s"] > 0
        assert arm["mfu"] is None and arm["peak_memory_gib"] is None  # CUDA only
    assert arms["vanilla"]["ratio_to_vanilla"] == 1.0 and arms["vanilla"]["flop_ratio"] == 1.0
    assert arms["ledger"]["param_ratio"] > 1.0 and arms["ledger"]["flop_ratio"] > 1.0
    assert arms["suppress"]["params"] == arms["vanilla"]["params"] + 2 * 2 * 16  # q and k norm gains
    # the same table, with its provenance header, is a results file beside the json
    md = (tmp_path / "bench.md").read_text()
    assert md.startswith("> Written by `python bench.py ") and f"torch {torch.__version__}" in md
    assert lines[header] in md and lines[header + 1] in md


def test_an_arm_with_another_attention_kind_is_timed_beside_vanilla(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main([*TINY, "--arms=vanilla,vanilla+attn_bias,ledger+sigmoid,vanilla+gated", "--steps=1", "--rounds=1",
                "--warmup=0", f"--out_json={out}"])
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("arm "))
    names = ["vanilla", "vanilla+attn_bias", "ledger+sigmoid", "vanilla+gated"]
    assert [line.split()[0] for line in lines[header + 1:header + 5]] == names
    arms = json.loads(out.read_text())["arms"]
    assert [(a["arch"], a["attention"]) for a in arms.values()] == [
        ("vanilla", "softmax"), ("vanilla", "attn_bias"), ("ledger", "sigmoid"), ("vanilla", "gated")]
    assert all(a["ratio_to_vanilla"] > 0 for a in arms.values())
    base, d, layers, heads = arms["vanilla"]["params"], 32, 2, 2
    assert arms["vanilla+attn_bias"]["params"] == base + layers * 2 * d   # k' and v': heads x head_dim each
    assert arms["vanilla+gated"]["params"] == base + layers * (d * d + d)  # W_g and its bias


def test_bad_arms_fail_clearly():
    with pytest.raises(bench.cli.ConfigError, match="--arms takes"):
        bench.main([*TINY, "--arms=vanilla,ledgr"])
    with pytest.raises(bench.cli.ConfigError, match="ATTENTION one of softmax,attn_bias,sigmoid,gated; got 'vanilla"):
        bench.main([*TINY, "--arms=vanilla+gate"])
    with pytest.raises(bench.cli.ConfigError, match="steps=0: must be >= 1"):
        bench.main([*TINY, "--steps=0"])


@pytest.mark.parametrize("arch", ["vanilla", "ledger"])
def test_benchs_step_is_train_pys_step(arch):
    # bench.py writes the step out as nanoGPT's bench does; it must stay the step train.py takes
    import copy

    import train
    config = ledger.GPTConfig(arch=arch, n_layer=2, n_head=2, n_embd=32, block_size=16, gate_rank=4, vocab_size=50)
    torch.manual_seed(0)
    trained = ledger.GPT(config)
    benched = copy.deepcopy(trained)
    xs, ys = torch.randint(50, (2, 2, 16)), torch.randint(50, (2, 2, 16))   # two micro-steps of 2 x 16 tokens
    cfg = train.TrainConfig(device="cpu")
    optimizer = train.configure_optimizer(trained, cfg, "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for x, y in zip(xs, ys):
        total, _ = train.training_loss(trained, x, y, contextlib.nullcontext(), config.commit_sparsity)
        scaler.scale(total / len(xs)).backward()
    train.optimizer_step(trained, optimizer, scaler, cfg.grad_clip)
    assert (cfg.learning_rate, cfg.weight_decay, cfg.grad_clip) == (bench.LEARNING_RATE, bench.WEIGHT_DECAY,
                                                                     bench.GRAD_CLIP)
    bench_optimizer = torch.optim.AdamW(benched.parameters(), lr=bench.LEARNING_RATE, weight_decay=bench.WEIGHT_DECAY)
    bench.train_step(benched, benched, bench_optimizer, torch.amp.GradScaler("cpu", enabled=False), xs, ys,
                     contextlib.nullcontext(), config.commit_sparsity)
    for (name, a), b in zip(trained.state_dict().items(), benched.state_dict().values()):
        assert torch.equal(a, b), name
