"""
A training run: its settings (TrainConfig, beside the model's ledger.GPTConfig) and the files it
leaves in its directory, checkpoints written atomically and loaded safely (weights_only, a format
check), with the model rebuilt from one. train.py runs it; lab.py plans runs, measure.py reads them.
"""
import fcntl
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from cli import ConfigError
from ledger import ARCHS, GPT, GPTConfig

CHECKPOINT_FORMAT = "ledger-residuals-ckpt/2"
# Format 1 held the maps that erase and write D under `<sublayer>.residual.scratch.`; format 2 holds
# them on the residual itself. Loading renames them, so every checkpoint ever written still loads.
READABLE_FORMATS = ("ledger-residuals-ckpt/1", CHECKPOINT_FORMAT)


# ----------------------------------------------------------------------------------------------
# Config: the defaults are the paper's 160M run (config/paper_160m.py is the full preset), except the
# dataset: by default, the one a plain `python prepare_data.py` writes, so that the first command
# after it trains. Each field's comment is its --help text.

@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"             # where ckpt.pt, the kept snapshots and log.jsonl go
    init_from: str = "scratch"       # scratch: a new model; resume: continue from out_dir/ckpt.pt
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

    # Checked as each setting is parsed, so that a bad value is one line before any data or model is
    # touched, not a traceback from numpy or torch after the model is built.
    LIMITS = {"eval_interval": ">= 1", "eval_iters": ">= 1", "log_interval": ">= 1", "ckpt_interval": ">= 0",
              "batch_size": ">= 1", "gradient_accumulation_steps": ">= 1", "learning_rate": "> 0",
              "min_lr": ">= 0", "warmup_iters": ">= 0", "lr_decay_iters": ">= 0", "max_iters": ">= 1",
              "weight_decay": ">= 0", "beta1": ">= 0 and < 1", "beta2": ">= 0 and < 1", "grad_clip": ">= 0",
              "target_val_loss": ">= 0", "seed": ">= 0",  # numpy seeds the batches and refuses negative seeds
              "init_from": ("scratch", "resume"), "dtype": ("auto", "float32", "bfloat16", "float16"),
              "optimizer": ("adamw", "sgd")}


# ----------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path, payload):
    """Write to a temp file, flush it to disk, then rename: a crash mid-save leaves the old file."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    """Load a checkpoint that train.py wrote (weights_only: never executes pickled code)."""
    if not os.path.isfile(path):
        raise ConfigError(f"no checkpoint at {path}; train one first (init_from=scratch)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ConfigError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if not isinstance(ckpt, dict) or ckpt.get("format") not in READABLE_FORMATS:
        raise ConfigError(f"{path} is not a ledger-residuals checkpoint (format {CHECKPOINT_FORMAT} expected)")
    # torch.compile wraps the model as `_orig_mod`; never let that prefix reach the weights
    if isinstance(ckpt.get("model"), dict):
        ckpt["model"] = {k.removeprefix("_orig_mod.").replace(".residual.scratch.", ".residual."): v
                         for k, v in ckpt["model"].items()}
    arch = ckpt.get("model_config", {}).get("arch")
    if arch not in ARCHS:
        raise ConfigError(f"{path} holds unknown arm {arch!r}; known arms: {', '.join(ARCHS)}")
    return ckpt


def build_model(ckpt, path, device="cpu"):
    """The model a checkpoint holds, in eval mode on `device`."""
    try:
        config = GPTConfig(**ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: model_config does not fit ledger.GPTConfig ({e})") from None
    model = GPT(config)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ConfigError(f"{path}: weights do not fit the saved config ({str(e).splitlines()[0]})") from None
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------
# One writer per run directory

LOCK_NAME = ".lock"


@contextmanager
def claim_run_dir(out_dir):
    """Hold out_dir for this process: a second writer (train.py or lab.py) gets one error line and
    writes nothing. The OS lock dies with its process, so a run that was killed leaves no stale lock."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, LOCK_NAME), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise in_use_error(out_dir, f.read().strip() or "holder unknown") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def in_use_error(out_dir, holder, flag="--out_dir"):
    return ConfigError(f"{out_dir} is in use by another run ({holder}); wait for it to end, or choose another {flag}")


def check_free(out_dir, flag="--out_dir"):
    """One error line, before anything is written, when another run holds out_dir."""
    holder = in_use(out_dir)
    if holder:
        raise in_use_error(out_dir, holder, flag)


def in_use(out_dir):
    """Who holds out_dir ('pid N on HOST'), or None: asked without taking it and without writing."""
    try:
        f = open(os.path.join(out_dir, LOCK_NAME))
    except OSError:   # no lock file: no run has ever held it
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "holder unknown"
        fcntl.flock(f, fcntl.LOCK_UN)
        return None
