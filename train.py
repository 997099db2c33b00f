"""Train MPA-FER prompts on a frozen CLIP (or an Exp-CLIP head on cached features).

    python train.py --demo                                   # synthetic faces, tiny CLIP, CPU
    python train.py --dataset rafdb --data-root data/RAF-DB  # the reported RAF-DB recipe
    python train.py --dataset ferplus --data-root data/FERPlus --clip ViT-L/14 --amp bf16
    python train.py --resume runs/rafdb/<run>/last.pt        # continue exactly where it stopped
    torchrun --nproc_per_node=4 train.py --dataset affectnet7 --data-root data/AffectNet
    python train.py --method expclip --features feats.pt

Every field of TrainConfig and MPAFERConfig is a command-line flag (`--help` lists them).
Precedence: defaults < dataset preset < --demo < flags you give. Each run gets its own folder,
runs/<dataset>/<yyyymmdd-hhmmss> (--name NAME: runs/<dataset>/NAME; --out DIR: DIR); a folder
that holds another run's checkpoints is refused unless --resume or --overwrite. The resolved
configuration is printed, saved as config.json in that folder, and stored in every checkpoint.
Ctrl-C stops at the end of the current step, saves a resumable last.pt and prints how to resume.

The file reads top to bottom: configuration (every value checked), the run's set-up, data and
CLIP (checked before anything is written), model and prototypes, optimiser, the epoch loop (one
training step is `mpafer.engine.train_step`), evaluation and saving, and the final report.
"""
import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from mpafer import clip
from mpafer.checkpoint import check_compatible, clip_activation, load_checkpoint, make_checkpoint
from mpafer.data import (
    ClassBalancedSampler,
    ResumableSampler,
    SeededAugmentation,
    TrainBatchAugment,
    build_dataset,
    dataset_fingerprint,
    eval_transform,
    format_class_counts,
    require_readable,
    train_transform,
)
from mpafer.data.subsets import (
    HELD_OUT,
    Subset,
    few_shot_indices,
    stratified_split,
    subset_record,
)
from mpafer.demo import demo_clip_path, demo_datasets
from mpafer.engine import (
    autocast,
    build_mpafer,
    configure_cuda,
    evaluate,
    grad_scaler,
    resolve_amp,
    setup_distributed,
    train_step,
    trainable_parameters,
)
from mpafer.expclip import ZeroShotClassifier
from mpafer.metrics import format_report
from mpafer.model import MPAFER, MPAFERConfig
from mpafer.prompts import hard_prompts_by_class, load_descriptions
from mpafer.prototypes import cached_prototypes, compute_prototypes
from mpafer.report import write_curves
from mpafer.runs import (
    StopRequest,
    clear_run_files,
    existing,
    resume_changes,
)
from mpafer.train_config import TrainConfig, parse_config
from mpafer.utils import (
    atomic_save,
    atomic_write,
    atomic_write_json,
    ignore_interrupts,
    run_cli,
)

LOSS_PARTS = ("loss", "cls", "ta", "pa", "v")


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
    """Prints on rank 0 and appends the same lines to <out>/log.txt once the run folder is
    opened (`open`); lines logged before that are kept and written then, so a run that fails
    its checks writes nothing."""

    def __init__(self, active: bool):
        self.path, self.active, self.pending = None, active, []

    def open(self, path: str):
        self.path = path
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in self.pending)
        self.pending = []

    def __call__(self, message: str = ""):
        if not self.active:
            return
        tqdm.write(message)
        if self.path is None:
            self.pending.append(message)
            return
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
    history: List[Dict]  # one entry per resume: where it continued, which flags it changed

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
    stop: StopRequest = field(default_factory=StopRequest)  # Ctrl-C
    first_step: int = 0  # a run resumed in the middle of an epoch: steps done in it,
    first_sums: Optional[torch.Tensor] = None  # and their loss sums over all processes
    grad_norms: Optional[Dict[str, float]] = None  # per loss term, at the first step


    def eval_logits(self, images):
        return self.model(images).logits


# -- Exp-CLIP ----------------------------------------------------------------------------------

def run_expclip(cfg: TrainConfig):
    """Train an Exp-CLIP head on a feature file (CLIP and teacher features, cached)."""
    from mpafer.expclip import train_head_from_file
    if not cfg.features:
        sys.exit("--method expclip needs --features FILE (make it with `python -m mpafer.expclip "
                 "cache` and `python -m mpafer.expclip teacher`)")
    if not os.path.isfile(cfg.features):
        raise FileNotFoundError(f"--features: {cfg.features} not found")
    clear_run_files(cfg.out)  # a folder with another run's head was refused unless --overwrite
    os.makedirs(cfg.out, exist_ok=True)
    log = Logger(True)
    log.open(os.path.join(cfg.out, "log.txt"))
    metadata = train_head_from_file(
        cfg.features, os.path.join(cfg.out, "expclip_head.pth"), device=cfg.device or "cpu",
        log=log, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, seed=cfg.seed)
    atomic_write_json({"train": dataclasses.asdict(cfg)}, os.path.join(cfg.out, "config.json"))
    lines = "".join(json.dumps(h) + "\n" for h in metadata["history"])
    atomic_write(os.path.join(cfg.out, "metrics.jsonl"), lambda f: f.write(lines.encode()))


# -- MPA-FER: the run's set-up -------------------------------------------------------------------

def start_run(cfg: TrainConfig, model_cfg: MPAFERConfig) -> Run:
    """Processes, precision, the checkpoint resumed from, the log. Nothing is written yet: the
    run folder is opened once the data and CLIP have passed their checks."""
    rank, world, device = setup_distributed(cfg.device)
    if world > 1:  # every process writes to (and names) rank 0's run folder
        box = [cfg.out]
        dist.broadcast_object_list(box, src=0)
        cfg.out = box[0]
    if device.type == "cuda":
        configure_cuda()
    amp = resolve_amp(cfg.amp, device)
    resume = load_checkpoint(cfg.resume) if cfg.resume else None
    history = []
    if resume is not None:
        state = resume["resume"]
        changed = resume_changes(resume["train_config"], dataclasses.asdict(cfg))
        history = [*state.get("history", []), {
            "from": cfg.resume, "epoch": resume["epoch"], "step": state.get("step", 0),
            "changed": changed}]
    run = Run(cfg, rank, world, device, amp, Logger(rank == 0), resume, history)
    if cfg.demo:
        run.log("=" * 78 + "\nDEMO: MPA-FER on synthetic cartoon faces with a tiny CLIP. These "
                "numbers say the\npipeline works end to end; they say nothing about real facial "
                "expression data.\n" + "=" * 78)
    run.log(f"config: {json.dumps(run_record(run, model_cfg))}")
    return run


def run_record(run: Run, model_cfg: MPAFERConfig) -> Dict:
    """config.json: the settings that ran, the precision and processes they ran with, and the
    resumes (where each continued and which flags it changed)."""
    return {"train": dataclasses.asdict(run.cfg), "model": model_cfg.to_dict(),
            "precision": str(run.amp or torch.float32).replace("torch.", ""),
            "processes": run.world, "resumed": run.history}


def already_finished(run: Run) -> bool:
    """A resumed run that has trained all its epochs: say so, and what it left, instead of
    training (--epochs N extends it)."""
    if (run.resume is None or run.resume["resume"].get("step")
            or run.resume["epoch"] < run.cfg.epochs):
        return False
    run.log(f"{run.cfg.resume}: this run has finished its {run.cfg.epochs} epochs; nothing to "
            f"do (--epochs N, N > {run.cfg.epochs}, trains it longer)")
    run.log(files_summary(run, run.resume["resume"]["best"]))
    return True


def open_run_folder(run: Run, model_cfg: MPAFERConfig):
    """The first write of the run: create its folder (a new run first removes what an earlier
    attempt left there), write config.json, start log.txt with the lines logged so far."""
    if not run.master:
        return
    if run.resume is None:
        clear_run_files(run.cfg.out)
    os.makedirs(run.cfg.out, exist_ok=True)
    atomic_write_json(run_record(run, model_cfg), run.path("config.json"))
    run.log.open(run.path("log.txt"))


# -- data and CLIP -------------------------------------------------------------------------------

def read_data(run: Run):
    """The datasets, read and checked before anything expensive -> (train, eval) without
    transforms (they need CLIP's resolution), or None for the demo (its synthetic faces are
    drawn later). Checked: the root and label files, the class set of a resumed run, and that
    every image of the evaluation split decodes."""
    cfg = run.cfg
    if cfg.demo:
        return None
    options = dataset_options(cfg)
    train_set = build_dataset(cfg.dataset, cfg.data_root, "train", **options)
    eval_set = (None if cfg.eval_split == HELD_OUT else  # carved out of train later
                build_dataset(cfg.dataset, cfg.data_root, cfg.eval_split, **options))
    if run.resume is not None:
        check_compatible(run.resume, cfg.resume, classnames=train_set.classnames)
    if eval_set is not None and not cfg.skip_bad_images:  # (with it, bad ones were dropped)
        require_readable(eval_set, cfg.eval_split, cfg.workers)
    return train_set, eval_set


def dataset_options(cfg: TrainConfig) -> Dict:
    options = {"skip_bad_images": True} if cfg.skip_bad_images else {}
    if cfg.classnames:
        options["classnames"] = [c.strip() for c in cfg.classnames.split(",")]
    return options


def load_clip(run: Run):
    """The frozen CLIP -> (model, name); the demo uses its pre-trained tiny CLIP unless --clip.
    A resumed run must find the CLIP it was trained on, and runs it with its activation."""
    name = run.cfg.clip
    if not name:
        if run.master:
            demo_clip_path(run.cfg.cache_dir, log=run.log)  # pre-trained once, then cached
        if run.world > 1:
            dist.barrier()
        name = demo_clip_path(run.cfg.cache_dir, log=run.log)
    activation = clip_activation(run.cfg.clip_activation, run.resume, demo_clip=not run.cfg.clip)
    clip_model, _ = clip.load(name, device=run.device, download_root=run.cfg.cache_dir,
                              activation=activation)
    if run.resume is not None:
        check_compatible(run.resume, run.cfg.resume, clip_model)
    return clip_model, name


def with_transforms(run: Run, data, resolution: int):
    """-> (training set with augmentation, evaluation set with CLIP's preprocessing, the
    records of the subsets that --shots / --val-fraction drew)."""
    cfg = run.cfg
    train_tf = train_transform(resolution, uint8=True)
    eval_tf = eval_transform(resolution, uint8=True)
    if data is None:
        train_set, eval_set = demo_datasets(resolution, train_tf, eval_tf,
                                            cfg.demo_train_per_class, cfg.demo_test_per_class)
    else:
        train_set, eval_set = data
        train_set.transform = train_tf
        if eval_set is not None:  # (None: --val-fraction carves it out of the training set)
            eval_set.transform = eval_tf
    train_set, eval_set, records = carve_subsets(run, train_set, eval_set, resolution)
    run.log(f"train: {len(train_set)} images\n{format_class_counts(train_set)}")
    run.log(f"{cfg.eval_split}: {len(eval_set)} images")
    return train_set, eval_set, records


def carve_subsets(run: Run, train_set, eval_set, resolution: int):
    """--val-fraction: a stratified part of the training set becomes the evaluation set;
    --shots: training uses K images per class of the rest. Both seeded, both listed in the run
    folder (written by `write_subsets` once the run folder is open)."""
    cfg, records = run.cfg, []
    kept = None
    if cfg.val_fraction > 0:
        kept, held = stratified_split(train_set.targets, cfg.val_fraction, cfg.seed)
        eval_set = Subset(train_set, held, eval_transform(resolution, uint8=True))
        records.append(("heldout.json", eval_set, dict(protocol="held-out validation",
                                                       fraction=cfg.val_fraction)))
    if cfg.shots > 0:
        chosen = few_shot_indices(train_set.targets, cfg.shots, cfg.seed, pool=kept)
        train_set = Subset(train_set, chosen, train_set.transform)
        records.append(("shots.json", train_set, dict(protocol="few-shot", shots=cfg.shots)))
    elif kept is not None:
        train_set = Subset(train_set, kept, train_set.transform)
    return train_set, eval_set, records


def write_subsets(run: Run, records):
    for name, subset, info in records:
        if run.master:
            record = subset_record(subset, **info, seed=run.cfg.seed,
                                   dataset="synthetic-demo" if run.cfg.demo else run.cfg.dataset)
            atomic_write_json(record, run.path(name))
        run.log(f"{info['protocol']}: {len(subset)} images, listed in {run.path(name)}")


# -- model and prototypes ------------------------------------------------------------------------

def build_model(run: Run, clip_model, clip_name: str, classnames: List[str],
                model_cfg: MPAFERConfig):
    """Frozen CLIP + prompts; hard prompts from the LLM descriptions -> (model, descriptions).
    The prompts' initialisation draws from --seed, whatever ran before (e.g. the demo CLIP's
    first pre-training), so a first run and a later one start alike."""
    seed_everything(run.cfg.seed)
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
    rank 0, cached on disk under a key of everything they depend on (stable values only, so
    later runs find them), broadcast to all ranks."""
    cfg = run.cfg
    proto_view = copy.copy(train_set)  # same images, eval transform
    proto_view.transform = eval_transform(resolution, uint8=True)
    per_class = cfg.prototypes_per_class or None
    base = train_set.base if isinstance(train_set, Subset) else train_set
    key = {"clip_sha256": model.clip.checkpoint_sha256, "clip_activation": model.clip.activation,
           "resolution": resolution,
           "transform": "eval_transform (CLIP preprocessing)",
           "dataset": "synthetic-demo" if cfg.demo else cfg.dataset,
           "root": "" if cfg.demo else os.path.abspath(cfg.data_root), "split": "train",
           "images": len(train_set), "items_sha256": dataset_fingerprint(base),
           "classes": list(train_set.classnames), "per_class": cfg.prototypes_per_class,
           "seed": cfg.seed if per_class else None,  # the seed draws the per-class subset
           "amp": str(run.amp)}
    if isinstance(train_set, Subset):  # --shots / --val-fraction: which images, not just how many
        key["subset"] = train_set.fingerprint()
    prototypes = None
    if run.master:
        loader = DataLoader(proto_view, batch_size=128, num_workers=cfg.workers,
                            pin_memory=run.device.type == "cuda")
        prototypes = cached_prototypes(
            os.path.join(cfg.cache_dir, "prototypes"), key,
            lambda: compute_prototypes(model, loader, per_class=per_class, seed=cfg.seed,
                                       amp_dtype=run.amp),
            log=run.log)
    if run.world > 1:
        box = [prototypes]
        dist.broadcast_object_list(box, src=0)
        prototypes = box[0]
    model.set_prototypes(prototypes.to(run.device))


# -- optimiser -----------------------------------------------------------------------------------

def make_train_loader(run: Run, train_set):
    """-> (loader, its generator). Balanced, distributed or plain random sampling; batches are
    dropped at the end so every step has the same size. Each image's augmentation draws from
    (seed, epoch, index), and the sampler can skip the part of an epoch done before a resume."""
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
    # Not persistent_workers: each epoch's workers start afresh from (seed, epoch); with
    # SeededAugmentation every image's crop depends only on (seed, epoch, index).
    loader = DataLoader(SeededAugmentation(train_set, cfg.seed), batch_size=cfg.batch_size,
                        sampler=ResumableSampler(sampler), num_workers=cfg.workers,
                        pin_memory=run.device.type == "cuda", drop_last=True,
                        generator=loader_rng, worker_init_fn=ignore_interrupts)
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
    A run stopped in the middle of an epoch continues at its step, with its loss sums. A
    resumed run drops the metrics.jsonl lines of epochs it redoes."""
    if run.resume is None:
        return 0, {"war": -1.0, "epoch": 0}
    t.model.load_trainable_state_dict(run.resume["state_dict"])
    state = run.resume["resume"]
    t.optimizer.load_state_dict(state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    t.scaler.load_state_dict(state["scaler"])
    start_epoch, best = run.resume["epoch"], state["best"]
    t.first_step, t.first_sums = state.get("step", 0), state.get("sums")
    if t.first_step and state.get("processes", 1) != run.world:
        raise ValueError(f"{run.cfg.resume} stopped in the middle of an epoch with "
                         f"{state.get('processes', 1)} process(es); resume it with as many "
                         f"(this run has {run.world})")
    where = (f"step {t.first_step} of epoch {start_epoch + 1}" if t.first_step
             else f"epoch {start_epoch}")
    run.log(f"resumed from {run.cfg.resume} after {where} (best WAR {100 * best['war']:.2f}%)")
    metrics_path = run.path("metrics.jsonl")
    if run.master and os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            kept = "".join(line for line in f if json.loads(line)["epoch"] <= start_epoch)
        atomic_write(metrics_path, lambda f: f.write(kept.encode("utf-8")))
    return start_epoch, best


# -- the epoch loop ------------------------------------------------------------------------------

def seed_epoch(run: Run, t: Training, epoch: int, first_step: int = 0):
    """Everything random in an epoch derives from (seed, epoch), each image's augmentation from
    (seed, epoch, index): resuming repeats it exactly, also from the middle of the epoch, whose
    first `first_step` batches the sampler then skips."""
    seed = run.cfg.seed * 1000 + epoch
    seed_everything(seed)
    t.loader_rng.manual_seed(seed)
    t.loader.dataset.set_epoch(epoch)
    sampler = t.loader.sampler  # a ResumableSampler around the epoch's sampler
    sampler.skip = first_step * run.cfg.batch_size
    sampler.set_epoch(epoch)
    if isinstance(sampler.sampler, RandomSampler):
        sampler.sampler.generator.manual_seed(seed)


def stop_on_nan(run: Run, totals: torch.Tensor, epoch: int, step: int):
    if torch.isfinite(totals).all():
        return
    last = run.path("last.pt")
    kept = (f"the last good checkpoint is {last}" if os.path.isfile(last)
            else "no checkpoint was written")
    run.log(f"stopping: the loss became {totals[0].item()} in epoch {epoch + 1} (step {step}). "
            f"Nothing was saved for this epoch; {kept}. Try a lower --lr, --amp bf16/off, or "
            "--grad-clip.")
    if run.world > 1:
        dist.destroy_process_group()
    sys.exit(1)


def first_step_gradient_norms(run: Run, t: Training, images, labels) -> Dict[str, float]:
    """Each loss term's gradient norm on the prompts at the first step, logged so a reader sees
    that every term moves the prompts and how the terms balance (one extra backward per term)."""
    with autocast(run.device, run.amp):
        norms = t.model.term_gradient_norms(images, labels, scale=t.scaler.get_scale())
    run.log("gradient norms on the trainable parameters at the first step: "
            + "  ".join(f"{k} {v:.4g}" for k, v in norms.items()))
    return norms


def sync_progress(run: Run, running: torch.Tensor, asked: bool):
    """-> (loss sums over all processes, whether any process got Ctrl-C). One all-reduce at the
    loop's sync points, so every process stops at the same step."""
    synced = torch.cat([running, running.new_tensor([float(asked)])])
    if run.world > 1:
        dist.all_reduce(synced)
    return synced[:-1], bool(synced[-1] > 0)


def train_one_epoch(run: Run, t: Training, epoch: int, first_step: int = 0, sums=None):
    """Steps first_step + 1 ... of an epoch -> (mean loss parts over the epoch and all
    processes, seconds, whether Ctrl-C asked to stop). Ctrl-C in the middle of the epoch ends
    it at the end of the current step: then the means are None, and the last element is
    (steps done, their loss sums) for last.pt."""
    cfg, device = run.cfg, run.device
    seed_epoch(run, t, epoch, first_step)
    t.forward.train()
    steps = first_step + len(t.loader)
    running = torch.zeros(len(LOSS_PARTS), device=device)  # summed over steps, on the device
    augment = TrainBatchAugment(device, cfg.seed, run.rank)  # erasing drawn per (epoch, step)
    if sums is not None:
        running += sums.to(device) / run.world  # the part done before the resume
    start = time.time()
    bar = tqdm(t.loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not run.master,
               leave=False, initial=first_step, total=steps)
    for step, (images, labels) in enumerate(bar, first_step + 1):
        images = augment(images.to(device, non_blocking=True), epoch, step)  # uint8 -> float
        labels = labels.to(device, non_blocking=True)
        if epoch == 0 and step == 1:
            t.grad_norms = first_step_gradient_norms(run, t, images, labels)
        loss, parts = train_step(t.model, images, labels, t.optimizer, t.scaler, run.amp,
                                 cfg.grad_clip, forward=t.forward)
        t.scheduler.step()
        running += torch.stack([loss.float(), *[parts[k].float() for k in LOSS_PARTS[1:]]])
        asked = t.stop.requested  # a host flag: checking it costs nothing
        if step % cfg.log_interval == 0 or step == steps or (asked and run.world == 1):
            synced, stop = sync_progress(run, running, asked)  # the only host syncs of the step
            stop_on_nan(run, synced, epoch, step)
            mean = (synced / (step * run.world)).tolist()
            speed = (step - first_step) * cfg.batch_size * run.world / (time.time() - start)
            bar.set_postfix(**{k: f"{v:.3f}" for k, v in zip(LOSS_PARTS, mean)},
                            img_s=f"{speed:.0f}")
            if stop and step < steps:
                return None, time.time() - start, (step, synced.cpu())
    return dict(zip(LOSS_PARTS, mean)), time.time() - start, stop


def demo_baselines(run: Run, t: Training, clip_model):
    """The demo's reference points on its test faces, before any training: the model with its
    random prompts, and zero-shot CLIP with MPA-FER's hard prompts (a class's logit is the mean
    over its descriptions' prompts), the baseline prompt learning has to beat. baseline.json."""
    cfg, kwargs = run.cfg, dict(batch_size=2 * run.cfg.batch_size, workers=run.cfg.workers)
    t.model.eval()
    random_prompts = evaluate(t.eval_logits, t.eval_set, t.classnames, run.device, run.amp,
                              **kwargs)
    descriptions = t.descriptions or load_descriptions(t.classnames, cfg.descriptions or None)
    prompts = hard_prompts_by_class(t.classnames, descriptions, 3)
    zero_shot = evaluate(ZeroShotClassifier(clip_model, t.classnames, prompts).eval(), t.eval_set,
                         t.classnames, run.device, run.amp, desc="zero-shot", **kwargs)
    run.log(f"before training: random prompts WAR {100 * random_prompts['war']:.2f}%; zero-shot "
            f"CLIP with the hard prompts WAR {100 * zero_shot['war']:.2f}%  UAR "
            f"{100 * zero_shot['uar']:.2f}%  (chance {100 / len(t.classnames):.1f}%)")
    if run.master:
        atomic_write_json({"random_prompts": random_prompts, "zero_shot_hard_prompts": zero_shot},
                          run.path("baseline.json"))


# -- evaluation and saving -----------------------------------------------------------------------

def resume_state(run: Run, t: Training, best: Dict, step: int = 0, sums=None) -> Dict:
    """What last.pt needs to continue: optimiser, schedule, scaler, best so far, and for a run
    stopped in the middle of an epoch, the steps done in it and their loss sums."""
    return {"optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(),
            "scaler": t.scaler.state_dict(), "rng": rng_state(), "best": best, "step": step,
            "sums": sums, "processes": run.world, "history": run.history}


def save_epoch(run: Run, t: Training, epoch: int, summary: Dict, best: Dict, is_best: bool):
    """last.pt (resumable) every epoch, best.pt when the evaluation improved; both atomic."""
    train_cfg = dataclasses.asdict(run.cfg)
    atomic_save(make_checkpoint(t.model, t.descriptions, epoch + 1, summary, train_cfg,
                                resume_state(run, t, best)), run.path("last.pt"))
    if is_best:
        atomic_save(make_checkpoint(t.model, t.descriptions, epoch + 1, summary, train_cfg),
                    run.path("best.pt"))


def save_interrupted(run: Run, t: Training, epoch: int, position, best: Dict):
    """Ctrl-C in the middle of epoch `epoch`: last.pt records how far it got, so that a resume
    continues exactly there (equal to a run that was never stopped)."""
    step, sums = position
    if run.master:
        atomic_save(make_checkpoint(t.model, t.descriptions, epoch, {},
                                    dataclasses.asdict(run.cfg),
                                    resume_state(run, t, best, step, sums)), run.path("last.pt"))
    run.log(f"stopped by Ctrl-C after step {step} of epoch {epoch + 1}; saved "
            f"{run.path('last.pt')}")


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
              "per_class_recall": metrics.get("per_class_recall") if evaluated else None,
              "images_per_second": images_per_second, "seconds": seconds,
              "eval_seconds": eval_seconds}
    if epoch == 0 and t.grad_norms is not None:
        record["grad_norms"] = t.grad_norms
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
    """The epoch loop -> (best, last evaluation, why it ended early: None, "stop-after" or
    "interrupted"). Ctrl-C stops at the end of the current step and saves a resumable last.pt."""
    cfg, metrics = run.cfg, {}
    first_step, sums = t.first_step, t.first_sums
    with t.stop:
        for epoch in range(start_epoch, cfg.epochs):
            losses, seconds, stop = train_one_epoch(run, t, epoch, first_step, sums)
            first_step, sums = 0, None
            if losses is None:
                save_interrupted(run, t, epoch, stop, best)
                return best, metrics, interrupted(run)
            best, metrics = evaluate_and_save(run, t, epoch, losses, seconds, best, metrics)
            if stop and epoch + 1 < cfg.epochs:
                return best, metrics, interrupted(run)
            if cfg.stop_after and epoch + 1 == cfg.stop_after and epoch + 1 < cfg.epochs:
                run.log(f"stopping after epoch {epoch + 1} as asked (--stop-after); continue "
                        f"with: {resume_command(run)}")
                return best, metrics, "stop-after"
    return best, metrics, None


def resume_command(run: Run) -> str:
    launcher = f"torchrun --nproc_per_node={run.world}" if run.world > 1 else "python"
    return f"{launcher} train.py --resume {run.path('last.pt')}"


def interrupted(run: Run) -> str:
    run.log(f"interrupted (Ctrl-C); continue exactly where it stopped with: "
            f"{resume_command(run)}")
    return "interrupted"


def files_summary(run: Run, best: Dict) -> str:
    """What the run left (only files that exist) and how to evaluate it."""
    cfg, lines = run.cfg, []
    if os.path.isfile(run.path("best.pt")):
        lines.append(f"best checkpoint: {run.path('best.pt')} (best {cfg.eval_split} WAR "
                     f"{100 * best['war']:.2f}% at epoch {best['epoch']})")
    if os.path.isfile(run.path("last.pt")):
        lines.append(f"resumable checkpoint: {run.path('last.pt')}")
    logs = existing(cfg.out, ("log.txt", "metrics.jsonl", "config.json"))
    if logs:
        lines.append(f"logs and settings: {', '.join(logs)}")
    if os.path.isfile(run.path("best.pt")):
        lines.append(f"evaluate it with: python eval.py --checkpoint {run.path('best.pt')}")
    if cfg.demo:
        lines.append("(DEMO on synthetic data: see the README for training on RAF-DB, "
                     "AffectNet or FERPlus.)")
    return "\n".join(lines)


def report(run: Run, t: Training, best: Dict, metrics: Dict, stopped: Optional[str],
           resolution: int):
    """The final evaluation, best.pt on the test split if another split chose it, file list."""
    cfg = run.cfg
    if metrics and not stopped:
        run.log(f"\nfinal {cfg.eval_split} evaluation (epoch {cfg.epochs}):\n"
                f"{format_report(metrics)}")
    if (cfg.eval_split != "test" and best["epoch"] > 0 and not stopped
            and (not cfg.demo or cfg.eval_split == HELD_OUT)):
        # Model selection used another split: report the best checkpoint on the test split too.
        if run.world > 1:
            dist.barrier()  # rank 0 writes best.pt; the other ranks read it only after that
        t.model.load_trainable_state_dict(load_checkpoint(run.path("best.pt"))["state_dict"])
        t.model.eval()
        test_set = load_test_split(run, resolution)
        test = evaluate(t.eval_logits, test_set, t.classnames, run.device, run.amp,
                        batch_size=2 * cfg.batch_size, workers=cfg.workers)
        run.log(f"\nbest.pt (epoch {best['epoch']}) on the test split:\n{format_report(test)}")
        if run.master:
            atomic_write_json({"epoch": best["epoch"], "chosen_on": cfg.eval_split, **test},
                              run.path("test.json"))
    if cfg.demo and best["epoch"] > 0 and os.path.isfile(run.path("baseline.json")):
        with open(run.path("baseline.json")) as f:
            zero_shot = json.load(f)["zero_shot_hard_prompts"]["war"]
        run.log(f"\nDEMO: zero-shot CLIP with the hard prompts {100 * zero_shot:.2f}% -> trained "
                f"MPA-FER {100 * best['war']:.2f}% (best {cfg.eval_split} WAR, "
                f"{100 * (best['war'] - zero_shot):+.2f} points)")
    run.log("\n" + files_summary(run, best))


def load_test_split(run: Run, resolution: int):
    """The test split with CLIP's preprocessing (the demo's synthetic test faces with --demo)."""
    cfg = run.cfg
    if cfg.demo:
        return demo_datasets(resolution, None, eval_transform(resolution, uint8=True), 1,
                             cfg.demo_test_per_class)[1]
    return build_dataset(cfg.dataset, cfg.data_root, "test", eval_transform(resolution, uint8=True),
                         **dataset_options(cfg))


def draw_curves(run: Run):
    """curves.png in the run folder: loss parts, WAR/UAR, per-class recall, learning rate."""
    if run.master and os.path.isfile(run.path("metrics.jsonl")):
        run.log(f"curves: {write_curves(run.cfg.out)}")


# -- the demo's ablation ladder -------------------------------------------------------------------

# The paper's ablation rows: (folder, name, flags on top of the defaults); the last is the method.
ABLATION_LADDER = (
    ("coop", "CoOp (text prompts only)", ["--visual-prompt-depth", "0", "--no-prototype-alignment",
                                  "--no-soft-hard-alignment", "--no-global-local"]),
    ("visual-prompts", "+ visual prompts", ["--no-prototype-alignment", "--no-soft-hard-alignment",
                          "--no-global-local"]),
    ("prototype-alignment", "+ prototype alignment", ["--no-soft-hard-alignment",
                                                      "--no-global-local"]),
    ("soft-hard-alignment", "+ soft-hard alignment", ["--no-global-local"]),
    ("full", "+ global-local alignment (MPA-FER)", []),
)


def without_flags(argv: List[str], names: Tuple[str, ...], with_value: Tuple[str, ...]):
    """argv minus the flags `names` (and the value after those in `with_value`)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in names:
            skip = name in with_value and "=" not in arg
            continue
        kept.append(arg)
    return kept


def run_demo_ablation(cfg: TrainConfig, argv: List[str]):
    """--demo-ablation: one demo run per row of ABLATION_LADDER, same seed and settings, each in
    a folder of its own under the run folder; then one table (ablation.md, ablation.json)."""
    if not cfg.demo:
        sys.exit("--demo-ablation runs the demo's ablation ladder: add --demo")
    base = without_flags(argv, ("--demo-ablation", "--out", "--name"), ("--out", "--name"))
    rows = []
    for i, (folder, row, flags) in enumerate(ABLATION_LADDER, 1):
        out = os.path.join(cfg.out, f"{i}-{folder}")
        print(f"\n=== ablation row {i}/{len(ABLATION_LADDER)}: {row} -> {out}")
        main([*base, "--out", out, *flags])
        with open(os.path.join(out, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        best = max(records, key=lambda r: r["war"] if r["war"] is not None else -1)
        with open(os.path.join(out, "baseline.json")) as f:
            zero_shot = json.load(f)["zero_shot_hard_prompts"]
        rows.append({"row": row, "flags": " ".join(flags), "best_war": best["war"],
                     "best_uar": best["uar"], "best_epoch": best["epoch"], "folder": out})
    lines = ["| row | best test WAR | UAR | epoch |", "|---|---|---|---|",
             f"| zero-shot CLIP, hard prompts | {100 * zero_shot['war']:.2f} | "
             f"{100 * zero_shot['uar']:.2f} | - |"]
    lines += [f"| {r['row']} | {100 * r['best_war']:.2f} | {100 * r['best_uar']:.2f} | "
              f"{r['best_epoch']} |" for r in rows]
    table = "\n".join(lines)
    atomic_write(os.path.join(cfg.out, "ablation.md"),
                 lambda f: f.write((table + "\n").encode("utf-8")))
    atomic_write_json({"zero_shot_hard_prompts": zero_shot, "rows": rows},
                      os.path.join(cfg.out, "ablation.json"))
    print(f"\nDEMO ablation (synthetic faces, seed {cfg.seed}):\n{table}\n"
          f"written to {os.path.join(cfg.out, 'ablation.md')}")


# -- main ----------------------------------------------------------------------------------------

def main(argv=None):
    cfg, model_cfg, _ = parse_config(argv, __doc__)
    if cfg.method == "expclip":
        return run_expclip(cfg)
    if cfg.demo_ablation:
        return run_demo_ablation(cfg, sys.argv[1:] if argv is None else list(argv))

    run = start_run(cfg, model_cfg)
    if already_finished(run):
        return
    data = read_data(run)  # checked before CLIP is loaded and before anything is written
    clip_model, clip_name = load_clip(run)
    resolution = clip_model.visual.input_resolution
    train_set, eval_set, subsets = with_transforms(run, data, resolution)
    open_run_folder(run, model_cfg)
    write_subsets(run, subsets)
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
    if cfg.demo and run.resume is None:
        demo_baselines(run, t, clip_model)

    best, metrics, stopped = train_epochs(run, t, start_epoch, best)
    report(run, t, best, metrics, stopped, resolution)
    draw_curves(run)
    if run.world > 1:
        dist.destroy_process_group()
    if stopped == "interrupted":
        sys.exit(130)  # as an interrupted program exits; last.pt is saved


if __name__ == "__main__":
    run_cli(main)
