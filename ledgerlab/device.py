"""The device (auto: cuda > mps > cpu), the dtype and its autocast (auto: bf16 where the GPU has it,
fp16 on older GPUs, fp32 on a CPU) that train.py, bench.py and measure.py run with; a GPU's peak FLOP/s."""
from contextlib import nullcontext

import torch

from ledgerlab.cli import ConfigError


def resolve_device(device, local_rank=None):
    """'auto': the best device torch sees; under DDP, cuda:<local_rank>; one error line for an absent one."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if not available.get(device.split(":")[0], False):
        raise ConfigError(f"--device={device} but torch sees no such device here; use --device=cpu")
    if local_rank is not None and device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    return device


def setup_device(device, dtype, local_rank=None):
    """(device, device_type, dtype name, torch dtype, autocast context) for --device and --dtype."""
    device = resolve_device(device, local_rank)
    device_type = "cuda" if device.startswith("cuda") else "mps" if device == "mps" else "cpu"
    if dtype == "auto":
        on_gpu = device_type == "cuda"
        dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if on_gpu else "float32"
    ptdtype = getattr(torch, dtype)
    autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
    # --dtype=float32 means float32, as the released code trains; TF32 only beside half-precision autocast
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = ptdtype != torch.float32
    return device, device_type, dtype, ptdtype, autocast


# Dense bf16 peak FLOP/s (no sparsity), for MFU. An unknown GPU simply gets no MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
              "L4": 121e12, "4090": 165e12, "3090": 71e12, "V100": 125e12}


def peak_flops(device):
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
