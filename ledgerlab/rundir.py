"""
A run directory: the checkpoints train.py leaves in it, written atomically and loaded safely (weights_only,
a format check), the model rebuilt from one, and the lock that keeps a second writer out.
"""
import fcntl
import os
import socket
from contextlib import contextmanager

import torch

from ledger import ARCHS, GPT, GPTConfig
from ledgerlab.cli import ConfigError, atomic_write

CHECKPOINT_FORMAT = "ledger-residuals-ckpt/2"
# Format 1 held the maps that erase and write D under `<sublayer>.residual.scratch.`; format 2 holds
# them on the residual itself. Loading renames them, so every checkpoint ever written still loads.
READABLE_FORMATS = ("ledger-residuals-ckpt/1", CHECKPOINT_FORMAT)


# ----------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path, payload):
    """Written whole or not at all: a crash mid-save leaves the old file."""
    atomic_write(path, lambda f: torch.save(payload, f))


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
    if "retrofit" in ckpt:   # its pretrained model, loaded again, with the trained residual
        from ledgerlab.retrofit import load_retrofit_checkpoint
        return load_retrofit_checkpoint(ckpt, device).eval()
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
