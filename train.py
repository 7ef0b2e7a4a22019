"""
Train any arm of ledger.py on a token dataset from prepare_data.py. One script, nanoGPT style.

    python train.py config/cpu_demo.py --arch=ledger           # a laptop CPU, minutes
    torchrun --standalone --nproc_per_node=8 train.py config/paper_160m.py --arch=ledger

Every setting and its default is listed once, below (TrainConfig for the loop, ledger.GPTConfig for
the model). Positional arguments are config files (plain Python assignments); `--key=value`
overrides come after them. The loop is identical for every arm: the arms differ only inside the
model, plus the commit-sparsity term that the paper adds to the loss of the Ledger arms.
"""
import ast
import dataclasses
import difflib
import json
import math
import os
import signal
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ledger import GPT, GPTConfig
from prepare_data import DataError, load_meta, open_split

CHECKPOINT_FORMAT = "ledger-residuals-ckpt/1"


# ----------------------------------------------------------------------------------------------
# Config: the defaults are the paper's 160M run (see config/paper_160m.py for the full preset)

@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"
    init_from: str = "scratch"       # 'scratch' or 'resume' (from out_dir/ckpt.pt)
    eval_interval: int = 250         # evaluate and write out_dir/ckpt.pt every this many iterations
    eval_iters: int = 50             # batches per split and evaluation
    log_interval: int = 10
    ckpt_interval: int = 1000        # also keep out_dir/ckpt_<iter>.pt, for matched-loss measurement
    wandb_log: bool = False
    wandb_project: str = "ledger-residuals"
    wandb_run_name: str = ""         # default: the arch
    # data
    dataset: str = "fineweb_edu"     # a folder of data_root written by prepare_data.py
    data_root: str = "data"
    batch_size: int = 24             # sequences per micro-batch, per process
    gradient_accumulation_steps: int = 1  # micro-steps per iteration across ALL processes
    # optimizer: AdamW, warmup then cosine
    learning_rate: float = 3e-4
    min_lr: float = 3e-5
    warmup_iters: int = 300
    lr_decay_iters: int = 0          # 0: decay until max_iters
    max_iters: int = 14000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    target_val_loss: float = 0.0     # > 0: stop at the first evaluation at or below it
    # system
    seed: int = 1337
    device: str = "auto"             # 'auto' (cuda > mps > cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
    dtype: str = "auto"              # 'auto' (bf16 where supported, else fp16 on GPU, fp32 on CPU)
    compile: bool = False


class ConfigError(ValueError):
    pass


def parse_value(key, value, annotation, text=None):
    """Check (and where safe, convert) a setting against the type its dataclass field declares.
    `text` is the raw command-line text, when the value came from `--key=text`."""
    allowed = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if value is None and type(None) in typing.get_args(annotation):
        return None
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is str and (isinstance(value, str) or text is not None):
            return value if isinstance(value, str) else text
    names = " or ".join(k.__name__ for k in allowed)
    raise ConfigError(f"{key}={text if text is not None else value!r}: expected {names}")


def parse_overrides(argv, *config_types):
    """Config files and `--key=value` overrides -> one dict of settings per dataclass type.

    A key belongs to the first dataclass that has a field of that name. Unknown keys and values of
    the wrong type raise ConfigError with a one-line message that names the key."""
    hints = [typing.get_type_hints(t) for t in config_types]
    known = [k for h in hints for k in h]
    settings = [{} for _ in config_types]

    def assign(key, value, text=None):
        for hint, chosen in zip(hints, settings):
            if key in hint:
                chosen[key] = parse_value(key, value, hint[key], text)
                return
        close = difflib.get_close_matches(key, known, n=1)
        raise ConfigError(f"unknown setting '{key}'" + (f"; did you mean '{close[0]}'?" if close else ""))

    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:  # a bare --flag means True for a bool setting
                text = "True"
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare word: a string setting such as --arch=ledger
            assign(key, value, text)
        else:
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg!r} not found (settings are --key=value)")
            namespace = {}
            exec(open(arg).read(), namespace)
            for key, value in namespace.items():
                if not key.startswith("_") and not callable(value) and not isinstance(value, type(os)):
                    assign(key, value)
    return settings


# ----------------------------------------------------------------------------------------------
# Building blocks of the loop

def get_lr(it, cfg: TrainConfig):
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(decay_iters - cfg.warmup_iters, 1)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


# Random windows whose offsets depend only on (seed, stream, iteration, global micro-batch index):
# a 2-process run with accumulation 2 and a 1-process run with accumulation 4 see the same data,
# and a resumed run sees exactly the batches the uninterrupted run would have seen.
TRAIN_STREAM, EVAL_STREAMS = 0, {"train": 1, "val": 2}


def get_batch(data_dir, meta, split, key, batch_size, block_size, device):
    # A fresh memmap per batch: numpy memmaps hold on to pages they have read (nanoGPT's lesson).
    data = open_split(data_dir, split, meta)
    if len(data) <= block_size + 1:
        raise DataError(f"{split} split of {data_dir} has {len(data)} tokens, too few for "
                        f"block_size {block_size}; use a smaller --block_size")
    offsets = np.random.default_rng(key).integers(0, len(data) - block_size, size=batch_size)
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in offsets]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in offsets]).astype(np.int64))
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def setup_device(cfg: TrainConfig, local_rank=None):
    """Resolve cfg.device ('auto': cuda > mps > cpu; under DDP, cuda:<local_rank>) and cfg.dtype
    ('auto': bf16 where the GPU has it, fp16 with a GradScaler on older GPUs, fp32 on CPU).
    Returns (device, device_type, ptdtype, autocast context)."""
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if not available.get(device.split(":")[0], False):
        raise ConfigError(f"--device={device} but torch sees no such device here; use --device=cpu")
    if local_rank is not None and device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if cfg.dtype == "auto":
        on_gpu = device.startswith("cuda")
        cfg.dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if on_gpu else "float32"
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be float32, bfloat16 or float16, not {cfg.dtype!r}")
    ptdtype = getattr(torch, cfg.dtype)
    device_type = "cuda" if device.startswith("cuda") else "mps" if device == "mps" else "cpu"
    autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return device, device_type, ptdtype, autocast


def configure_optimizer(model, cfg: TrainConfig, device_type):
    """AdamW with weight decay on matrices and embeddings only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]      # matrices and embeddings
    no_decay = [p for p in model.parameters() if p.dim() < 2]    # norms, gate biases, lam, hc scalars
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=device_type == "cuda")


def model_flops_per_token(model_config: GPTConfig, n_params_non_embedding):
    """Training FLOPs per token, PaLM-style: 6 per weight (forward and backward), plus attention."""
    return 6 * n_params_non_embedding + 12 * model_config.n_layer * model_config.n_embd * model_config.block_size


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


# Dense bf16 peak FLOP/s (no sparsity), for MFU. An unknown GPU simply gets no MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
              "L4": 121e12, "4090": 165e12, "3090": 71e12, "V100": 125e12}


def peak_flops(device):
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def save_checkpoint(path, payload):
    """Write to a temp file, flush it to disk, then rename: a crash mid-save leaves the old file."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    """Load a checkpoint written by this script (weights_only: never executes pickled code)."""
    if not os.path.isfile(path):
        raise ConfigError(f"no checkpoint at {path}; train one first (init_from=scratch)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ConfigError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a ledger-residuals checkpoint (format {CHECKPOINT_FORMAT} expected)")
    # torch.compile wraps the model as `_orig_mod`; never let that prefix reach the weights
    if isinstance(ckpt.get("model"), dict):
        ckpt["model"] = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    return ckpt


# ----------------------------------------------------------------------------------------------
# The training run

def main(argv=None):
    train_overrides, model_overrides = parse_overrides(sys.argv[1:] if argv is None else argv,
                                                       TrainConfig, GPTConfig)
    cfg = TrainConfig(**train_overrides)
    if cfg.init_from not in ("scratch", "resume"):
        raise ConfigError(f"init_from must be 'scratch' or 'resume', not {cfg.init_from!r}")

    # --- processes and devices
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world = 0, 0, 1
    if ddp:
        rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device, device_type, ptdtype, autocast = setup_device(cfg, local_rank if ddp else None)
    if ddp:
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    master = rank == 0
    if cfg.gradient_accumulation_steps % world:
        raise ConfigError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} is not "
                          f"divisible by the world size {world}")
    local_accum = cfg.gradient_accumulation_steps // world

    # --- data and model
    data_dir = os.path.join(cfg.data_root, cfg.dataset)
    meta = load_meta(data_dir)
    ckpt = None
    if cfg.init_from == "resume":
        ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
        if ckpt.get("optimizer") is None:
            raise ConfigError(f"{cfg.out_dir}/ckpt.pt has no optimizer state (a kept snapshot?); resume needs "
                              f"the ckpt.pt that training writes")
        clash = {k: v for k, v in model_overrides.items() if ckpt["model_config"].get(k) != v}
        if clash:
            raise ConfigError(f"resume keeps the checkpoint's model; drop {', '.join('--' + k for k in clash)}")
        model_config = GPTConfig(**ckpt["model_config"])
    else:
        if os.path.exists(os.path.join(cfg.out_dir, "ckpt.pt")):
            raise ConfigError(f"{cfg.out_dir}/ckpt.pt exists; continue it with --init_from=resume "
                              f"or choose another --out_dir")
        if "vocab_size" in model_overrides:
            raise ConfigError("vocab_size comes from the dataset's meta.json; drop --vocab_size")
        try:
            model_config = GPTConfig(**{**model_overrides, "vocab_size": meta["vocab_size"]})
        except ValueError as e:  # an unknown arch, heads that do not divide the width, ...
            raise ConfigError(str(e)) from None
    if model_config.vocab_size < meta["vocab_size"]:
        raise ConfigError(f"checkpoint vocab {model_config.vocab_size} < dataset vocab {meta['vocab_size']}")

    torch.manual_seed(cfg.seed)
    model = GPT(model_config).to(device)
    raw_model = model  # the plain module: what is saved, evaluated and measured
    optimizer = configure_optimizer(model, cfg, device_type)
    iter_num, best_val_loss = 0, float("inf")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        torch.set_rng_state(ckpt["rng"]["torch"])
    start_iter = iter_num
    scaler = torch.amp.GradScaler(device_type, enabled=ptdtype == torch.float16)
    if cfg.compile:
        model = torch.compile(model)
    eval_model = model  # compiled where asked, never DDP-wrapped: only rank 0 evaluates
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * model_config.block_size
    flops_per_token = model_flops_per_token(model_config, raw_model.num_params(non_embedding=True))
    peak = peak_flops(device)
    commit_sparsity = model_config.commit_sparsity
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        print(f"arch {model_config.arch} | parameters {raw_model.num_params() / 1e6:.2f}M "
              f"({raw_model.num_params(non_embedding=True) / 1e6:.2f}M non-embedding) | "
              f"tokens/iter {tokens_per_iter:,} | device {device} | dtype {cfg.dtype} | world size {world}"
              + (f" | resumed at iter {iter_num}" if ckpt else ""), flush=True)
    log_file = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if master else None
    wandb = None
    if master and cfg.wandb_log:
        try:
            import wandb
            wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or model_config.arch,
                       config={**dataclasses.asdict(cfg), **dataclasses.asdict(model_config)})
        except ImportError:
            print("wandb is not installed (pip install wandb); logging to log.jsonl only")
            wandb = None

    def log(record):
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        if wandb is not None:
            wandb.log(record, step=record["iter"])

    @torch.no_grad()
    def evaluate():
        """Mean loss over eval_iters fixed batches per split; for Ledger, the commit gates."""
        raw_model.eval()
        out = {}
        for split, stream in EVAL_STREAMS.items():
            losses, gates = [], []
            for k in range(cfg.eval_iters):
                x, y = get_batch(data_dir, meta, split, [cfg.seed, stream, 0, k], cfg.batch_size,
                                 model_config.block_size, device)
                with autocast:
                    _, loss, commit_gates = eval_model(x, y)
                losses.append(loss.item())
                if commit_gates is not None:
                    gates.append(commit_gates.float().cpu())
            out[f"{split}_loss"] = float(np.mean(losses))
            if gates and split == "val":
                out["commit_gates"] = [round(g, 5) for g in torch.stack(gates).mean(0).tolist()]
        raw_model.train()
        return out

    def checkpoint(val_loss, snapshot):
        payload = {
            "format": CHECKPOINT_FORMAT,
            "model": raw_model.state_dict(),
            "model_config": dataclasses.asdict(model_config),
            "train_config": dataclasses.asdict(cfg),
            "optimizer": optimizer.state_dict(),
            "iter_num": iter_num,
            "best_val_loss": best_val_loss,
            "val_loss": val_loss,
            "dataset_meta": meta,
            "rng": {"torch": torch.get_rng_state()},
        }
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
            snapshot_due = cfg.ckpt_interval > 0 and iter_num % cfg.ckpt_interval == 0
            if master and (iter_num % cfg.eval_interval == 0 or snapshot_due or iter_num >= cfg.max_iters):
                metrics = evaluate()
                best_val_loss = min(best_val_loss, metrics["val_loss"])
                print(f"eval iter {iter_num}: train loss {metrics['train_loss']:.4f}, val loss {metrics['val_loss']:.4f}"
                      + (f", mean commit gate {np.mean(metrics['commit_gates']):.3f}" if "commit_gates" in metrics else ""),
                      flush=True)
                log({"iter": iter_num, **metrics, "lr": get_lr(iter_num, cfg)})
                if iter_num > start_iter:
                    checkpoint(metrics["val_loss"], snapshot_due)
                if cfg.target_val_loss > 0 and metrics["val_loss"] <= cfg.target_val_loss:
                    stop_reason = f"reached target val loss {cfg.target_val_loss}"
            if iter_num >= cfg.max_iters:
                break

            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(local_accum):
                x, y = get_batch(data_dir, meta, "train", [cfg.seed, TRAIN_STREAM, iter_num, rank * local_accum + micro],
                                 cfg.batch_size, model_config.block_size, device)
                # DDP averages gradients over processes; sync only on the last micro-step.
                sync = not ddp or micro == local_accum - 1
                with nullcontext() if sync else model.no_sync():
                    total, loss = training_loss(model, x, y, autocast, commit_sparsity)
                scaler.scale(total / local_accum).backward()
                loss_sum += loss.detach().float()
            # One small all-reduce per iteration: the global mean loss (to log and to check for NaN),
            # and whether any process wants to stop (signal, or rank 0 reached the target loss).
            wants_stop = float(bool(stop_signal) or stop_reason is not None)
            status = torch.stack([loss_sum, torch.tensor(wants_stop, device=device)])
            if ddp:
                dist.all_reduce(status)
            train_loss, stop = status[0].item() / cfg.gradient_accumulation_steps, status[1].item() > 0
            if not math.isfinite(train_loss):
                if master:
                    print(f"error: non-finite loss ({train_loss}) at iter {iter_num}; stopped before the update, "
                          f"{cfg.out_dir}/ckpt.pt keeps the last good state; try a lower learning_rate", file=sys.stderr)
                raise SystemExit(3)
            if stop:
                break  # before the update: the saved state is that of the start of this iteration
            optimizer_step(model, optimizer, scaler, cfg.grad_clip)
            iter_num += 1
            iters_since_log += 1

            if master and iter_num % cfg.log_interval == 0:
                if device_type == "cuda":
                    torch.cuda.synchronize()
                dt = (time.time() - t_last) / iters_since_log
                t_last, iters_since_log = time.time(), 0
                record = {"iter": iter_num, "loss": train_loss, "lr": lr, "ms_per_iter": 1000 * dt,
                          "tokens_per_s": tokens_per_iter / dt}
                if peak:
                    record["mfu"] = flops_per_token * tokens_per_iter / dt / (peak * world)
                print(f"iter {iter_num}: loss {train_loss:.4f}, {1000 * dt:.0f} ms/iter, "
                      f"{record['tokens_per_s']:,.0f} tok/s" + (f", mfu {100 * record['mfu']:.1f}%" if peak else ""),
                      flush=True)
                log(record)

        if master:
            if stop_signal:
                checkpoint(None, False)
                print(f"stopped by signal {stop_signal[0]} at iter {iter_num}; saved {cfg.out_dir}/ckpt.pt "
                      f"(continue with --init_from=resume)", flush=True)
            elif stop_reason:
                print(f"stopped at iter {iter_num}: {stop_reason}", flush=True)
            else:
                print(f"done: {iter_num} iterations, best val loss {best_val_loss:.4f}", flush=True)
            if device_type == "cuda":
                print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB", flush=True)
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        if master:
            log_file.close()
        if ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
