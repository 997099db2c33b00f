"""Devices and mixed precision, the one policy of the package: weights stay fp32 and speed comes
from autocast (on CUDA bf16 where supported, else fp16 with a GradScaler; on CPU fp32)."""
import contextlib
from typing import Optional

import torch

AMP_CHOICES = ("auto", "bf16", "fp16", "off")


def resolve_device(name: Optional[str] = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype for `--amp`: auto = bf16 on CUDA when supported, else fp16; off on CPU."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"--amp must be one of {AMP_CHOICES}, got {amp!r}")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs CUDA; on CPU use --amp bf16 or off")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """`torch.autocast` in `dtype` on `device`; no autocast when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: Optional[torch.dtype]) -> torch.amp.GradScaler:
    """A GradScaler that scales only under fp16 autocast (a no-op for bf16 and fp32)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def configure_cuda():
    """Fast matmuls on CUDA: TF32 for fp32 leftovers, cuDNN autotuning for fixed-size inputs."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
