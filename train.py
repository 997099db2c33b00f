"""Train MPA-FER prompts on a frozen CLIP (or an Exp-CLIP head on cached features).

    python train.py --demo                                   # synthetic faces, tiny CLIP, ~2 min on CPU
    python train.py --dataset rafdb --data-root data/RAF-DB  # the reported RAF-DB recipe, ViT-B/16
    python train.py --dataset ferplus --data-root data/FERPlus --clip ViT-L/14 --amp bf16
    python train.py --resume runs/rafdb/last.pt              # continue exactly where it stopped
    torchrun --nproc_per_node=4 train.py --dataset affectnet7 --data-root data/AffectNet
    python train.py --method expclip --features feats.pt --out runs/expclip

Every field of TrainConfig and MPAFERConfig is a command-line flag (`--help` lists them).
Precedence: defaults < dataset preset < --demo < flags you give. The resolved configuration is
printed, saved as config.json in --out, and stored in every checkpoint.
"""
import argparse
import copy
import dataclasses
import inspect
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import get_args, get_type_hints

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from mpafer import clip
from mpafer.checkpoint import check_compatible, load_checkpoint, make_checkpoint, save_checkpoint
from mpafer.data import ClassBalancedSampler, build_dataset, eval_transform, format_class_counts, train_transform
from mpafer.demo import demo_clip_path, demo_datasets
from mpafer.engine import AMP_CHOICES, autocast, configure_cuda, evaluate, resolve_amp, setup_distributed
from mpafer.metrics import format_report
from mpafer.model import MPAFER, MPAFERConfig
from mpafer.prompts import load_descriptions
from mpafer.prototypes import cached_prototypes, compute_prototypes
from mpafer.utils import atomic_write_json, run_cli


@dataclass
class TrainConfig:
    method: str = "mpafer"          # mpafer | expclip
    dataset: str = "rafdb"          # rafdb | affectnet7 | affectnet8 | ferplus | folder
    data_root: str = "data/RAF-DB"
    clip: str = "ViT-B/16"          # CLIP name (downloaded to --weights) or path; --demo: "" = the tiny demo CLIP
    weights: str = "weights"        # CLIP downloads and the prototype cache
    descriptions: str = ""          # class descriptions JSON (default: the shipped one)
    out: str = ""                   # output folder (default runs/<dataset>)
    epochs: int = 120
    batch_size: int = 32
    lr: float = 0.032
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0      # linear warm-up, then cosine decay to 0 (per step)
    grad_clip: float = 1.0          # max gradient norm (0 = off)
    workers: int = min(4, os.cpu_count() or 1)  # DataLoader workers per process
    amp: str = "auto"               # auto | bf16 | fp16 | off
    seed: int = 1
    device: str = ""                # default: cuda if available, else cpu
    resume: str = ""                # a last.pt to continue from
    demo: bool = False
    demo_train_per_class: int = 200  # synthetic faces per class (--demo)
    demo_test_per_class: int = 60
    stop_after: int = 0             # stop after this epoch (0 = never), e.g. to fit a job's time limit; resume later
    eval_split: str = "test"        # split evaluated every epoch and used to pick best.pt
    eval_every: int = 1
    balanced_sampler: bool = False  # class-balanced sampling (AffectNet)
    samples_per_epoch: int = 0      # with the balanced sampler; 0 = the training set's size
    prototypes_per_class: int = 0   # 0 = every training image
    skip_bad_images: bool = False
    log_interval: int = 20          # steps between loss syncs (progress bar, NaN check)
    grad_checkpointing: bool = False  # recompute CLIP blocks in backward: less memory (ViT-L/14 at batch 32 in 24 GB)
    compile: bool = False           # torch.compile the image tower (CUDA; first steps are slow)
    features: str = ""              # Exp-CLIP: feature file from `python -m mpafer.expclip cache/teacher`


# Dataset presets. RAF-DB is the paper's reported recipe; the others are our choices.
PRESETS = {
    "rafdb": dict(data_root="data/RAF-DB", epochs=120, batch_size=32, lr=0.032),
    "affectnet7": dict(data_root="data/AffectNet", epochs=20, balanced_sampler=True, samples_per_epoch=64000,
                       prototypes_per_class=2000),
    "affectnet8": dict(data_root="data/AffectNet", epochs=20, balanced_sampler=True, samples_per_epoch=64000,
                       prototypes_per_class=2000),
    "ferplus": dict(data_root="data/FERPlus", epochs=40, eval_split="val"),
    "folder": dict(data_root="data/faces", epochs=50),
}
DEMO = dict(dataset="synthetic", clip="", epochs=10, batch_size=32, lr=0.032, workers=0, amp="off", out="runs/demo")
DEMO_MODEL = dict(top_k=8)  # the demo CLIP has only 16 patches
EXPCLIP = dict(epochs=5, batch_size=512, lr=1e-3, momentum=0.9, weight_decay=1e-4, seed=1, out="runs/expclip")


# -- configuration -------------------------------------------------------------------------------

def field_comments(cls) -> dict:
    """The `# comment` after each field in a dataclass's source: its --help text."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        name, _, comment = line.partition("#")
        if ":" in name and comment and name.startswith("    ") and not name.strip().startswith(("def", '"')):
            comments[name.split(":")[0].strip()] = comment.strip()
    return comments


def add_fields(parser, cls, group):
    hints, comments = get_type_hints(cls), field_comments(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        kind = next((a for a in get_args(kind) if a is not type(None)), kind)  # Optional[X] -> X
        flag = "--" + f.name.replace("_", "-")
        text = comments.get(f.name, "")
        text = text if "default" in text else f"{text} (default {f.default!r})".strip()
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        else:
            choices = AMP_CHOICES if f.name == "amp" else None
            group.add_argument(flag, type=kind, default=argparse.SUPPRESS, choices=choices,
                               metavar=kind.__name__.upper(), help=text)


def parse_config(argv=None):
    """-> (TrainConfig, MPAFERConfig, the model fields given on the command line)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fields(parser, TrainConfig, parser.add_argument_group("training"))
    add_fields(parser, MPAFERConfig, parser.add_argument_group("MPA-FER model (MPAFERConfig)"))
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


# -- helpers -----------------------------------------------------------------------------------

def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    """RNG states for the record in last.pt (resume does not need them: every epoch re-seeds
    from (seed, epoch), which is what makes a resumed run repeat an uninterrupted one)."""
    return {"python": list(random.getstate()[1]), "numpy": torch.from_numpy(np.random.get_state()[1].copy()),
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


def run_expclip(cfg: TrainConfig):
    from mpafer.expclip import train_head_from_file
    if not cfg.features:
        sys.exit("--method expclip needs --features FILE (make it with `python -m mpafer.expclip cache` "
                 "and `python -m mpafer.expclip teacher`)")
    os.makedirs(cfg.out, exist_ok=True)
    log = Logger(cfg.out, True)
    metadata = train_head_from_file(cfg.features, os.path.join(cfg.out, "expclip_head.pth"), device=cfg.device or "cpu",
                                    log=log, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                    momentum=cfg.momentum, weight_decay=cfg.weight_decay, seed=cfg.seed)
    with open(os.path.join(cfg.out, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(h) + "\n" for h in metadata["history"])


# -- main --------------------------------------------------------------------------------------

def main(argv=None):
    cfg, model_cfg, model_overrides = parse_config(argv)
    if cfg.method == "expclip":
        return run_expclip(cfg)
    if cfg.method != "mpafer":
        sys.exit(f"--method must be mpafer or expclip, got {cfg.method!r}")

    rank, world, device = setup_distributed(cfg.device)
    master = rank == 0
    seed_everything(cfg.seed)  # prompt initialisation; each epoch re-seeds from (seed, epoch)
    if device.type == "cuda":
        configure_cuda()
    amp_dtype = resolve_amp(cfg.amp, device)
    resume = load_checkpoint(cfg.resume) if cfg.resume else None
    if resume is not None:
        if "resume" not in resume:
            sys.exit(f"{cfg.resume} has no training state (best.pt is for evaluation; resume from last.pt)")
        if model_overrides:
            print(f"note: --resume keeps the checkpoint's model configuration; ignoring {sorted(model_overrides)}")
        model_cfg = MPAFERConfig.from_dict(resume["config"])
    os.makedirs(cfg.out, exist_ok=True)
    log = Logger(cfg.out, master)
    if cfg.demo:
        log("=" * 78 + "\nDEMO: MPA-FER on synthetic cartoon faces with a tiny CLIP. These numbers say the\n"
            "pipeline works end to end; they say nothing about real facial expression data.\n" + "=" * 78)
    log(f"config: {json.dumps({'train': dataclasses.asdict(cfg), 'model': model_cfg.to_dict()})}")
    if master:
        atomic_write_json({"train": dataclasses.asdict(cfg), "model": model_cfg.to_dict()},
                          os.path.join(cfg.out, "config.json"))

    # CLIP, frozen; the demo uses its pre-trained tiny CLIP unless --clip was given.
    clip_name = cfg.clip
    if not clip_name:
        if master:
            demo_clip_path(cfg.weights, log=log)  # pre-trained once, then cached
        if world > 1:
            dist.barrier()
        clip_name = demo_clip_path(cfg.weights, log=log)
    clip_model, _ = clip.load(clip_name, device=device, download_root=cfg.weights)
    if cfg.grad_checkpointing:
        clip_model.set_grad_checkpointing(True)
    if cfg.compile:
        clip_model.visual.compile()
    resolution = clip_model.visual.input_resolution

    # Data.
    if cfg.demo:
        train_set, eval_set = demo_datasets(resolution, train_transform(resolution), eval_transform(resolution),
                                            cfg.demo_train_per_class, cfg.demo_test_per_class)
    else:
        options = {"skip_bad_images": True} if cfg.skip_bad_images else {}
        train_set = build_dataset(cfg.dataset, cfg.data_root, "train", train_transform(resolution), **options)
        eval_set = build_dataset(cfg.dataset, cfg.data_root, cfg.eval_split, eval_transform(resolution), **options)
    classnames = list(train_set.classnames)
    log(f"train: {len(train_set)} images\n{format_class_counts(train_set)}")
    log(f"{cfg.eval_split}: {len(eval_set)} images")

    # Model: frozen CLIP + prompts; hard prompts from the LLM descriptions.
    needs_descriptions = model_cfg.soft_hard_alignment and model_cfg.hard_prompt_template == 3
    descriptions = (resume or {}).get("descriptions") if resume else (
        load_descriptions(classnames, cfg.descriptions or None) if needs_descriptions else None)
    model = MPAFER(clip_model, classnames, descriptions, model_cfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    log(f"MPA-FER on CLIP {clip_name}: {model.num_trainable_parameters():,} trainable parameters "
        f"({model.num_trainable_parameters() / 1e6:.3f} M); CLIP frozen ({sum(p.numel() for p in clip_model.parameters()):,})")

    if model_cfg.prototype_alignment:
        proto_view = copy.copy(train_set)  # same images, eval transform
        proto_view.transform = eval_transform(resolution)
        key = {"clip_sha256": clip_model.checkpoint_sha256, "dataset": "synthetic-demo" if cfg.demo else cfg.dataset,
               "root": "" if cfg.demo else os.path.abspath(cfg.data_root), "split": "train", "images": len(train_set),
               "transform": repr(proto_view.transform), "per_class": cfg.prototypes_per_class, "classes": classnames}
        prototypes = None
        if master:
            loader = DataLoader(proto_view, batch_size=128, num_workers=cfg.workers, pin_memory=device.type == "cuda")
            prototypes = cached_prototypes(
                os.path.join(cfg.weights, "prototypes"), key,
                lambda: compute_prototypes(model, loader, per_class=cfg.prototypes_per_class or None), log=log)
        if world > 1:
            box = [prototypes]
            dist.broadcast_object_list(box, src=0)
            prototypes = box[0]
        model.set_prototypes(prototypes.to(device))

    # Optimisation: SGD, warm-up + cosine per step, GradScaler only for fp16.
    if cfg.balanced_sampler:
        sampler = ClassBalancedSampler(train_set.targets, cfg.samples_per_epoch or None, cfg.seed, rank, world)
    elif world > 1:
        sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=cfg.seed, drop_last=True)
    else:
        sampler = RandomSampler(train_set, generator=torch.Generator())
    loader_rng = torch.Generator()
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                              pin_memory=device.type == "cuda", drop_last=True, generator=loader_rng)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        sys.exit(f"the training set ({len(train_set)} images over {world} processes) is smaller than one batch "
                 f"of {cfg.batch_size}; lower --batch-size")
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(
        round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, best = 0, {"war": -1.0, "epoch": 0}
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if resume is not None:
        check_compatible(resume, cfg.resume, clip_model, classnames)
        model.load_trainable_state_dict(resume["state_dict"])
        state = resume["resume"]
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best = resume["epoch"], state["best"]
        log(f"resumed from {cfg.resume} after epoch {start_epoch} (best WAR {100 * best['war']:.2f}%)")
        if master and os.path.isfile(metrics_path):  # drop lines of epochs that will be redone
            with open(metrics_path) as f:
                kept = [line for line in f if json.loads(line)["epoch"] <= start_epoch]
            with open(metrics_path, "w") as f:
                f.writelines(kept)
    elif master and os.path.isfile(metrics_path):
        os.remove(metrics_path)

    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                      broadcast_buffers=False) if world > 1 else model
    eval_logits = lambda images: model(images).logits  # noqa: E731
    eval_kwargs = dict(batch_size=2 * cfg.batch_size, workers=cfg.workers)
    if cfg.demo and start_epoch == 0:
        model.eval()
        before = evaluate(eval_logits, eval_set, classnames, device, amp_dtype, **eval_kwargs)
        log(f"before training (random prompts): WAR {100 * before['war']:.2f}%  UAR {100 * before['uar']:.2f}%  "
            f"(chance {100 / len(classnames):.1f}%)")

    # -- the loop ---------------------------------------------------------------------------
    metrics, stopped = {}, False
    for epoch in range(start_epoch, cfg.epochs):
        # Everything random in an epoch derives from (seed, epoch): resuming repeats it exactly.
        seed_everything(cfg.seed * 1000 + epoch)
        loader_rng.manual_seed(cfg.seed * 1000 + epoch)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        elif isinstance(sampler, RandomSampler):
            sampler.generator.manual_seed(cfg.seed * 1000 + epoch)
        train_model.train()
        running = torch.zeros(5, device=device)  # total, cls, ta, pa, v
        start = time.time()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not master, leave=False)
        for step, (images, labels) in enumerate(bar, 1):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast(device, amp_dtype):
                output = train_model(images)
                loss, parts = model.loss(output, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            running += torch.stack([loss.detach().float(), *[parts[k].float() for k in ("cls", "ta", "pa", "v")]])
            if step % cfg.log_interval == 0 or step == steps_per_epoch:  # the only host syncs of the step
                synced = running.clone()
                if world > 1:
                    dist.all_reduce(synced)
                if not torch.isfinite(synced).all():
                    log(f"stopping: the loss became {synced[0].item()} in epoch {epoch + 1} (step {step}). "
                        f"Nothing was saved for this epoch; the last good checkpoint is {os.path.join(cfg.out, 'last.pt')}. "
                        f"Try a lower --lr, --amp bf16/off, or --grad-clip.")
                    if world > 1:
                        dist.destroy_process_group()
                    sys.exit(1)
                mean = (synced / (step * world)).tolist()
                bar.set_postfix(loss=f"{mean[0]:.3f}", cls=f"{mean[1]:.3f}", ta=f"{mean[2]:.3f}", pa=f"{mean[3]:.3f}",
                                v=f"{mean[4]:.3f}", img_s=f"{step * cfg.batch_size * world / (time.time() - start):.0f}")
        seconds = time.time() - start
        losses = dict(zip(("loss", "cls", "ta", "pa", "v"), mean))
        images_per_second = steps_per_epoch * cfg.batch_size * world / seconds

        evaluated = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
        if evaluated:
            model.eval()
            metrics = evaluate(eval_logits, eval_set, classnames, device, amp_dtype, **eval_kwargs)
        record = {"epoch": epoch + 1, **losses, "lr": scheduler.get_last_lr()[0],
                  "war": metrics.get("war") if evaluated else None, "uar": metrics.get("uar") if evaluated else None,
                  "images_per_second": images_per_second, "seconds": seconds}
        is_best = evaluated and metrics["war"] > best["war"]
        if is_best:
            best = {"war": metrics["war"], "uar": metrics["uar"], "epoch": epoch + 1}
        if master:
            summary = {k: metrics[k] for k in ("war", "uar", "per_class_recall", "confusion")} if evaluated else {}
            train_cfg = dataclasses.asdict(cfg)
            resume_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "scaler": scaler.state_dict(), "rng": rng_state(), "best": best}
            save_checkpoint(make_checkpoint(model, descriptions, epoch + 1, summary, train_cfg, resume_state),
                            os.path.join(cfg.out, "last.pt"))
            if is_best:
                save_checkpoint(make_checkpoint(model, descriptions, epoch + 1, summary, train_cfg),
                                os.path.join(cfg.out, "best.pt"))
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        scores = (f"{cfg.eval_split} WAR {100 * metrics['war']:.2f}%  UAR {100 * metrics['uar']:.2f}%  "
                  f"(best {100 * best['war']:.2f}% @ {best['epoch']})" if evaluated else "")
        log(f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {losses['loss']:.4f} (cls {losses['cls']:.3f} ta {losses['ta']:.3f} "
            f"pa {losses['pa']:.3f} v {losses['v']:.3f})  lr {record['lr']:.2e}  {scores}  "
            f"{images_per_second:.0f} img/s  {seconds:.0f}s")
        if cfg.stop_after and epoch + 1 == cfg.stop_after and epoch + 1 < cfg.epochs:
            log(f"stopping after epoch {epoch + 1} as asked (--stop-after); continue with --resume "
                f"{os.path.join(cfg.out, 'last.pt')}")
            stopped = True
            break

    if metrics and not stopped:
        log(f"\nfinal {cfg.eval_split} evaluation (epoch {cfg.epochs}):\n{format_report(metrics)}")
    if cfg.eval_split != "test" and best["epoch"] > 0 and not cfg.demo and not stopped:
        # Model selection used another split: report the best checkpoint on the test split too.
        model.load_trainable_state_dict(load_checkpoint(os.path.join(cfg.out, "best.pt"))["state_dict"])
        model.eval()
        test_set = build_dataset(cfg.dataset, cfg.data_root, "test", eval_transform(resolution))
        test = evaluate(eval_logits, test_set, classnames, device, amp_dtype, **eval_kwargs)
        log(f"\nbest.pt (epoch {best['epoch']}) on the test split:\n{format_report(test)}")
    log(f"\ncheckpoints: {os.path.join(cfg.out, 'best.pt')} (best {cfg.eval_split} WAR "
        f"{100 * best['war']:.2f}% at epoch {best['epoch']}), {os.path.join(cfg.out, 'last.pt')}\n"
        f"logs: {os.path.join(cfg.out, 'log.txt')}, {metrics_path}, config: {os.path.join(cfg.out, 'config.json')}")
    if cfg.demo:
        log(f"evaluate it again with: python eval.py --demo --checkpoint {os.path.join(cfg.out, 'best.pt')}\n"
            "(DEMO on synthetic data: see the README for training on RAF-DB, AffectNet or FERPlus.)")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
