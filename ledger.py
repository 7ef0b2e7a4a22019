"""
The models of "Massive Activations Are Architecturally Robust" (arXiv 2606.20743), in one file.

Every arm is the same pre-norm GPT (token + learned position embeddings, attention and MLP
sublayers, RMSNorm before each sublayer and before an untied LM head). The arms differ in one
place only: the *residual operator*, i.e. how a sublayer's output y is folded into the state that
flows through depth, and which state the LM head decodes.

    vanilla    h <- h + y                                   decode h
    suppress   vanilla, plus RMSNorm on each head's q and k (QK-norm)
    ledger     two streams, D (Deliberation, scratch) and C (Commitment, append-only):
                 D <- D - beta_e * (k . D) k + beta_w * (y + G(y))      erase / write the scratch
                 C <- C + c * (D + P(D))                                 commit, never erase
               decode C (+ gamma * D, gamma = 0 by default)
    ledger-hs  ledger with a heavy commit-sparsity penalty (the training loss adds lambda * mean(c))
    delta      one stream with the delta rule: h <- h - beta * (k . h) k + beta * W_g y   (one gate)
    hc2        static hyper-connections with two streams (Zhu et al. 2024), decode their sum

Initialisation follows the paper's released code (MaruthiV/ledger-residuals): every gate starts as
exactly its bias, the same for every token (the output weights of its map are zero), G and P start
as 0, and the MLP's linears carry biases. docs/released-code.md lists what this repo still does
differently.

Pinned to one gate setting (no erase, full write, G = P = 0, closed commit gate, lam = 0,
gamma = 1), Ledger's D follows exactly the vanilla h and the model is exactly the vanilla model:
see `pin_to_vanilla_corner` and tests/test_ledger.py.

Orthogonal to the arm, `attention` picks the attention kind. The paper's arms use softmax; the other
kinds are positive controls, changes to attention that published work says remove the outlier:

    softmax    softmax(q.k / sqrt(d)) over positions <= t                       (the paper's arms)
    attn_bias  softmax over a learned key k' (value v') and positions <= t       (Sun et al. 2024)
    sigmoid    sigmoid(q.k / sqrt(d)) on each position <= t, no normalisation    (Gu et al. 2024)
    gated      softmax, its output times sigmoid(W_g u) elementwise              (Qiu et al. 2025)

Read top to bottom: config, the residual operators (the paper, in four small classes; Ledger's
update is `LedgerResidual.forward`), the model, its building blocks and attention kinds, the vanilla
corner, and last the names and limits the scripts use.
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHS = ("vanilla", "suppress", "ledger", "ledger-hs", "delta", "hc2")
ATTENTIONS = ("softmax", "attn_bias", "sigmoid", "gated")


# ----------------------------------------------------------------------------------------------
# Config

@dataclass
class GPTConfig:
    arch: str = "vanilla"            # the arm, one of ARCHS: vanilla, suppress, ledger, ledger-hs, delta, hc2
    vocab_size: int = 50257          # GPT-2 BPE; train.py takes it from the dataset's meta.json
    block_size: int = 1024           # longest sequence the position embedding covers
    n_layer: int = 12                # blocks; each block is two sublayers (attn, mlp)
    n_head: int = 12                 # attention heads, each n_embd / n_head wide
    n_embd: int = 768                # width of the residual stream (of each stream)
    qk_norm: Optional[bool] = None   # None: on for `suppress` only; True adds QK-norm to any arm
    attention: str = "softmax"       # one of ATTENTIONS: softmax (the paper's), attn_bias, sigmoid, gated; any arch
    # Ledger (and delta) knobs
    gate_rank: int = 64              # rank of Ledger's maps W_e, W_w, W_k, G, P; <= 0 or >= n_embd: full (delta: always full)
    erase_bias: float = -3.0         # beta_e starts at sigmoid(-3) ~ 0.05: erase almost nothing (delta's one gate too)
    write_bias: float = 3.0          # beta_w starts at sigmoid(+3) ~ 0.95: write almost all of y
    commit_bias_early: float = -4.0  # commit-gate bias at the first sublayer: commit ~ 2%
    commit_bias_late: float = 4.0    # ... rising linearly to the last sublayer: commit ~ 98%
    commit_budget: float = 0.0       # rho: cap ||C|| per token at rho (0 = off)
    decode_gamma: float = 0.0        # decode RMSNorm(C + gamma * D); 0 = the LM head sees only C
    commit_sparsity: Optional[float] = None  # loss weight on mean(c); None: 0.02 ledger, 0.3 -hs
    delta_untied_gates: bool = False  # delta arm: separate erase and write gates (has a vanilla corner)
    hc2_init: str = "released"       # hc2: released (read and output mixes 0.5, 0.5) or zhu (one-hot read, output 1, 1)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {self.attention!r}; choose one of {', '.join(ATTENTIONS)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

        if self.qk_norm is None:
            self.qk_norm = self.arch == "suppress"
        elif self.arch == "suppress" and not self.qk_norm:
            raise ValueError("arch 'suppress' is vanilla + QK-norm; it cannot run with qk_norm=False")
        if self.commit_sparsity is None:
            self.commit_sparsity = {"ledger": 0.02, "ledger-hs": 0.3}.get(self.arch, 0.0)
        if self.hc2_init not in ("released", "zhu"):
            raise ValueError(f"unknown hc2_init {self.hc2_init!r}; choose released or zhu")

    @property
    def residual(self) -> str:
        """The residual operator of this arm: 'add', 'ledger', 'delta' or 'hc2'."""
        return {"vanilla": "add", "suppress": "add", "ledger-hs": "ledger"}.get(self.arch, self.arch)

    @property
    def stream_names(self) -> tuple:
        """Names of the residual streams a forward pass carries (and hands to a stream hook)."""
        return {"ledger": ("D", "C"), "hc2": ("h0", "h1")}.get(self.residual, ("h",))

    @property
    def decoded_stream(self) -> str:
        """The stream the LM head reads: where the paper looks for the massive activation."""
        return {"ledger": "C", "hc2": "h0+h1"}.get(self.residual, "h")


# ----------------------------------------------------------------------------------------------
# Residual operators: the one place the arms differ. Each maps (state, u, y) to the new state, where
# state is a dict of streams, u = RMSNorm(read(state)) the sublayer's input and y = sublayer(u) its
# output. forward also returns the sublayer's mean commit gate (Ledger) or None.

class AddResidual(nn.Module):
    """vanilla / suppress: the single stream h is both scratchpad and answer."""

    def read(self, state):
        return state["h"]

    def forward(self, state, u, y):
        return {"h": state["h"] + y}, None


class LedgerResidual(nn.Module):
    """Ledger: a scratch stream D that sublayers may erase and rewrite, and an append-only
    commitment stream C that only ever grows by gated copies of D. The LM head reads only C.

    Every gate map starts with zero output weights, as in the released code: at step 0 each gate is
    exactly sigmoid(its bias) for every token, and it learns to depend on u from there. G and P start
    as 0, so D starts as the vanilla h and is committed as it is."""

    def __init__(self, config: GPTConfig, commit_bias: float):
        super().__init__()
        d, r = config.n_embd, config.gate_rank
        self.erase_key = LowRank(d, r)                                  # W_k: the direction to erase
        self.write_map = LowRank(d, r, zero_init=True)                  # G
        self.erase_gate = LowRank(d, r, bias=True, zero_init=True)      # W_e
        self.write_gate = LowRank(d, r, bias=True, zero_init=True)      # W_w
        nn.init.constant_(self.erase_gate.up.bias, config.erase_bias)
        nn.init.constant_(self.write_gate.up.bias, config.write_bias)
        self.commit_gate = linear(d, 1, bias=True)                      # w_c: one scalar per token
        nn.init.zeros_(self.commit_gate.weight)
        nn.init.constant_(self.commit_gate.bias, commit_bias)
        self.promote_map = LowRank(d, r, zero_init=True)                # P
        self.read_mix = nn.Parameter(torch.zeros(d))                    # lam: how much C nudges the input
        self.commit_budget = config.commit_budget                       # rho (0 = off)

    def read(self, state):
        return state["D"] + self.read_mix * state["C"]

    def forward(self, state, u, y):
        D, C = state["D"], state["C"]
        erase = torch.sigmoid(self.erase_gate(u))           # beta_e = sigmoid(W_e u), per dimension
        write = torch.sigmoid(self.write_gate(u))           # beta_w = sigmoid(W_w u), per dimension
        k = self.erase_key(u)                               # k = W_k u / |W_k u|: the erase direction
        # (k . D) k / |k|^2 is the erase along the unit key, without a pass to normalise k
        k_dot_D = (k * D).sum(-1, keepdim=True) / k.norm(dim=-1, keepdim=True).clamp_min(1e-12).square()
        D = D - erase * k_dot_D * k + write * (y + self.write_map(y))      # deliberate: erase, write
        commit = torch.sigmoid(self.commit_gate(u))         # c = sigmoid(w_c . u), (B, T, 1)
        C = C + commit * (D + self.promote_map(D))          # commit: append, never erase
        if self.commit_budget > 0:                          # optional: ||C|| <= rho
            C = C * (self.commit_budget / C.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
        return {"D": D, "C": C}, commit.mean()


class DeltaResidual(nn.Module):
    """delta control: Ledger's erase-and-write rule on a single stream, no separate commitment.

        h <- h - beta_e * (k . h) k + beta_w * W_g y

    Built as the released `delta_only`: full-rank maps, one gate that both erases and writes
    (beta_e = beta_w), and a write map W_g that starts as the identity. That is y + G(y) at step 0,
    but weight decay pulls W_g towards 0, not towards I. delta_untied_gates=True gives it two gates,
    and so a vanilla corner."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        d = config.n_embd
        self.erase_key = LowRank(d, 0)
        self.write_map = LowRank(d, 0)
        nn.init.eye_(self.write_map.up.weight)
        self.erase_gate = LowRank(d, 0, bias=True, zero_init=True)
        nn.init.constant_(self.erase_gate.up.bias, config.erase_bias)
        if config.delta_untied_gates:
            self.write_gate = LowRank(d, 0, bias=True, zero_init=True)
            nn.init.constant_(self.write_gate.up.bias, config.write_bias)
        else:
            # at the released bias (-3) the one gate erases little and writes only ~5% of y at step 0
            self.write_gate = self.erase_gate

    def read(self, state):
        return state["h"]

    def forward(self, state, u, y):
        h = state["h"]
        erase = torch.sigmoid(self.erase_gate(u))
        write = erase if self.write_gate is self.erase_gate else torch.sigmoid(self.write_gate(u))
        k = self.erase_key(u)
        k_dot_h = (k * h).sum(-1, keepdim=True) / k.norm(dim=-1, keepdim=True).clamp_min(1e-12).square()
        return {"h": h - erase * k_dot_h * k + write * self.write_map(y)}, None


class HyperResidual(nn.Module):
    """hc2 control: static hyper-connections with n = 2 streams. Learned scalars mix the streams
    into the sublayer's input (read), mix the streams with each other (width), and distribute y
    over them (output). Both streams start as the embedding.

    hc2_init='released' starts as the released code does: read and output mixes (0.5, 0.5), so the
    two streams stay equal until training breaks the symmetry. 'zhu' is Zhu et al.'s (2024) init:
    sublayer i reads stream i mod 2 alone and writes y to both."""

    def __init__(self, config: GPTConfig, index: int):
        super().__init__()
        if config.hc2_init == "zhu":
            self.read_weights = nn.Parameter(F.one_hot(torch.tensor(index % 2), 2).float())
            self.output_weights = nn.Parameter(torch.ones(2))
        else:
            self.read_weights = nn.Parameter(torch.full((2,), 0.5))
            self.output_weights = nn.Parameter(torch.full((2,), 0.5))
        self.width_mix = nn.Parameter(torch.eye(2))

    def read(self, state):
        return self.read_weights[0] * state["h0"] + self.read_weights[1] * state["h1"]

    def forward(self, state, u, y):
        h0, h1 = state["h0"], state["h1"]
        m, b = self.width_mix, self.output_weights
        return {"h0": m[0, 0] * h0 + m[1, 0] * h1 + b[0] * y,
                "h1": m[0, 1] * h0 + m[1, 1] * h1 + b[1] * y}, None


# ----------------------------------------------------------------------------------------------
# The model

def residual_for(config: GPTConfig, index: int, n_sublayers: int) -> nn.Module:
    """The residual operator of sublayer `index` (of n_sublayers) in config's arm."""
    if config.residual == "ledger":
        # Commitment opens with depth: early sublayers mostly deliberate, late ones commit.
        depth = index / max(n_sublayers - 1, 1)
        bias = config.commit_bias_early + depth * (config.commit_bias_late - config.commit_bias_early)
        return LedgerResidual(config, bias)
    if config.residual == "delta":
        return DeltaResidual(config)
    if config.residual == "hc2":
        return HyperResidual(config, index)
    return AddResidual()


class Sublayer(nn.Module):
    """One pre-norm sublayer: read the state, normalise, attend or MLP, fold y back in. `norm` and
    `fn` may be given (a pretrained model's own: ledgerlab/retrofit.py); by default they are built here."""

    def __init__(self, config: GPTConfig, kind: str, index: int, n_sublayers: int,
                 norm: Optional[nn.Module] = None, fn: Optional[nn.Module] = None):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(config.n_embd) if norm is None else norm
        if fn is None:
            fn = CausalSelfAttention(config) if kind == "attn" else MLP(config)
        self.fn = fn
        self.residual = residual_for(config, index, n_sublayers)

    def forward(self, state):
        u = self.norm(self.residual.read(state))
        return self.residual(state, u, self.fn(u))


# A stream hook sees every sublayer's output streams: hook(index, kind, streams) where index is the
# sublayer (0 .. 2*n_layer-1), kind is 'attn' or 'mlp' and streams maps names ('h'; 'D', 'C';
# 'h0', 'h1') to (B, T, n_embd) tensors. It may return a dict replacing some streams (used by
# metrics.py's interventions), or None. Nothing is stored, so memory does not grow with depth.
StreamHook = Callable[[int, str, dict], Optional[dict]]


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        for emb in (self.wte, self.wpe):
            nn.init.normal_(emb.weight, std=0.02)
        n_sub = 2 * config.n_layer
        self.sublayers = nn.ModuleList(
            Sublayer(config, "attn" if i % 2 == 0 else "mlp", i, n_sub) for i in range(n_sub))
        self.final_norm = RMSNorm(config.n_embd)
        self.lm_head = linear(config.n_embd, config.vocab_size)
        if config.residual == "ledger":
            # gamma is a buffer, not a config constant, so that the vanilla corner can set it to 1.
            self.register_buffer("decode_gamma", torch.tensor(config.decode_gamma))

    @property
    def sublayer_names(self):
        return [f"{i // 2}.{sub.kind}" for i, sub in enumerate(self.sublayers)]

    def embed(self, idx):
        """The (B, T, n_embd) input of the first sublayer: token plus learned position embeddings."""
        return self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))

    def initial_state(self, x):
        if self.config.residual == "ledger":
            return {"D": x, "C": torch.zeros_like(x)}   # deliberation starts at the embedding
        if self.config.residual == "hc2":
            return {"h0": x, "h1": x}
        return {"h": x}

    def decoder_input(self, state):
        """What the final RMSNorm and the LM head read."""
        if self.config.residual == "ledger":
            return state["C"] + self.decode_gamma * state["D"]
        if self.config.residual == "hc2":
            return state["h0"] + state["h1"]
        return state["h"]

    def forward(self, idx, targets=None, stream_hook: Optional[StreamHook] = None):
        """Returns (logits, loss, commit_gates).

        loss is the language-model cross entropy (None without targets; targets of -1 are ignored).
        commit_gates holds, for Ledger arms, the mean commit gate of each sublayer in this pass,
        connected to the graph so that training can add `commit_sparsity * commit_gates.mean()`;
        None for the other arms.
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}; "
                             f"use shorter windows or a model built with a larger block_size")
        state = self.initial_state(self.embed(idx))
        gates = []
        for i, sub in enumerate(self.sublayers):
            state, commit = sub(state)
            if commit is not None:
                gates.append(commit)
            if stream_hook is not None:
                replaced = stream_hook(i, sub.kind, state)
                if replaced:
                    state = {**state, **replaced}
        logits = self.lm_head(self.final_norm(self.decoder_input(state)))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss, (torch.stack(gates) if gates else None)

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + self.wpe.weight.numel()
        return n

    def flops_per_token(self):
        """Training FLOPs per token, PaLM-style: 6 per non-embedding weight (forward and backward),
        plus attention."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * c.block_size


# ----------------------------------------------------------------------------------------------
# Building blocks, identical in every arm

def linear(fan_in, fan_out, bias=False):
    """A Linear layer with the GPT-2 init every arm shares: weights ~ N(0, 0.02), biases 0."""
    layer = nn.Linear(fan_in, fan_out, bias=bias)
    nn.init.normal_(layer.weight, std=0.02)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        # Biased, as in the released code (whose attention and LM head are not).
        self.up = linear(config.n_embd, 4 * config.n_embd, bias=True)
        self.down = linear(4 * config.n_embd, config.n_embd, bias=True)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class LowRank(nn.Module):
    """dim -> rank -> dim, or one full dim x dim matrix when rank <= 0 or rank >= dim.

    Ledger's extra maps are low rank so that its parameter count stays close to vanilla's: any
    difference the experiment measures should come from the factorization, not from capacity.
    `zero_init` makes the map start as exactly zero (only the output factor is zeroed, so the
    input factor still receives gradient and the map can grow).
    """

    def __init__(self, dim, rank, bias=False, zero_init=False):
        super().__init__()
        full = rank <= 0 or rank >= dim
        self.down = None if full else linear(dim, rank)
        self.up = linear(dim if full else rank, dim, bias=bias)
        if zero_init:
            nn.init.zeros_(self.up.weight)
        if not full:
            self.up.weight = column_major(self.up.weight)

    def forward(self, x):
        return self.up(x if self.down is None else self.down(x))


@dataclass
class AttentionWeights:
    """What one attention layer did with its input u, spelled out (SDPA keeps it hidden): metrics.py
    reads attention sinks, value drains and gates from it. CausalSelfAttention.attention_weights
    computes it with the same pieces forward uses, and a test checks that it reproduces forward."""
    weights: torch.Tensor                       # (B, H, T, T): query t's weight on position s <= t
    values: torch.Tensor                        # (B, H, T, head_dim)
    sink_weight: Optional[torch.Tensor] = None  # attn_bias: (B, H, T), each query's weight on k'
    sink_value: Optional[torch.Tensor] = None   # attn_bias: (1, H, 1, head_dim), the value v' it returns
    gate: Optional[torch.Tensor] = None         # gated: (B, H, T, head_dim), sigmoid(W_g u) per head


def visible_keys(T, S, device):
    """(T, S) bool: which keys each query sees. S = T: positions <= t. S = T + 1: attn_bias's sink
    key in column 0, which every query sees, then positions <= t."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention of the kind config.attention names (the module docstring lists
    them); QK-norm, when on, composes with every kind. forward and attention_weights share heads(),
    attention_probs(), with_sink() and output_gate(); forward keeps SDPA where a kernel computes the
    same thing faster."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.attention = config.attention
        self.qkv = linear(config.n_embd, 3 * config.n_embd)
        self.proj = linear(config.n_embd, config.n_embd)
        head_dim = config.n_embd // config.n_head
        # QK-norm bounds the attention logits, removing the usual route by which a model builds an
        # attention sink out of one huge residual dimension; `suppress` tests whether that suffices.
        self.q_norm = RMSNorm(head_dim) if config.qk_norm else None
        self.k_norm = RMSNorm(head_dim) if config.qk_norm else None
        # Parameters of the other kinds are made only for them, and after the shared ones: a softmax
        # model has the same parameters, draws the same random numbers and computes the same outputs
        # as before the kinds existed.
        if config.attention == "attn_bias":
            # Sun et al. 2024 (arXiv 2402.17762; locuslab/massive-activations, gpt-2/model_attn_bias.py):
            # one learned key k' and value v' per head, N(0, 0.02), put in front of every sequence.
            # A head with nothing to do can park its attention on k' (an explicit sink), so the model
            # no longer needs to build a sink out of a massive activation on the first token.
            self.sink_key = nn.Parameter(torch.empty(1, config.n_head, 1, head_dim).normal_(std=0.02))
            self.sink_value = nn.Parameter(torch.empty(1, config.n_head, 1, head_dim).normal_(std=0.02))
        elif config.attention == "gated":
            # Qiu et al. 2025 (arXiv 2505.06708; qiuzh20/gated_attention, modeling_qwen3.py): each head's
            # output is multiplied elementwise by sigmoid(W_g u), so a head can switch itself off
            # where softmax would have to park its weight on a sink. Their W_g is extra columns of the
            # query projection; here it is a separate layer, so that qkv keeps vanilla's shape: its
            # matmul, and hence q, k, v, are then bit for bit vanilla's, and with the gate pinned to
            # exactly 1 the model is exactly vanilla (tests/test_ledger.py). The bias is what pins it;
            # it starts at 0, as their bias-free gate does (sigmoid ~ 0.5 at init).
            self.gate = linear(config.n_embd, config.n_embd, bias=True)

    def heads(self, x):
        """q, k, v per head, (B, H, T, head_dim); q and k QK-normed when qk_norm is on."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def with_sink(self, k, v):
        """attn_bias: k' and v' in front of the keys and values. Sun et al. concatenate them right before
        attention, so the 1/sqrt(d) scale applies to q.k' as to every logit, but any processing of the
        keys (QK-norm here) does not: k' is a free parameter, not a function of the residual stream."""
        B = k.size(0)
        sink_key, sink_value = (p.to(k.dtype).expand(B, -1, -1, -1) for p in (self.sink_key, self.sink_value))
        return torch.cat([sink_key, k], dim=2), torch.cat([sink_value, v], dim=2)

    def attention_probs(self, q, k):
        """(B, H, T, S) weights of the queries on the S keys they may see (visible_keys)."""
        T, S = q.size(-2), k.size(-2)
        logits = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
        hidden = ~visible_keys(T, S, q.device)
        if self.attention == "sigmoid":
            # Gu et al. 2024 (arXiv 2410.10781; sail-sg/Attention-Sink, lit_gpt/model_attn_sim.py with
            # attention_normalize=False): each weight on its own, sigmoid(q.k / sqrt(d)) times the
            # causal mask, no bias term and no row normalisation. Weights need not sum to 1, so a head
            # can attend to nothing at all instead of parking its attention on a sink.
            return torch.sigmoid(logits).masked_fill(hidden, 0.0)
        return logits.masked_fill(hidden, float("-inf")).softmax(-1)

    def output_gate(self, x):
        """gated: sigmoid(W_g u) per head and dimension, (B, H, T, head_dim)."""
        B, T, C = x.shape
        return torch.sigmoid(self.gate(x)).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def attention_weights(self, x) -> AttentionWeights:
        """The weights, values and per-kind extras forward computes from its input x (= u)."""
        q, k, v = self.heads(x)
        if self.attention == "attn_bias":
            probs = self.attention_probs(q, self.with_sink(k, v)[0])
            return AttentionWeights(probs[..., 1:], v, sink_weight=probs[..., 0], sink_value=self.sink_value)
        gate = self.output_gate(x) if self.attention == "gated" else None
        return AttentionWeights(self.attention_probs(q, k), v, gate=gate)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.heads(x)
        if self.attention == "sigmoid":   # no fused kernel leaves the weights unnormalised
            y = self.attention_probs(q, k) @ v
        elif self.attention == "attn_bias":
            k, v = self.with_sink(k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible_keys(T, T + 1, x.device))
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.attention == "gated":
            y = y * self.output_gate(x)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


# ----------------------------------------------------------------------------------------------
# Speed tricks, each with a test that it computes what the plain form does

def column_major(weight: nn.Parameter) -> nn.Parameter:
    """The same (dim, rank) matrix stored column-major, as the transpose of a contiguous (rank, dim)
    one: same values and state_dict, but CPU BLAS then runs the backward matmuls of a low-rank
    map's (tokens x rank) @ (rank x dim) in its fast orientation, 2-5x faster at rank 8."""
    return nn.Parameter(weight.detach().t().contiguous().t())


# ----------------------------------------------------------------------------------------------
# The vanilla corner

@torch.no_grad()
def pin_to_vanilla_corner(model: GPT) -> GPT:
    """Set a Ledger (or untied-gate delta) model's residual parameters to the gate setting at which
    it computes exactly the vanilla pre-norm transformer: no erase (beta_e = 0), full write
    (beta_w = 1), G = P = 0 (delta: W_g = I), a closed commit gate (c = 0, so C stays 0), lam = 0 and gamma = 1.
    Then D follows h + y bit for bit, and the head decodes RMSNorm(0 + 1 * D) = RMSNorm(h).

    sigmoid(-1e4) and sigmoid(1e4) are exactly 0 and 1 in float32 and float64, which makes the
    reduction exact rather than approximate. Shared weights are left alone: copy them in from a
    vanilla model to compare the two.
    """
    cfg = model.config
    if cfg.residual == "delta" and not cfg.delta_untied_gates:
        raise ValueError("delta with tied gates has no vanilla corner (one gate cannot both erase "
                         "nothing and write everything); build it with delta_untied_gates=True")
    if cfg.residual not in ("ledger", "delta"):
        raise ValueError(f"arch {cfg.arch!r} has no gates to pin; only ledger arms and delta do")

    def set_gate(gate: LowRank, logit: float):
        gate.up.weight.zero_()
        gate.up.bias.fill_(logit)

    for sub in model.sublayers:
        res = sub.residual
        set_gate(res.erase_gate, -1e4)
        set_gate(res.write_gate, 1e4)
        if isinstance(res, DeltaResidual):
            nn.init.eye_(res.write_map.up.weight)   # I y
        else:
            res.write_map.up.weight.zero_()         # y + 0
        if isinstance(res, LedgerResidual):
            res.commit_gate.weight.zero_()
            res.commit_gate.bias.fill_(-1e4)
            res.promote_map.up.weight.zero_()
            res.read_mix.zero_()
    if cfg.residual == "ledger":
        model.decode_gamma.fill_(1.0)
    return model


# ----------------------------------------------------------------------------------------------
# Names and limits the scripts use

def arm_name(arch: str, attention: str = "softmax") -> str:
    """An arm and its attention kind as one name, 'ledger' or 'vanilla+gated', as bench.py and
    measure.py print it: the paper's arms keep their names."""
    return arch if attention == "softmax" else f"{arch}+{attention}"


# Checked by cli.parse_overrides as each setting is read
GPTConfig.LIMITS = {"vocab_size": ">= 1", "block_size": ">= 1", "n_layer": ">= 1", "n_head": ">= 1", "n_embd": ">= 1",
                    "commit_budget": ">= 0", "commit_sparsity": ">= 0"}
