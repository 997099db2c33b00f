"""`python -m mpafer.bench epoch`: training epochs from image files against their steps alone.

Passes on the current device and shape, taking turns over the rounds (medians over rounds):
  step    `engine.train_epoch` on a batch already on the device      step_images_per_second
  epoch   train.py's loop: files, DataLoader workers (uint8 crops, started afresh as in every
          epoch), pinned memory, `TrainBatchAugment`, `engine.train_epoch`  epoch_images_per_second
  loader  the same DataLoader alone, once every worker is busy     loader_images_per_second
  eval    `engine.predict` from files, workers started afresh      eval_images_per_second
then the prototype pass from files. epoch_ratio = epoch / step images per second (1.0: loading
costs the steps nothing). outside_step_share, the share of a full run outside training steps,
is modelled from these rates: E epochs of S = train images // batch steps cost
    steps       E * S * step time
    loader      E * (first-batch wait + S * max(0, epoch time per step after it - step time))
    evaluation  evaluations * eval images / eval_images_per_second
    prototypes  train images / prototype_images_per_second (once; cached afterwards)
and the share is (loader + evaluation + prototypes) / (all four), checkpoint writes left out.
The run is RAF-DB's recipe (120 epochs, its split sizes) unless --data-root gives a dataset;
the default files are synthetic faces, 100x100 JPEGs in RAF-DB's layout (cartoons compress
better than photographs, so they may decode a little faster).
"""
import math
import os
import statistics
import tempfile
import time
from typing import Dict

import torch
from torch.utils.data import DataLoader, Subset

from ...data import DATASET_NAMES, TrainBatchAugment, build_dataset
from ...data.rafdb import RAFDB_CLASSES, RAFDB_EXPECTED_COUNTS, RAFDB_LABEL_FILE
from ...data.transforms import eval_transform, train_transform
from ...prototypes import compute_prototypes, prototype_subset
from ..config import TrainConfig
from ..engine import Stepping, make_optimizer, predict, train_epoch, trainable_parameters
from ..loader import TrainLoader
from ..synthetic import SyntheticFaces
from . import measure
from .speed import benchmark_model

RAFDB_RUN = dict(epochs=120, train=sum(RAFDB_EXPECTED_COUNTS["train"]),
                 test=sum(RAFDB_EXPECTED_COUNTS["test"]))


def add_arguments(parser):
    group = parser.add_argument_group("epoch benchmark")
    group.add_argument("--data-root", default="", help="a real dataset (default: synthetic "
                       "100x100 JPEGs in RAF-DB's layout, written to a temporary folder)")
    group.add_argument("--dataset", default="rafdb", choices=DATASET_NAMES, help="of --data-root")
    group.add_argument("--workers", type=int, default=TrainConfig().workers,
                       help="DataLoader workers (train.py's default)")
    group.add_argument("--epoch-steps", type=int, help="steps an epoch (default 50; on CPU 4)")
    group.add_argument("--loader-batches", type=int,
                       help="batches of the loader-alone pass (default: max(epoch steps, 20))")
    group.add_argument("--eval-images", type=int, help="evaluated (default: 10 eval batches)")
    group.add_argument("--run-epochs", type=int, default=RAFDB_RUN["epochs"],
                       help="epochs of the full run modelled by outside_step_share")
    group.add_argument("--eval-every", type=int, default=1, help="of the modelled run")


def write_rafdb_like(root: str, num_train: int, num_test: int, seed: int = 0) -> str:
    """Synthetic faces as 100x100 JPEGs in RAF-DB's layout (its label file, names and label
    numbering), readable by `mpafer.data.RAFDB`. Returns root."""
    os.makedirs(os.path.join(root, "Image", "aligned"), exist_ok=True)
    lines = []
    for split, count in (("train", num_train), ("test", num_test)):
        faces = SyntheticFaces(split, math.ceil(count / len(RAFDB_CLASSES)), 100, seed)
        for index in range(count):
            image, label = faces[index]
            stem = f"{split}_{index + 1:05d}"
            image.save(os.path.join(root, "Image", "aligned", f"{stem}_aligned.jpg"), quality=95)
            lines.append(f"{stem}.jpg {RAFDB_CLASSES.index(faces.classnames[label]) + 1}\n")
    os.makedirs(os.path.dirname(os.path.join(root, RAFDB_LABEL_FILE)), exist_ok=True)
    with open(os.path.join(root, RAFDB_LABEL_FILE), "w", encoding="utf-8") as f:
        f.writelines(lines)
    return root


class Arrivals:
    """The first `steps` batches of `loader`, noting when each arrived (perf_counter seconds)
    and how long the loop waited for it."""

    def __init__(self, loader, steps: int):
        self.loader, self.steps, self.arrivals, self.waits = loader, steps, [], []

    def __len__(self):
        return self.steps

    def __iter__(self):
        iterator = iter(self.loader)
        for _ in range(self.steps):
            before = time.perf_counter()
            batch = next(iterator)
            self.arrivals.append(time.perf_counter())
            self.waits.append(self.arrivals[-1] - before)
            yield batch


def steady_rate(arrivals, batch: int, workers: int) -> float:
    """Images per second once every worker is busy: from the arrival of batch `workers` (the
    first batches come out of the workers' head start) to the last batch."""
    k = min(max(workers, 1), len(arrivals) - 1)
    if k < 1:
        return batch / arrivals[0]
    return (len(arrivals) - k) * batch / (arrivals[-1] - arrivals[k - 1])


def measure_rounds(args, device, model, train_set, eval_set) -> Dict[str, list]:
    """The step, epoch, loader-alone and evaluation passes, taking turns over the rounds, with
    train.py's recipe: its loader, optimiser, schedule, clipping and epoch loop."""
    batch, steps, amp, recipe = args.train_batch, args.epoch_steps, args.amp_dtype, TrainConfig()
    loader = TrainLoader(train_set, batch, seed=0, workers=args.workers,
                         pin_memory=device.type == "cuda")
    optimization = make_optimizer(
        trainable_parameters(model), recipe.lr, recipe.momentum, recipe.weight_decay,
        round(recipe.warmup_epochs * len(loader)), recipe.epochs * len(loader), device, amp)
    augment = TrainBatchAugment(device, seed=0)
    res = model.clip.visual.input_resolution
    pixels = torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8).to(device)
    in_memory = [(pixels, (torch.arange(batch) % 7).to(device))] * steps

    def epoch_pass(batches):
        """-> (seconds until the first batch, workers starting included; seconds in all;
        seconds spent waiting for the later batches)."""
        model.train()
        measure.synchronize(device)
        start, timed_batches = time.perf_counter(), Arrivals(batches, steps)
        train_epoch(model, timed_batches, optimization, augment,
                    Stepping(amp, recipe.grad_clip, log_interval=steps, progress=False), 0)
        measure.synchronize(device)
        return (timed_batches.arrivals[0] - start, time.perf_counter() - start,
                sum(timed_batches.waits[1:]))

    def loader_pass():
        """-> the seconds at which each batch arrived, counted from starting the workers."""
        start = time.perf_counter()
        timed_batches = Arrivals(loader.start_epoch(0), args.loader_batches)
        for _ in timed_batches:
            pass
        return [t - start for t in timed_batches.arrivals]

    def evaluate():
        return predict(model.eval(), eval_set, device, amp, batch_size=args.eval_batch,
                       workers=args.workers, progress=False)

    for _ in range(args.warmup):  # compilation, autotuning, allocator, page cache
        epoch_pass(in_memory)
        evaluate()
    return measure.take_turns({
        "step": lambda: epoch_pass(in_memory)[1],
        "epoch": lambda: epoch_pass(loader.start_epoch(0)),
        "loader": loader_pass,
        "eval": lambda: measure.timed(evaluate, device)}, args.repeats)


def run_epoch_benchmark(args, device: torch.device) -> Dict[str, object]:
    """The epoch benchmark (see the module doc) on MPA-FER as `python -m mpafer.bench` builds it."""
    model = benchmark_model(args, device)
    steps = args.epoch_steps = args.epoch_steps or (50 if device.type == "cuda" else 4)
    args.loader_batches = args.loader_batches or max(steps, 20)
    batch, median, res = args.train_batch, statistics.median, model.clip.visual.input_resolution
    train_images = max(steps, args.loader_batches) * batch
    with tempfile.TemporaryDirectory(prefix="mpafer-epoch-") as tmp:
        root = args.data_root or write_rafdb_like(os.path.join(tmp, "rafdb"), train_images,
                                                  args.eval_images or 10 * args.eval_batch)
        train_set = build_dataset(args.dataset, root, "train", train_transform(res, uint8=True))
        eval_set = build_dataset(args.dataset, root, "test", eval_transform(res, uint8=True))
        proto_set = build_dataset(args.dataset, root, "train", eval_transform(res, uint8=True))
        run_train, run_eval = ((len(train_set), len(eval_set)) if args.data_root
                               else (RAFDB_RUN["train"], RAFDB_RUN["test"]))
        eval_set = Subset(eval_set, range(min(len(eval_set), args.eval_images or len(eval_set))))
        if len(train_set) < train_images:
            raise ValueError(f"--data-root {root}: {len(train_set)} training images, fewer than "
                             f"the {train_images} the benchmark reads; lower --epoch-steps, "
                             "--loader-batches or --train-batch")
        times = measure_rounds(args, device, model, train_set, eval_set)
        # Prototypes as train.py computes them, on a class-balanced subset of about as many
        # images as the measured evaluation.
        per_class = -(-len(eval_set) // len(train_set.classnames))
        proto_images = len(prototype_subset(proto_set.targets, per_class))
        proto_loader = DataLoader(proto_set, batch_size=128, num_workers=args.workers,
                                  pin_memory=device.type == "cuda")
        proto_seconds = measure.timed(lambda: compute_prototypes(
            model, proto_loader, len(train_set.classnames), per_class, progress=False,
            amp_dtype=args.amp_dtype), device)
    firsts, totals, waits = zip(*times["epoch"])
    step = median(times["step"]) / steps
    loader_rate = median(steady_rate(a, batch, args.workers) for a in times["loader"])
    out = {"step_images_per_second": batch / step,
           "epoch_images_per_second": steps * batch / median(totals),
           "epoch_ratio": measure.paired_ratio(times["step"], totals),  # same images: rates' ratio
           "epoch_first_batch_seconds": median(firsts),
           "epoch_loader_wait_seconds_per_step": median(waits) / max(1, steps - 1),
           "loader_images_per_second": loader_rate,
           "loader_images_per_second_per_worker": loader_rate / max(1, args.workers),
           "eval_images_per_second": len(eval_set) / median(times["eval"]),
           "prototype_images_per_second": proto_images / proto_seconds}
    # The full run, modelled from these rates (see the module doc).
    per_epoch, epochs = run_train // batch, args.run_epochs
    evaluations = sum(1 for e in range(1, epochs + 1) if e % args.eval_every == 0 or e == epochs)
    after_first = median(t - f for f, t in zip(firsts, totals)) / steps  # per step
    run = {"steps": epochs * per_epoch * step,
           "loader": epochs * (median(firsts) + per_epoch * max(0.0, after_first - step)),
           "evaluation": evaluations * run_eval / out["eval_images_per_second"],
           "prototypes": run_train / out["prototype_images_per_second"]}
    total = sum(run.values())
    run.update(total=total, outside_step_share=(total - run["steps"]) / total, epochs=epochs,
               evaluations=evaluations, train_images=run_train, eval_images=run_eval,
               steps_per_epoch=per_epoch)
    data = args.data_root or "synthetic 100x100 JPEGs, RAF-DB layout"
    out.update(outside_step_share=run["outside_step_share"], full_run_model=run,
               epoch_settings={"data": data, "dataset": args.dataset, "workers": args.workers,
                               "batch": batch, "epoch_steps": steps, "eval_images": len(eval_set),
                               "loader_batches": args.loader_batches,
                               "prototype_images": proto_images},
               times={"epoch": times})
    print_epoch(out, args)
    return out


def print_epoch(out: Dict[str, object], args):
    run = out["full_run_model"]
    print(f"epoch: {out['epoch_settings']['data']}, batch {args.train_batch}, {args.workers} "
          f"workers, {args.epoch_steps} steps per measured epoch, {args.repeats} rounds")
    for label, rate, note in [
            ("step only, inputs on the device", out["step_images_per_second"], ""),
            ("epoch from files (train.py's loop)", out["epoch_images_per_second"],
             f"epoch_ratio {out['epoch_ratio']:.3f}; first batch after "
             f"{out['epoch_first_batch_seconds']:.2f}s, then waited "
             f"{1e3 * out['epoch_loader_wait_seconds_per_step']:.1f}ms a step"),
            ("DataLoader alone", out["loader_images_per_second"],
             f"{out['loader_images_per_second_per_worker']:.0f} per worker"),
            ("evaluation from files", out["eval_images_per_second"], ""),
            ("prototype pass from files", out["prototype_images_per_second"], "")]:
        print(f"  {label:<38}{rate:>9.1f} img/s   {note}".rstrip())
    print(f"  full run modelled ({run['epochs']} epochs x {run['steps_per_epoch']} steps, "
          f"{run['evaluations']} evaluations of {run['eval_images']} images): steps "
          f"{run['steps']:.0f}s, loader {run['loader']:.0f}s, evaluation {run['evaluation']:.0f}s, "
          f"prototypes {run['prototypes']:.0f}s -> outside_step_share "
          f"{run['outside_step_share']:.3f}", flush=True)
