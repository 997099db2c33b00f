"""What train.py and eval.py share: devices, mixed precision, distributed setup, evaluation."""
import contextlib
import os
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from .metrics import confusion_matrix, summarize

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
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def configure_cuda():
    """Fast matmuls on CUDA: TF32 for fp32 leftovers, cuDNN autotuning for fixed-size inputs."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


# -- distributed -------------------------------------------------------------------------------

def setup_distributed(device_name: Optional[str] = None):
    """-> (rank, world_size, device). Under torchrun: NCCL on CUDA, gloo on CPU."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, resolve_device(device_name)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class ShardSampler(Sampler):
    """Rank r of W evaluates indices r, r + W, ...: every index exactly once over all ranks."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


# -- evaluation --------------------------------------------------------------------------------

@torch.no_grad()
def predict(logits_fn: Callable[[torch.Tensor], torch.Tensor], dataset, device: torch.device,
            amp: Optional[torch.dtype] = None, batch_size: int = 64, workers: int = 0,
            progress: bool = True, desc: str = "eval"):
    """Predictions and targets over `dataset` (sharded over ranks and gathered under DDP)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
    sampler = ShardSampler(len(dataset), rank, world)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=device.type == "cuda")
    preds, targets = [], []
    for images, labels in tqdm(loader, desc=desc, disable=not progress or rank != 0, leave=False):
        with autocast(device, amp):
            logits = logits_fn(images.to(device, non_blocking=True))
        preds.append(logits.argmax(dim=-1))  # stays on the device: no sync per batch
        targets.append(labels)
    preds = torch.cat(preds).cpu() if preds else torch.zeros(0, dtype=torch.long)
    targets = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, (sampler.indices, preds.tolist(), targets.tolist()))
        order = torch.tensor([i for g in gathered for i in g[0]])
        preds = torch.tensor([p for g in gathered for p in g[1]])[order.argsort()]
        targets = torch.tensor([t for g in gathered for t in g[2]])[order.argsort()]
    return preds, targets


def evaluate(logits_fn, dataset, classnames: Sequence[str], device: torch.device,
             amp: Optional[torch.dtype] = None, **kwargs) -> Dict:
    """WAR, UAR, per-class recall and confusion matrix of `logits_fn` on `dataset`."""
    preds, targets = predict(logits_fn, dataset, device, amp, **kwargs)
    return summarize(confusion_matrix(preds, targets, len(classnames)), classnames)
