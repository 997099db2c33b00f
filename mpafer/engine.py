"""What train.py, eval.py and the benchmark share: devices, the mixed-precision policy, the
model builder, the training step, distributed setup, evaluation."""
import contextlib
import os
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from .data.device_augment import as_model_input
from .metrics import confusion_matrix, summarize
from .model import MPAFER, MPAFERConfig
from .utils import ignore_interrupts

AMP_CHOICES = ("auto", "bf16", "fp16", "off")


def resolve_device(name: Optional[str] = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -- mixed precision: the one policy of the package -----------------------------------------
# Weights always stay fp32; speed comes from autocast. On CUDA, bf16 where the GPU supports it,
# else fp16 (then with a GradScaler, since fp16 gradients underflow); on CPU, fp32 unless bf16
# is asked for. Code that autocasts picks its dtype with `resolve_amp` and enters `autocast`.

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


# -- the model and its training step ----------------------------------------------------------

def build_mpafer(clip_model, classnames: Sequence[str], descriptions: Optional[Dict] = None,
                 config: Optional[MPAFERConfig] = None, grad_checkpointing: bool = False,
                 compile: bool = False) -> MPAFER:
    """MPA-FER on a frozen CLIP, with the CLIP's memory and speed options: activation
    checkpointing in both towers (less memory, one extra forward) and `torch.compile` of the
    image tower (meant for CUDA; the first steps are slow)."""
    if grad_checkpointing:
        clip_model.set_grad_checkpointing(True)
    if compile:
        clip_model.visual.compile()
    return MPAFER(clip_model, classnames, descriptions, config)


def trainable_parameters(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_step(model: MPAFER, images: torch.Tensor, labels: torch.Tensor,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               amp: Optional[torch.dtype] = None, grad_clip: float = 0.0, forward=None):
    """One MPA-FER training step -> (total loss, loss parts), detached, still on the device.

    Forward and all losses under autocast, backward (scaled under fp16), gradient clipping to
    `grad_clip` (0 = off) over the optimiser's parameters, optimiser step. `forward` runs the
    model (default `model`; train.py passes its DistributedDataParallel wrapper). The step
    never waits for the device: read the losses when you need them (that is a sync).
    """
    with autocast(images.device, amp):
        output = (forward or model)(images)
        loss, parts = model.loss(output, labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), parts


# -- distributed -------------------------------------------------------------------------------

def setup_distributed(device_name: Optional[str] = None):
    """-> (rank, world_size, device). Under torchrun: NCCL on CUDA, gloo on CPU."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, resolve_device(device_name)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
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
    """Predictions and targets over `dataset` (sharded over ranks and gathered under DDP).

    The dataset may give uint8 pixels (`eval_transform(r, uint8=True)`): they are normalised on
    the device, batched."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
    sampler = ShardSampler(len(dataset), rank, world)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=device.type == "cuda", worker_init_fn=ignore_interrupts)
    preds, targets = [], []
    for images, labels in tqdm(loader, desc=desc, disable=not progress or rank != 0, leave=False):
        with autocast(device, amp):
            logits = logits_fn(as_model_input(images.to(device, non_blocking=True)))
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
