"""What train.py, eval.py and the benchmark share: devices, the mixed-precision policy, the
model builder, the optimiser and its schedule, the training step and epoch, distributed
setup, evaluation."""
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..data.batches import each_batch
from ..data.device_augment import as_model_input
from ..metrics import confusion_matrix, harmonic_mean, summarize
from ..model import MPAFER, MPAFERConfig, loss_names
from ..precision import autocast, grad_scaler, resolve_device
from ..progress import progress_bar
from .faults import NonFiniteLoss, ignore_interrupts
from .loader import seed_everything

# -- the model and its training step ----------------------------------------------------------

def build_mpafer(clip_model, classnames: Sequence[str], descriptions: Optional[Dict] = None,
                 config: Optional[MPAFERConfig] = None, grad_checkpointing: bool = False,
                 compile: bool = False, seed: Optional[int] = None) -> MPAFER:
    """MPA-FER on a frozen CLIP, with activation checkpointing and `torch.compile` of the image
    tower as asked. With `seed`, the prompts' initialisation draws from it alone, whatever ran
    before (e.g. the demo CLIP's first pre-training)."""
    if grad_checkpointing:
        clip_model.set_grad_checkpointing(True)
    if compile:
        clip_model.visual.compile()
    if seed is not None:
        seed_everything(seed)
    return MPAFER(clip_model, classnames, descriptions, config)


def trainable_parameters(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class Optimization(NamedTuple):
    """The optimiser, its per-step schedule and the GradScaler (a no-op unless fp16)."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler

    def state_dict(self) -> Dict:
        return {name: part.state_dict() for name, part in self._asdict().items()}

    def load_state_dict(self, state: Dict):
        for name, part in self._asdict().items():
            part.load_state_dict(state[name])


def make_optimizer(params, lr: float, momentum: float, weight_decay: float, warmup_steps: int,
                   total_steps: int, device: torch.device,
                   amp: Optional[torch.dtype] = None) -> Optimization:
    """SGD with momentum; linear warm-up then cosine decay per step; a GradScaler for fp16."""
    def factor(step):  # linear warm-up to 1, then cosine decay to 0
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    optimizer = torch.optim.SGD(list(params), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return Optimization(optimizer, scheduler, grad_scaler(device, amp))


def train_step(model: MPAFER, images: torch.Tensor, labels: torch.Tensor,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               amp: Optional[torch.dtype] = None, grad_clip: float = 0.0, forward=None,
               clip_groups: Optional[Sequence[Sequence[torch.Tensor]]] = None):
    """One training step -> (total loss, loss parts), detached, on the device (no sync).
    Clipping (`grad_clip`, 0 = off) bounds all parameters together or each of `clip_groups`;
    `forward` is the DDP wrapper where there is one."""
    with autocast(images.device, amp):
        output = (forward or model)(images)
        loss, parts = model.loss(output, labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        for group in clip_groups or [[p for g in optimizer.param_groups for p in g["params"]]]:
            torch.nn.utils.clip_grad_norm_(group, grad_clip)
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


# -- a training epoch ----------------------------------------------------------------------------

@dataclass
class EpochResult:
    """Mean `loss_names()` losses, or None on an early stop (then `steps_done`, `sums` resume)."""
    losses: Optional[Dict[str, float]]
    seconds: float
    steps_done: int
    sums: Optional[torch.Tensor] = None
    grad_norms: Optional[Dict[str, float]] = None  # per loss term, at the epoch's first step


@dataclass
class Stepping:
    """How `train_epoch` steps, the same every epoch."""
    amp: Optional[torch.dtype] = None
    grad_clip: float = 0.0
    clip_groups: Optional[Sequence[Sequence[torch.Tensor]]] = None
    log_interval: int = 20
    world: int = 1
    grad_norms: bool = False
    progress: bool = True


def train_epoch(model: MPAFER, loader, optimization: Optimization, augment, stepping: Stepping,
                epoch: int, *, forward=None, stop=None, first_step: int = 0,
                sums: Optional[torch.Tensor] = None, desc: str = "") -> EpochResult:
    """Steps `first_step + 1 ...` of epoch `epoch` (a resumed run passes its loss `sums`). Loss
    sums stay on the device until a sync every `log_interval` steps: one all-reduce that also
    carries a stop request, so every process stops at the same step; a NaN raises there."""
    amp, world, log_interval = stepping.amp, stepping.world, stepping.log_interval
    device = model.clip.logit_scale.device
    names = loss_names()
    steps = first_step + len(loader)
    running = torch.zeros(len(names), device=device)  # summed over steps, on the device
    if sums is not None:
        running += sums.to(device) / world  # the part done before the resume
    norms, mean, stop_asked, start = None, None, False, time.time()
    bar = progress_bar(each_batch(loader), desc=desc or f"epoch {epoch + 1}",
                       disable=not stepping.progress,
                       leave=False, initial=first_step, total=steps)
    for step, (images, labels) in enumerate(bar, first_step + 1):
        images = augment(images.to(device, non_blocking=True), epoch, step)  # uint8 -> float
        labels = labels.to(device, non_blocking=True)
        if stepping.grad_norms and step == 1:
            with autocast(device, amp):
                norms = model.term_gradient_norms(images, labels,
                                                  scale=optimization.scaler.get_scale())
        loss, parts = train_step(model, images, labels, optimization.optimizer, optimization.scaler,
                                 amp, stepping.grad_clip, forward=forward,
                                 clip_groups=stepping.clip_groups)
        optimization.scheduler.step()
        running += torch.stack([loss.float(), *(parts[k].float() for k in names[1:])])
        asked = stop is not None and stop.requested  # a host flag: checking it costs nothing
        if step % log_interval == 0 or step == steps or (asked and world == 1):
            synced = torch.cat([running, running.new_tensor([float(asked)])])
            if world > 1:
                dist.all_reduce(synced)
            synced, stop_asked = synced[:-1], bool(synced[-1] > 0)
            if not torch.isfinite(synced).all():
                raise NonFiniteLoss(f"the loss became {synced[0].item()} in epoch {epoch + 1} "
                                    f"(step {step})")
            mean = (synced / (step * world)).tolist()
            speed = (step - first_step) * len(images) * world / (time.time() - start)
            bar.set_postfix(**{k: f"{v:.3f}" for k, v in zip(names, mean)}, img_s=f"{speed:.0f}")
            if stop_asked and step < steps:
                return EpochResult(None, time.time() - start, step, synced.cpu(), norms)
    return EpochResult(dict(zip(names, mean)), time.time() - start, steps, None, norms)


# -- evaluation --------------------------------------------------------------------------------

@torch.no_grad()
def predict(logits_fn: Callable[[torch.Tensor], torch.Tensor], dataset, device: torch.device,
            amp: Optional[torch.dtype] = None, batch_size: int = 64, workers: int = 0,
            progress: bool = True, desc: str = "eval"):
    """Predictions and targets over `dataset` (sharded and gathered under DDP); `logits_fn`
    gives logits `[B, C]` or an output with `.logits`; uint8 pixels are normalised on the device."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    shard = list(range(rank, len(dataset), world))  # every index exactly once over the ranks
    loader = DataLoader(dataset, batch_size=batch_size, sampler=shard, num_workers=workers,
                        pin_memory=device.type == "cuda", worker_init_fn=ignore_interrupts)
    preds, targets = [], []
    for images, labels in progress_bar(each_batch(loader), desc=desc, total=len(loader),
                                       disable=not progress or rank != 0, leave=False):
        with autocast(device, amp):
            output = logits_fn(as_model_input(images.to(device, non_blocking=True)))
        logits = getattr(output, "logits", output)  # an MPAFER's output, or logits
        preds.append(logits.argmax(dim=-1))  # stays on the device: no sync per batch
        targets.append(labels)
    preds = torch.cat(preds).cpu() if preds else torch.zeros(0, dtype=torch.long)
    targets = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, (shard, preds.tolist(), targets.tolist()))
        order = torch.tensor([i for g in gathered for i in g[0]])
        preds = torch.tensor([p for g in gathered for p in g[1]])[order.argsort()]
        targets = torch.tensor([t for g in gathered for t in g[2]])[order.argsort()]
    return preds, targets


def evaluate(logits_fn, dataset, classnames: Sequence[str], device: torch.device,
             amp: Optional[torch.dtype] = None, **kwargs) -> Dict:
    """WAR, UAR, per-class recall and confusion matrix of `logits_fn` on `dataset`."""
    preds, targets = predict(logits_fn, dataset, device, amp, **kwargs)
    return summarize(confusion_matrix(preds, targets, len(classnames)), classnames)


def evaluate_base_novel(logits_fn, dataset, base: Sequence[str], device: torch.device,
                        amp: Optional[torch.dtype] = None, **kwargs) -> Dict:
    """Base-to-novel (CoCoOp, MaPLe) in one pass, `logits_fn` scoring all of `dataset`'s classes:
    "base" and "novel" images each among their own classes only, "all" among every class, and
    "hm" = 2BN / (B + N) of base and novel WAR."""
    classnames = list(dataset.classnames)
    novel = [c for c in classnames if c not in base]
    is_base = torch.tensor([c in base for c in classnames])

    def three_ways(images):  # [B, 3, C]: scored among all, among base only, among novel only
        output = logits_fn(images)
        logits = getattr(output, "logits", output).float()
        mask = is_base.to(logits.device)
        return torch.stack([logits, logits.masked_fill(~mask, float("-inf")),
                            logits.masked_fill(mask, float("-inf"))], dim=1)

    preds, targets = predict(three_ways, dataset, device, amp, **kwargs)  # [N, 3], [N]
    result = {"all": summarize(confusion_matrix(preds[:, 0], targets, len(classnames)),
                               classnames)}
    for name, column, classes in (("base", 1, list(base)), ("novel", 2, novel)):
        index = torch.tensor([classes.index(c) if c in classes else -1 for c in classnames])
        kept = index[targets] >= 0
        result[name] = summarize(confusion_matrix(index[preds[kept, column]], index[targets[kept]],
                                                  len(classes)), classes)
    result["hm"] = harmonic_mean(result["base"]["war"], result["novel"]["war"])
    return result
