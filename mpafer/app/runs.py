"""The run folder, resume and its checks, the checkpoints a run writes, and what it left.
What may stop a run is `mpafer.app.faults`."""
import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
from tqdm import tqdm

from .. import clip
from ..checkpoint import check_compatible, clip_activation, load_checkpoint, make_checkpoint
from ..files import WriteError, append_bytes, atomic_save, atomic_write, atomic_write_json
from ..precision import configure_cuda, resolve_amp
from ..progress import counted
from . import protocol
from .config import (
    RESUME_MAY_CHANGE,
    TRAIN_FIELDS,
    TrainConfig,
    check_config,
    flag,
    new_run_values,
    parse_flags,
)
from .demo import DEMO_CLIP_FILE, demo_clip_path
from .engine import Optimization, setup_distributed
from .faults import other_checkpoints

# What a run writes into its folder; the first three are the results a rerun must not lose.
CHECKPOINTS = ("last.pt", "best.pt", "expclip_head.pth")
RUN_FILES = (*CHECKPOINTS, "expclip_head.pth.json", "config.json", "log.txt", "metrics.jsonl")
# Everything a run writes, for finding what a killed write left: `files.atomic_write` writes
# <name>.<8 random characters>.tmp beside <name> and renames it.
WRITTEN = (*RUN_FILES, "baseline.json", "test.json", "curves.png", "shots.json", "heldout.json")
TEMPORARY = re.compile(r"^(?:%s)\.[A-Za-z0-9_]{8}\.tmp$" % "|".join(map(re.escape, WRITTEN)))


# -- the run folder ------------------------------------------------------------------------------

def new_run_folder(base: str, name: str = "", root: str = "runs") -> str:
    """root/base/name, or root/base/<yyyymmdd-hhmmss> (with -2, -3, ... if that is taken)."""
    if name:
        return os.path.join(root, base, name)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, n = os.path.join(root, base, stamp), 2
    while os.path.exists(folder):
        folder, n = os.path.join(root, base, f"{stamp}-{n}"), n + 1
    return folder


def existing(folder: str, names: Iterable[str]) -> List[str]:
    """The paths of those `names` that exist in `folder`."""
    return [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]


def folder_conflict(folder: str) -> Optional[str]:
    """Why a new run may not use `folder` (it holds another run's checkpoints), or None."""
    found = existing(folder, CHECKPOINTS)
    if not found:
        return None
    names = ", ".join(os.path.basename(p) for p in found)
    last = os.path.join(folder, "last.pt")
    resume = f"continue it with --resume {last}, " if os.path.isfile(last) else ""
    return (f"{folder} already holds a run ({names}): {resume}replace it with --overwrite, or "
            "start a new one elsewhere with --name NAME or --out DIR")


def clear_run_files(folder: str):
    """Remove an earlier run's own files from `folder`, so a new run reports only its own."""
    for path in existing(folder, RUN_FILES):
        remove_run_file(path)


def remove_temporaries(folder: str):
    """Remove the temporaries of writes a kill interrupted before their rename."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if TEMPORARY.match(name):
                remove_run_file(os.path.join(folder, name))


def remove_run_file(path: str):
    try:
        os.remove(path)
    except OSError as error:
        raise WriteError(path, error, "remove") from error


# -- the settings of a run -------------------------------------------------------------------------

def resume_refusals(given: Dict, recorded: Dict, may_change: Iterable[str] = ()) -> List[str]:
    """The flags in `given`, not in `may_change`, that differ from or are missing in `recorded`."""
    may_change = set(may_change)
    return [f"{flag(k)} {v!r} (the run has {recorded[k]!r})" if k in recorded
            else f"{flag(k)} {v!r}" for k, v in given.items()
            if k not in may_change and (k not in recorded or recorded[k] != v)]


def run_config(argv=None, description: str = None):
    """-> (TrainConfig, MPAFERConfig, model flags given), all checked before any load."""
    parser, train, model = parse_flags(argv, description)
    if train.get("resume"):
        values, model_values = resume_values(parser, train, model)
    else:
        values, model_values = new_run_values(parser, train, model)
    cfg, model_cfg = check_config(parser, values, model_values, train)
    if not cfg.resume:  # a new run's folder; one holding another run needs --overwrite
        if "out" in train and cfg.name:
            parser.error("--out and --name both say where the run goes; give one of them")
        if "out" not in train:
            cfg.out = new_run_folder("demo" if cfg.demo else cfg.dataset, cfg.name)
        conflict = folder_conflict(cfg.out)
        if conflict and not cfg.overwrite:
            parser.error(conflict)
    return cfg, model_cfg, model


def resume_values(parser, train: Dict, model: Dict) -> Tuple[Dict, Dict]:
    """A resumed run's recorded settings, changed only by RESUME_MAY_CHANGE flags."""
    path = train["resume"]
    try:
        checkpoint = load_checkpoint(path)
    except FileNotFoundError as e:
        parser.error(f"--resume: {e}")
    except (ValueError, RuntimeError, OSError) as e:  # damaged: say what else there is
        parser.error(f"--resume: {e}{other_checkpoints(path)}")
    if "resume" not in checkpoint:
        parser.error(f"--resume: {path} has no training state (best.pt is for evaluation; "
                     "resume from last.pt)")
    recorded = {k: v for k, v in checkpoint["train_config"].items() if k in TRAIN_FIELDS}
    folder = os.path.dirname(path) or "."
    if train.get("overwrite"):
        parser.error("--overwrite starts a new run and --resume continues one; give one of them")
    if "out" in train and os.path.abspath(train.pop("out")) != os.path.abspath(folder):
        parser.error(f"--out: a resumed run stays in its folder, {folder}")
    if train.get("clip_activation") == checkpoint["clip"].get("activation", "quick_gelu"):
        train.pop("clip_activation")  # the activation the run has: nothing changes
    may_change = RESUME_MAY_CHANGE - ({"data_root"} if recorded.get("demo") else set())
    refused = (resume_refusals(train, recorded, may_change)
               + resume_refusals(model, checkpoint["config"]))
    if refused:
        parser.error(f"--resume continues the run as recorded in {path}; these flags would "
                     f"change it: {'; '.join(refused)}. Start a new run to change them")
    done = checkpoint["epoch"] + (1 if checkpoint["resume"].get("step") else 0)
    epochs = train.get("epochs", recorded.get("epochs", TrainConfig.epochs))
    if epochs < done:
        parser.error(f"--epochs {epochs}: the run has already trained {done} epoch(s); --epochs "
                     "can only extend it")
    values = {**recorded, **train, "out": folder, "overwrite": False}
    return values, checkpoint["config"]


# -- the run ---------------------------------------------------------------------------------------

class Logger:
    """Prints on rank 0; log.txt gets the lines once `open`ed, so a failed check writes none."""

    def __init__(self, active: bool):
        self.path, self.active, self.pending = None, active, []

    def open(self, path: str):
        self.path = path
        append_bytes(self.path, "".join(line + "\n" for line in self.pending).encode("utf-8"))
        self.pending = []

    def __call__(self, message: str = ""):
        if not self.active:
            return
        tqdm.write(message)
        if self.path is None:
            self.pending.append(message)
            return
        append_bytes(self.path, (message + "\n").encode("utf-8"))  # no half line if it fails


@dataclass
class Run:
    """Where and how this process trains (`data`: its data's record; None for the demo)."""
    cfg: Any  # the TrainConfig
    rank: int
    world: int
    device: torch.device
    amp: Optional[torch.dtype]
    log: Logger
    resume: Optional[Dict] = None
    history: List[Dict] = dataclasses.field(default_factory=list)
    data: Optional[Dict] = None

    @property
    def master(self) -> bool:
        return self.rank == 0

    def path(self, name: str) -> str:
        return os.path.join(self.cfg.out, name)

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def max_over_ranks(self, value: int) -> int:
        if self.world == 1:
            return value
        synced = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(synced, op=dist.ReduceOp.MAX)
        return int(synced.item())

    def from_master(self, value):
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def write_json(self, name: str, payload):
        if self.master:
            atomic_write_json(payload, self.path(name))


def start_run(cfg, may_change: Iterable[str] = ()) -> Run:
    """Processes, device, precision and the checkpoint resumed from; nothing is written yet."""
    rank, world, device = setup_distributed(cfg.device)
    if device.type == "cuda":
        configure_cuda()
    run = Run(cfg, rank, world, device, resolve_amp(cfg.amp, device), Logger(rank == 0))
    cfg.out = run.from_master(cfg.out)  # every process writes to (and names) rank 0's folder
    if cfg.resume:
        run.resume = load_checkpoint(cfg.resume)
        state = run.resume["resume"]
        recorded, now = run.resume["train_config"], dataclasses.asdict(cfg)
        changed = {k: [recorded.get(k), now[k]] for k in sorted(may_change)
                   if k in now and recorded.get(k) != now[k] and k != "resume"}
        run.history = [*state.get("history", []), {
            "from": cfg.resume, "epoch": run.resume["epoch"], "step": state.get("step", 0),
            "changed": changed}]
    return run


def load_clip(run: Run):
    """The run's frozen CLIP; a resumed run keeps its activation and may not change CLIP."""
    cfg = run.cfg
    if run.master and not cfg.clip:
        demo_clip_path(cfg.cache_dir, log=run.log)
    run.barrier()
    activation = clip_activation(cfg.clip_activation, run.resume, demo_clip=not cfg.clip)
    clip_model, _ = clip.load(cfg.clip or demo_clip_path(cfg.cache_dir), device=run.device,
                              download_root=cfg.cache_dir, activation=activation)
    if run.resume is not None:
        check_compatible(run.resume, cfg.resume, clip_model)
    return clip_model


def load_checkpoint_clip(checkpoint: Optional[Dict], source: str, name: Optional[str] = None,
                         activation: Optional[str] = None, cache_dir: str = "weights",
                         device=None, allow_other_clip: bool = False, demo: bool = False,
                         recorded: Optional[Dict] = None):
    """-> (the CLIP for a checkpoint or an Exp-CLIP head (sidecar `recorded`), its name): --clip,
    else the recorded one, else ViT-B/16; another than the recorded one needs `allow_other_clip`."""
    recorded = recorded or (checkpoint or {}).get("clip") or {}
    chosen = name or recorded.get("name") or ""
    if chosen and not os.path.isfile(chosen) and os.path.basename(chosen) == DEMO_CLIP_FILE:
        chosen = ""
    if not chosen and (demo or checkpoint):
        chosen = demo_clip_path(cache_dir)
    chosen = chosen or "ViT-B/16"
    demo_clip = os.path.basename(chosen) == DEMO_CLIP_FILE
    activation = activation or recorded.get("activation") or ("quick_gelu" if demo_clip else None)
    clip_model, _ = clip.load(chosen, device=device, download_root=cache_dir,
                              activation=activation)
    if checkpoint:
        check_compatible(checkpoint, source, clip_model, allow_other_clip=allow_other_clip)
    return clip_model, chosen


def run_record(run: Run, model_cfg) -> Dict:
    """config.json: the settings, precision, processes and resumes."""
    return {"train": dataclasses.asdict(run.cfg), "model": model_cfg.to_dict(),
            "precision": str(run.amp or torch.float32).replace("torch.", ""),
            "processes": run.world, "resumed": run.history}


def already_finished(run: Run) -> bool:
    """A resumed run that has trained all its epochs: say so, and what it left."""
    if (run.resume is None or run.resume["resume"].get("step")
            or run.resume["epoch"] < run.cfg.epochs):
        return False
    run.log(f"{run.cfg.resume}: this run has finished its {counted(run.cfg.epochs, 'epoch')}; "
            f"nothing to do (--epochs N, N > {run.cfg.epochs}, trains it longer)")
    run.log(files_summary(run, run.resume["resume"]["best"]))
    return True


def open_folder(run: Run, model_cfg):
    """The run's first write: clear an earlier attempt, write config.json, open log.txt."""
    if not run.master:
        return
    if run.resume is None:
        clear_run_files(run.cfg.out)
    remove_temporaries(run.cfg.out)
    atomic_write_json(run_record(run, model_cfg), run.path("config.json"))
    run.log.open(run.path("log.txt"))


# -- checkpoints and metrics -----------------------------------------------------------------------

def restore(run: Run, model,
            optimization: Optimization) -> Tuple[int, Dict, int, Optional[torch.Tensor]]:
    """Load the resumed state -> (epochs done, best, steps done in the next epoch, their loss
    sums); metrics.jsonl loses the lines of epochs it redoes."""
    if run.resume is None:
        return 0, {"war": -1.0, "epoch": 0}, 0, None  # (the best before any evaluation)
    model.load_trainable_state_dict(run.resume["state_dict"])
    state = run.resume["resume"]
    optimization.load_state_dict(state)
    epoch, best, step = run.resume["epoch"], state["best"], state.get("step", 0)
    if step and state.get("processes", 1) != run.world:
        raise ValueError(f"{run.cfg.resume} stopped in the middle of an epoch with "
                         f"{state.get('processes', 1)} process(es); resume it with as many "
                         f"(this run has {run.world})")
    where = f"step {step} of epoch {epoch + 1}" if step else f"epoch {epoch}"
    run.log(f"resumed from {run.cfg.resume} after {where} (best WAR {100 * best['war']:.2f}%)")
    metrics_path = run.path("metrics.jsonl")
    if run.master and os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            kept = "".join(line for line in f if json.loads(line)["epoch"] <= epoch)
        atomic_write(metrics_path, lambda f: f.write(kept.encode("utf-8")))
    return epoch, best, step, state.get("sums")


def save_checkpoints(run: Run, model, descriptions, optimization: Optimization, epochs_done: int,
                     metrics: Dict, best: Dict, step: int = 0, sums=None):
    """last.pt and, when this epoch is the best, best.pt (`step` > 0: stopped after that step of
    epoch `epochs_done + 1`). Epochs re-seed from (seed, epoch): last.pt needs no RNG state."""
    if not run.master:
        return
    train_cfg = dataclasses.asdict(run.cfg)
    metrics = {k: metrics[k] for k in ("war", "uar", "per_class_recall", "confusion")
               if k in metrics}
    is_best = not step and best["epoch"] == epochs_done
    resume = {**optimization.state_dict(), "best": best, "step": step, "sums": sums,
              "processes": run.world, "history": run.history, "data": run.data}
    atomic_save(make_checkpoint(model, descriptions, epochs_done, metrics, train_cfg, resume),
                run.path("last.pt"))
    if is_best:
        atomic_save(make_checkpoint(model, descriptions, epochs_done, metrics, train_cfg),
                    run.path("best.pt"))


def record_epoch(run: Run, epoch: int, losses: Dict[str, float], seconds: float,
                 images_per_second: float, lr: float, metrics: Dict, eval_seconds: float,
                 best: Dict, grad_norms: Optional[Dict[str, float]] = None,
                 diagnostics: Optional[Dict[str, float]] = None) -> str:
    """Append the epoch's line to metrics.jsonl -> its log line. Written before last.pt: a kill
    in between leaves a line the resume drops, never a saved epoch without its line."""
    record = {"epoch": epoch + 1, **losses, "lr": lr,
              **{k: metrics.get(k) for k in ("war", "uar", "per_class_recall")},
              "images_per_second": images_per_second, "seconds": seconds,
              "eval_seconds": eval_seconds, **(diagnostics or {})}
    if grad_norms is not None:
        record["grad_norms"] = grad_norms
    if "base_to_novel" in metrics:  # the test split's base, novel, all and HM (not choosing)
        record["base_to_novel"] = metrics["base_to_novel"]
    if run.master:
        append_bytes(run.path("metrics.jsonl"), (json.dumps(record) + "\n").encode("utf-8"),
                     sync=True)
    name = protocol.selection_split_name(run.cfg)
    scores = (f"{name} WAR {100 * metrics['war']:.2f}%  UAR {100 * metrics['uar']:.2f}%  "
              f"(best {100 * best['war']:.2f}% @ {best['epoch']})" if metrics else "")
    if "base_to_novel" in metrics:
        b2n = metrics["base_to_novel"]
        scores += (f"  test: base {100 * b2n['base']['war']:.1f} novel "
                   f"{100 * b2n['novel']['war']:.1f} HM {100 * b2n['hm']:.1f}")
    parts = " ".join(f"{k} {v:.3f}" for k, v in losses.items() if k != "loss")
    return (f"epoch {epoch + 1:>3}/{run.cfg.epochs}  loss {losses['loss']:.4f} ({parts})  "
            f"lr {lr:.2e}  {scores}  {images_per_second:.0f} img/s  {seconds:.0f}s"
            + (f" + eval {eval_seconds:.1f}s" if metrics else ""))


# -- what the run left ---------------------------------------------------------------------------

def files_summary(run: Run, best: Dict) -> str:
    """What the run left and how to evaluate it."""
    cfg, lines = run.cfg, []
    if os.path.isfile(run.path("best.pt")):
        selection = protocol.selection_split_name(cfg)
        lines.append(f"best checkpoint: {run.path('best.pt')} (best {selection} "
                     f"WAR {100 * best['war']:.2f}% at epoch {best['epoch']})")
    if os.path.isfile(run.path("last.pt")):
        lines.append(f"resumable checkpoint: {run.path('last.pt')}")
    logs = existing(cfg.out, ("log.txt", "metrics.jsonl", "config.json"))
    if logs:
        lines.append(f"logs and settings: {', '.join(logs)}")
    if os.path.isfile(run.path("best.pt")):
        # A base-to-novel checkpoint knows the base classes only; its data has the novel ones
        # too, which --class-set open scores through the learned context (seen = base).
        open_set = " --class-set open" if cfg.base_classes else ""
        lines.append(f"evaluate it with: python eval.py --checkpoint {run.path('best.pt')}"
                     f"{open_set}")
    if cfg.demo:
        lines.append("(DEMO on synthetic data: see the README for training on RAF-DB, "
                     "AffectNet or FERPlus.)")
    return "\n".join(lines)
