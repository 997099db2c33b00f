"""Train MPA-FER prompts on a frozen CLIP (or an Exp-CLIP head on cached features).

    python train.py --demo                                   # synthetic faces, tiny CLIP, CPU
    python train.py --dataset rafdb --data-root data/RAF-DB  # the reported RAF-DB recipe
    python train.py --dataset ferplus --data-root data/FERPlus --clip ViT-L/14 --amp bf16
    python train.py --resume runs/rafdb/last.pt              # continue exactly where it stopped
    torchrun --nproc_per_node=4 train.py --dataset affectnet7 --data-root data/AffectNet
    python train.py --method expclip --features feats.pt --out runs/expclip

Every field of TrainConfig and MPAFERConfig is a command-line flag (`--help` lists them).
Precedence: defaults < dataset preset < --demo < flags you give. The resolved configuration is
printed, saved as config.json in --out, and stored in every checkpoint.

The file reads top to bottom: configuration, the run's set-up, CLIP and data, model and
prototypes, optimiser, the epoch loop (one training step is `mpafer.engine.train_step`),
evaluation and saving, and the final report.
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, get_args, get_type_hints

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from mpafer import clip
from mpafer.checkpoint import check_compatible, load_checkpoint, make_checkpoint
from mpafer.data import (
    ClassBalancedSampler,
    TrainBatchAugment,
    build_dataset,
    eval_transform,
    format_class_counts,
    train_transform,
)
from mpafer.demo import demo_clip_path, demo_datasets
from mpafer.engine import (
    AMP_CHOICES,
    build_mpafer,
    configure_cuda,
    evaluate,
    grad_scaler,
    resolve_amp,
    setup_distributed,
    train_step,
    trainable_parameters,
)
from mpafer.metrics import format_report
from mpafer.model import MPAFER, MPAFERConfig
from mpafer.prompts import load_descriptions
from mpafer.prototypes import cached_prototypes, compute_prototypes
from mpafer.utils import atomic_save, atomic_write_json, run_cli

# -- configuration -------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    method: str = field(default="mpafer", metadata={"help": "mpafer | expclip"})
    dataset: str = field(default="rafdb", metadata={
        "help": "rafdb | affectnet7 | affectnet8 | ferplus | folder"})
    data_root: str = field(default="data/RAF-DB")
    clip: str = field(default="ViT-B/16", metadata={
        "help": "CLIP name (downloaded to --weights) or path; --demo: \"\" = the tiny demo CLIP"})
    weights: str = field(default="weights", metadata={
        "help": "CLIP downloads and the prototype cache"})
    descriptions: str = field(default="", metadata={
        "help": "class descriptions JSON (default: the shipped one)"})
    out: str = field(default="", metadata={"help": "output folder (default runs/<dataset>)"})
    epochs: int = field(default=120)
    batch_size: int = field(default=32)
    lr: float = field(default=0.032)
    momentum: float = field(default=0.9)
    weight_decay: float = field(default=5e-4)
    warmup_epochs: float = field(default=1.0, metadata={
        "help": "linear warm-up, then cosine decay to 0 (per step)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0 = off)"})
    workers: int = field(default=min(4, os.cpu_count() or 1), metadata={
        "help": "DataLoader workers per process"})
    amp: str = field(default="auto", metadata={"help": "auto | bf16 | fp16 | off"})
    seed: int = field(default=1)
    device: str = field(default="", metadata={"help": "default: cuda if available, else cpu"})
    resume: str = field(default="", metadata={"help": "a last.pt to continue from"})
    demo: bool = field(default=False)
    demo_train_per_class: int = field(default=200, metadata={
        "help": "synthetic faces per class (--demo)"})
    demo_test_per_class: int = field(default=60)
    stop_after: int = field(default=0, metadata={
        "help": "stop after this epoch (0 = never), e.g. to fit a job's time limit; "
                "resume later"})
    eval_split: str = field(default="test", metadata={
        "help": "split evaluated every epoch and used to pick best.pt"})
    eval_every: int = field(default=1)
    balanced_sampler: bool = field(default=False, metadata={
        "help": "class-balanced sampling (AffectNet)"})
    samples_per_epoch: int = field(default=0, metadata={
        "help": "with the balanced sampler; 0 = the training set's size"})
    prototypes_per_class: int = field(default=0, metadata={"help": "0 = every training image"})
    skip_bad_images: bool = field(default=False)
    log_interval: int = field(default=20, metadata={
        "help": "steps between loss syncs (progress bar, NaN check)"})
    grad_checkpointing: bool = field(default=False, metadata={
        "help": "recompute CLIP blocks in backward: less memory (ViT-L/14 at batch 32 in 24 GB)"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the image tower (CUDA; first steps are slow)"})
    features: str = field(default="", metadata={
        "help": "Exp-CLIP: feature file from `python -m mpafer.expclip cache/teacher`"})


# Dataset presets. RAF-DB is the paper's reported recipe; the others are our choices.
PRESETS = {
    "rafdb": dict(data_root="data/RAF-DB", epochs=120, batch_size=32, lr=0.032),
    "affectnet7": dict(data_root="data/AffectNet", epochs=20, balanced_sampler=True,
                       samples_per_epoch=64000, prototypes_per_class=2000),
    "affectnet8": dict(data_root="data/AffectNet", epochs=20, balanced_sampler=True,
                       samples_per_epoch=64000, prototypes_per_class=2000),
    "ferplus": dict(data_root="data/FERPlus", epochs=40, eval_split="val"),
    "folder": dict(data_root="data/faces", epochs=50),
}
DEMO = dict(dataset="synthetic", clip="", epochs=10, batch_size=32, lr=0.032, workers=0,
            amp="off", out="runs/demo")
DEMO_MODEL = dict(top_k=8)  # the demo CLIP has only 16 patches
EXPCLIP = dict(epochs=5, batch_size=512, lr=1e-3, momentum=0.9, weight_decay=1e-4, seed=1,
               out="runs/expclip")
LOSS_PARTS = ("loss", "cls", "ta", "pa", "v")


def add_fields(cls, group):
    """One flag per dataclass field; its help is the field's `metadata["help"]`."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        kind = next((a for a in get_args(kind) if a is not type(None)), kind)  # Optional[X] -> X
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata.get("help", "")
        text = text if "default" in text else f"{text} (default {f.default!r})".strip()
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=text)
        else:
            choices = AMP_CHOICES if f.name == "amp" else None
            group.add_argument(flag, type=kind, default=argparse.SUPPRESS, choices=choices,
                               metavar=kind.__name__.upper(), help=text)


def parse_config(argv=None):
    """-> (TrainConfig, MPAFERConfig, the model fields given on the command line)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fields(TrainConfig, parser.add_argument_group("training"))
    add_fields(MPAFERConfig, parser.add_argument_group("MPA-FER model (MPAFERConfig)"))
    given = vars(parser.parse_args(argv))
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    train = {k: v for k, v in given.items() if k in train_keys}
    model = {k: v for k, v in given.items() if k not in train_keys}
    values = {}
    if train.get("resume"):
        # Continue the run as it was configured; flags given now (e.g. --epochs) still win.
        values.update(load_checkpoint(train["resume"]).get("train_config", {}))
    elif train.get("method") == "expclip":
        values.update(EXPCLIP)
    elif train.get("demo"):
        values.update(DEMO)
        model = {**DEMO_MODEL, **model}
    else:
        dataset = train.get("dataset", TrainConfig.dataset)
        if dataset not in PRESETS:
            parser.error(f"--dataset must be one of {sorted(PRESETS)}, got {dataset!r}")
        values.update(PRESETS[dataset])
    values.update(train)
    cfg = TrainConfig(**values)
    cfg.out = cfg.out or os.path.join("runs", cfg.dataset)
    return cfg, MPAFERConfig(**model), model


# -- seeds, learning-rate schedule, log -------------------------------------------------------

def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    """RNG states for the record in last.pt (resume does not need them: every epoch re-seeds
    from (seed, epoch), which is what makes a resumed run repeat an uninterrupted one)."""
    return {"python": list(random.getstate()[1]),
            "numpy": torch.from_numpy(np.random.get_state()[1].copy()),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def cosine_with_warmup(warmup_steps: int, total_steps: int):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


class Logger:
    """Prints on rank 0 and appends the same lines to <out>/log.txt."""

    def __init__(self, out: str, active: bool):
        self.path, self.active = os.path.join(out, "log.txt"), active

    def __call__(self, message: str = ""):
        if self.active:
            tqdm.write(message)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(message + "\n")


@dataclass
class Run:
    """Where and how this process trains: settings, process rank, device, precision, log."""
    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    amp: Optional[torch.dtype]
    log: Logger
    resume: Optional[dict]  # the checkpoint resumed from, if any

    @property
    def master(self) -> bool:
        return self.rank == 0

    def path(self, name: str) -> str:
        return os.path.join(self.cfg.out, name)


@dataclass
class Training:
    """What the epoch loop works on, made by the steps below."""
    model: MPAFER
    forward: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    loader: DataLoader
    loader_rng: torch.Generator
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    eval_set: torch.utils.data.Dataset
    classnames: List[str]
    descriptions: Optional[Dict]

    def eval_logits(self, images):
        return self.model(images).logits


# -- Exp-CLIP ----------------------------------------------------------------------------------

def run_expclip(cfg: TrainConfig):
    """Train an Exp-CLIP head on a feature file (CLIP and teacher features, cached)."""
    from mpafer.expclip import train_head_from_file
    if not cfg.features:
        sys.exit("--method expclip needs --features FILE (make it with `python -m mpafer.expclip "
                 "cache` and `python -m mpafer.expclip teacher`)")
    os.makedirs(cfg.out, exist_ok=True)
    log = Logger(cfg.out, True)
    metadata = train_head_from_file(
        cfg.features, os.path.join(cfg.out, "expclip_head.pth"), device=cfg.device or "cpu",
        log=log, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, seed=cfg.seed)
    with open(os.path.join(cfg.out, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(h) + "\n" for h in metadata["history"])


# -- MPA-FER: the run's set-up -------------------------------------------------------------------

def start_run(cfg: TrainConfig, model_cfg: MPAFERConfig, model_overrides: Dict):
    """Processes, seeds, precision, the checkpoint resumed from, the log -> (Run, MPAFERConfig)."""
    rank, world, device = setup_distributed(cfg.device)
    seed_everything(cfg.seed)  # prompt initialisation; each epoch re-seeds from (seed, epoch)
    if device.type == "cuda":
        configure_cuda()
    amp = resolve_amp(cfg.amp, device)
    resume = load_checkpoint(cfg.resume) if cfg.resume else None
    if resume is not None:
        if "resume" not in resume:
            sys.exit(f"{cfg.resume} has no training state (best.pt is for evaluation; resume "
                     "from last.pt)")
        if model_overrides:
            print(f"note: --resume keeps the checkpoint's model configuration; ignoring "
                  f"{sorted(model_overrides)}")
        model_cfg = MPAFERConfig.from_dict(resume["config"])
    os.makedirs(cfg.out, exist_ok=True)
    run = Run(cfg, rank, world, device, amp, Logger(cfg.out, rank == 0), resume)
    if cfg.demo:
        run.log("=" * 78 + "\nDEMO: MPA-FER on synthetic cartoon faces with a tiny CLIP. These "
                "numbers say the\npipeline works end to end; they say nothing about real facial "
                "expression data.\n" + "=" * 78)
    config = {"train": dataclasses.asdict(cfg), "model": model_cfg.to_dict()}
    run.log(f"config: {json.dumps(config)}")
    if run.master:
        atomic_write_json(config, run.path("config.json"))
    return run, model_cfg


# -- CLIP and data -----------------------------------------------------------------------------

def load_clip(run: Run):
    """The frozen CLIP -> (model, name); the demo uses its pre-trained tiny CLIP unless --clip."""
    name = run.cfg.clip
    if not name:
        if run.master:
            demo_clip_path(run.cfg.weights, log=run.log)  # pre-trained once, then cached
        if run.world > 1:
            dist.barrier()
        name = demo_clip_path(run.cfg.weights, log=run.log)
    clip_model, _ = clip.load(name, device=run.device, download_root=run.cfg.weights)
    return clip_model, name


def build_data(run: Run, resolution: int):
    """-> (training set with augmentation, evaluation set with CLIP's preprocessing). Both give
    uint8 pixels; normalisation (and erasing, in training) follows on the device, batched."""
    cfg = run.cfg
    train_tf = train_transform(resolution, uint8=True)
    eval_tf = eval_transform(resolution, uint8=True)
    if cfg.demo:
        train_set, eval_set = demo_datasets(resolution, train_tf, eval_tf,
                                            cfg.demo_train_per_class, cfg.demo_test_per_class)
    else:
        options = {"skip_bad_images": True} if cfg.skip_bad_images else {}
        train_set = build_dataset(cfg.dataset, cfg.data_root, "train", train_tf, **options)
        eval_set = build_dataset(cfg.dataset, cfg.data_root, cfg.eval_split, eval_tf, **options)
    run.log(f"train: {len(train_set)} images\n{format_class_counts(train_set)}")
    run.log(f"{cfg.eval_split}: {len(eval_set)} images")
    return train_set, eval_set


# -- model and prototypes ------------------------------------------------------------------------

def build_model(run: Run, clip_model, clip_name: str, classnames: List[str],
                model_cfg: MPAFERConfig):
    """Frozen CLIP + prompts; hard prompts from the LLM descriptions -> (model, descriptions)."""
    if run.resume is not None:
        descriptions = run.resume.get("descriptions")
    elif model_cfg.soft_hard_alignment and model_cfg.hard_prompt_template == 3:
        descriptions = load_descriptions(classnames, run.cfg.descriptions or None)
    else:
        descriptions = None
    model = build_mpafer(clip_model, classnames, descriptions, model_cfg,
                         run.cfg.grad_checkpointing, run.cfg.compile).to(run.device)
    trainable = model.num_trainable_parameters()
    frozen = sum(p.numel() for p in clip_model.parameters())
    run.log(f"MPA-FER on CLIP {clip_name}: {trainable:,} trainable parameters "
            f"({trainable / 1e6:.3f} M); CLIP frozen ({frozen:,})")
    return model, descriptions


def set_prototypes(run: Run, model: MPAFER, train_set, resolution: int):
    """Class prototypes for L_v from the training images (eval transform), computed once on
    rank 0, cached on disk under a key of everything they depend on, broadcast to all ranks."""
    cfg = run.cfg
    proto_view = copy.copy(train_set)  # same images, eval transform
    proto_view.transform = eval_transform(resolution, uint8=True)
    key = {"clip_sha256": model.clip.checkpoint_sha256,
           "dataset": "synthetic-demo" if cfg.demo else cfg.dataset,
           "root": "" if cfg.demo else os.path.abspath(cfg.data_root), "split": "train",
           "images": len(train_set), "transform": repr(proto_view.transform),
           "per_class": cfg.prototypes_per_class, "classes": list(train_set.classnames)}
    prototypes = None
    if run.master:
        loader = DataLoader(proto_view, batch_size=128, num_workers=cfg.workers,
                            pin_memory=run.device.type == "cuda")
        prototypes = cached_prototypes(
            os.path.join(cfg.weights, "prototypes"), key,
            lambda: compute_prototypes(model, loader, per_class=cfg.prototypes_per_class or None),
            log=run.log)
    if run.world > 1:
        box = [prototypes]
        dist.broadcast_object_list(box, src=0)
        prototypes = box[0]
    model.set_prototypes(prototypes.to(run.device))


# -- optimiser -----------------------------------------------------------------------------------

def make_train_loader(run: Run, train_set):
    """-> (loader, its generator). Balanced, distributed or plain random sampling; batches are
    dropped at the end so every step has the same size."""
    cfg = run.cfg
    if cfg.balanced_sampler:
        sampler = ClassBalancedSampler(train_set.targets, cfg.samples_per_epoch or None,
                                       cfg.seed, run.rank, run.world)
    elif run.world > 1:
        sampler = DistributedSampler(train_set, run.world, run.rank, shuffle=True,
                                     seed=cfg.seed, drop_last=True)
    else:
        sampler = RandomSampler(train_set, generator=torch.Generator())
    loader_rng = torch.Generator()
    # Not persistent_workers: fresh workers each epoch are seeded from (seed, epoch) through
    # loader_rng; persistent ones would carry their random state over from the previous epoch,
    # and a resumed run would crop differently from an uninterrupted one.
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                        num_workers=cfg.workers, pin_memory=run.device.type == "cuda",
                        drop_last=True, generator=loader_rng)
    if len(loader) == 0:
        sys.exit(f"the training set ({len(train_set)} images over {run.world} processes) is "
                 f"smaller than one batch of {cfg.batch_size}; lower --batch-size")
    return loader, loader_rng


def make_optimizer(run: Run, model: MPAFER, steps_per_epoch: int):
    """SGD with momentum; linear warm-up then cosine decay, per step; GradScaler for fp16 only."""
    cfg = run.cfg
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(
        round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch))
    return optimizer, scheduler, grad_scaler(run.device, run.amp)


def restore(run: Run, t: Training):
    """Load the resumed run's state into the model and optimiser -> (start epoch, best so far).

    A fresh run starts a new metrics.jsonl; a resumed one drops the lines of epochs it redoes.
    """
    metrics_path = run.path("metrics.jsonl")
    if run.resume is None:
        if run.master and os.path.isfile(metrics_path):
            os.remove(metrics_path)
        return 0, {"war": -1.0, "epoch": 0}
    check_compatible(run.resume, run.cfg.resume, t.model.clip, t.classnames)
    t.model.load_trainable_state_dict(run.resume["state_dict"])
    state = run.resume["resume"]
    t.optimizer.load_state_dict(state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    t.scaler.load_state_dict(state["scaler"])
    start_epoch, best = run.resume["epoch"], state["best"]
    run.log(f"resumed from {run.cfg.resume} after epoch {start_epoch} "
            f"(best WAR {100 * best['war']:.2f}%)")
    if run.master and os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            kept = [line for line in f if json.loads(line)["epoch"] <= start_epoch]
        with open(metrics_path, "w") as f:
            f.writelines(kept)
    return start_epoch, best


# -- the epoch loop ------------------------------------------------------------------------------

def seed_epoch(run: Run, t: Training, epoch: int):
    """Everything random in an epoch derives from (seed, epoch): resuming repeats it exactly."""
    seed = run.cfg.seed * 1000 + epoch
    seed_everything(seed)
    t.loader_rng.manual_seed(seed)
    sampler = t.loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    elif isinstance(sampler, RandomSampler):
        sampler.generator.manual_seed(seed)


def stop_on_nan(run: Run, totals: torch.Tensor, epoch: int, step: int):
    if torch.isfinite(totals).all():
        return
    run.log(f"stopping: the loss became {totals[0].item()} in epoch {epoch + 1} (step {step}). "
            f"Nothing was saved for this epoch; the last good checkpoint is "
            f"{run.path('last.pt')}. Try a lower --lr, --amp bf16/off, or --grad-clip.")
    if run.world > 1:
        dist.destroy_process_group()
    sys.exit(1)


def train_one_epoch(run: Run, t: Training, epoch: int):
    """-> (mean loss parts over the epoch and all processes, seconds)."""
    cfg, device = run.cfg, run.device
    seed_epoch(run, t, epoch)
    t.forward.train()
    steps = len(t.loader)
    running = torch.zeros(len(LOSS_PARTS), device=device)  # summed over steps, on the device
    augment = TrainBatchAugment(device, cfg.seed, run.rank)  # erasing drawn per (epoch, step)
    start = time.time()
    bar = tqdm(t.loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not run.master,
               leave=False)
    for step, (images, labels) in enumerate(bar, 1):
        images = augment(images.to(device, non_blocking=True), epoch, step)  # uint8 -> float
        labels = labels.to(device, non_blocking=True)
        loss, parts = train_step(t.model, images, labels, t.optimizer, t.scaler, run.amp,
                                 cfg.grad_clip, forward=t.forward)
        t.scheduler.step()
        running += torch.stack([loss.float(), *[parts[k].float() for k in LOSS_PARTS[1:]]])
        if step % cfg.log_interval == 0 or step == steps:  # the only host syncs of the step
            synced = running.clone()
            if run.world > 1:
                dist.all_reduce(synced)
            stop_on_nan(run, synced, epoch, step)
            mean = (synced / (step * run.world)).tolist()
            speed = step * cfg.batch_size * run.world / (time.time() - start)
            bar.set_postfix(**{k: f"{v:.3f}" for k, v in zip(LOSS_PARTS, mean)},
                            img_s=f"{speed:.0f}")
    return dict(zip(LOSS_PARTS, mean)), time.time() - start


# -- evaluation and saving -----------------------------------------------------------------------

def save_epoch(run: Run, t: Training, epoch: int, summary: Dict, best: Dict, is_best: bool):
    """last.pt (resumable) every epoch, best.pt when the evaluation improved; both atomic."""
    train_cfg = dataclasses.asdict(run.cfg)
    resume_state = {"optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(),
                    "scaler": t.scaler.state_dict(), "rng": rng_state(), "best": best}
    atomic_save(make_checkpoint(t.model, t.descriptions, epoch + 1, summary, train_cfg,
                                resume_state), run.path("last.pt"))
    if is_best:
        atomic_save(make_checkpoint(t.model, t.descriptions, epoch + 1, summary, train_cfg),
                    run.path("best.pt"))


def evaluate_and_save(run: Run, t: Training, epoch: int, losses: Dict, seconds: float,
                      best: Dict, metrics: Dict):
    """Evaluate (every --eval-every epochs and at the end), save, log -> (best, last metrics)."""
    cfg = run.cfg
    images_per_second = len(t.loader) * cfg.batch_size * run.world / seconds
    evaluated = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
    eval_start = time.time()
    if evaluated:
        t.model.eval()
        metrics = evaluate(t.eval_logits, t.eval_set, t.classnames, run.device, run.amp,
                           batch_size=2 * cfg.batch_size, workers=cfg.workers)
    eval_seconds = time.time() - eval_start if evaluated else 0.0  # the cost of --eval-every
    record = {"epoch": epoch + 1, **losses, "lr": t.scheduler.get_last_lr()[0],
              "war": metrics.get("war") if evaluated else None,
              "uar": metrics.get("uar") if evaluated else None,
              "images_per_second": images_per_second, "seconds": seconds,
              "eval_seconds": eval_seconds}
    is_best = evaluated and metrics["war"] > best["war"]
    if is_best:
        best = {"war": metrics["war"], "uar": metrics["uar"], "epoch": epoch + 1}
    if run.master:
        keys = ("war", "uar", "per_class_recall", "confusion")
        save_epoch(run, t, epoch, {k: metrics[k] for k in keys} if evaluated else {}, best,
                   is_best)
        with open(run.path("metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
    scores = (f"{cfg.eval_split} WAR {100 * metrics['war']:.2f}%  UAR {100 * metrics['uar']:.2f}%"
              f"  (best {100 * best['war']:.2f}% @ {best['epoch']})" if evaluated else "")
    run.log(f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {losses['loss']:.4f} (cls "
            f"{losses['cls']:.3f} ta {losses['ta']:.3f} pa {losses['pa']:.3f} v "
            f"{losses['v']:.3f})  lr {record['lr']:.2e}  {scores}  "
            f"{images_per_second:.0f} img/s  {seconds:.0f}s"
            + (f" + eval {eval_seconds:.1f}s" if evaluated else ""))
    return best, metrics


def train_epochs(run: Run, t: Training, start_epoch: int, best: Dict):
    """The epoch loop -> (best, last evaluation, whether --stop-after ended it early)."""
    cfg, metrics = run.cfg, {}
    for epoch in range(start_epoch, cfg.epochs):
        losses, seconds = train_one_epoch(run, t, epoch)
        best, metrics = evaluate_and_save(run, t, epoch, losses, seconds, best, metrics)
        if cfg.stop_after and epoch + 1 == cfg.stop_after and epoch + 1 < cfg.epochs:
            run.log(f"stopping after epoch {epoch + 1} as asked (--stop-after); continue with "
                    f"--resume {run.path('last.pt')}")
            return best, metrics, True
    return best, metrics, False


def report(run: Run, t: Training, best: Dict, metrics: Dict, stopped: bool, resolution: int):
    """The final evaluation, best.pt on the test split if another split chose it, file list."""
    cfg = run.cfg
    if metrics and not stopped:
        run.log(f"\nfinal {cfg.eval_split} evaluation (epoch {cfg.epochs}):\n"
                f"{format_report(metrics)}")
    if cfg.eval_split != "test" and best["epoch"] > 0 and not cfg.demo and not stopped:
        # Model selection used another split: report the best checkpoint on the test split too.
        t.model.load_trainable_state_dict(load_checkpoint(run.path("best.pt"))["state_dict"])
        t.model.eval()
        test_set = build_dataset(cfg.dataset, cfg.data_root, "test",
                                 eval_transform(resolution, uint8=True))
        test = evaluate(t.eval_logits, test_set, t.classnames, run.device, run.amp,
                        batch_size=2 * cfg.batch_size, workers=cfg.workers)
        run.log(f"\nbest.pt (epoch {best['epoch']}) on the test split:\n{format_report(test)}")
    run.log(f"\ncheckpoints: {run.path('best.pt')} (best {cfg.eval_split} WAR "
            f"{100 * best['war']:.2f}% at epoch {best['epoch']}), {run.path('last.pt')}\n"
            f"logs: {run.path('log.txt')}, {run.path('metrics.jsonl')}, config: "
            f"{run.path('config.json')}")
    if cfg.demo:
        run.log(f"evaluate it again with: python eval.py --demo --checkpoint "
                f"{run.path('best.pt')}\n(DEMO on synthetic data: see the README for training "
                "on RAF-DB, AffectNet or FERPlus.)")


# -- main ----------------------------------------------------------------------------------------

def main(argv=None):
    cfg, model_cfg, model_overrides = parse_config(argv)
    if cfg.method == "expclip":
        return run_expclip(cfg)
    if cfg.method != "mpafer":
        sys.exit(f"--method must be mpafer or expclip, got {cfg.method!r}")

    run, model_cfg = start_run(cfg, model_cfg, model_overrides)
    clip_model, clip_name = load_clip(run)
    resolution = clip_model.visual.input_resolution
    train_set, eval_set = build_data(run, resolution)
    classnames = list(train_set.classnames)
    model, descriptions = build_model(run, clip_model, clip_name, classnames, model_cfg)
    if model_cfg.prototype_alignment:
        set_prototypes(run, model, train_set, resolution)
    loader, loader_rng = make_train_loader(run, train_set)
    optimizer, scheduler, scaler = make_optimizer(run, model, len(loader))
    t = Training(model, model, loader, loader_rng, optimizer, scheduler, scaler, eval_set,
                 classnames, descriptions)
    start_epoch, best = restore(run, t)
    if run.world > 1:
        device_ids = [run.device.index] if run.device.type == "cuda" else None
        t.forward = DDP(model, device_ids=device_ids, broadcast_buffers=False)
    if cfg.demo and start_epoch == 0:
        model.eval()
        before = evaluate(t.eval_logits, eval_set, classnames, run.device, run.amp,
                          batch_size=2 * cfg.batch_size, workers=cfg.workers)
        run.log(f"before training (random prompts): WAR {100 * before['war']:.2f}%  UAR "
                f"{100 * before['uar']:.2f}%  (chance {100 / len(classnames):.1f}%)")

    best, metrics, stopped = train_epochs(run, t, start_epoch, best)
    report(run, t, best, metrics, stopped, resolution)
    if run.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
