"""`python -m mpafer.bench epoch`: a training epoch from image files, against its steps alone.

    python -m mpafer.bench epoch                                 # synthetic RAF-DB-size JPEGs
    python -m mpafer.bench epoch --data-root data/RAF-DB --workers 8 --json epoch.json
    python -m mpafer.bench epoch --shape tiny --epoch-steps 3    # seconds (the tests run this)

One run, on the current device and CLIP shape (random weights), in rounds that take turns so a
burst of load from other jobs hits every measurement alike (figures are medians over rounds):

  step      `engine.train_step` on a batch already on the device   step_images_per_second
  epoch     train.py's loop: image files -> DataLoader workers (uint8 crops) -> pinned
            memory -> non-blocking copy -> `TrainBatchAugment` (normalise, erase) ->
            `engine.train_step`; workers start afresh, as in every epoch
                                                                   epoch_images_per_second
  loader    the same DataLoader alone, nothing else: images/s once every worker is busy
            (loader_images_per_second, and _per_worker; with --workers 0 the main process
            counts as one worker) and the wait for the first batch (workers starting)
  eval      `engine.predict` from files (uint8, normalised on the device), workers started
            afresh as in every evaluation                          eval_images_per_second
            and the same forward passes on a batch already on the device
  prototypes  the one-off prototype pass from files, on a class-balanced subset about the size
            of the measured evaluation                             prototype_images_per_second
  CPU path  images per CPU-second on one core, per preprocessing path
            (`files.per_sample_rates`)

epoch_ratio = epoch_images_per_second / step_images_per_second: 1.0 means the input pipeline
costs nothing; 0.8 means an epoch runs at 80% of the speed of its steps.

outside_step_share: the share of a full run spent outside training steps, modelled from the
rates measured here. A run of E epochs of S = train images // batch steps costs
    steps       E * S * step time
    loader      E * (first-batch wait + S * max(0, epoch time per step after it - step time))
    evaluation  (evaluations) * eval images / eval_images_per_second
    prototypes  train images / prototype_images_per_second (once; cached after the first run)
and outside_step_share = (loader + evaluation + prototypes) / (all four). The run is RAF-DB's
recipe by default (120 epochs, 12,271 train and 3,068 test images, evaluation every epoch);
with --data-root, the dataset's own sizes. Checkpoint writes (kilobytes per epoch) are left out.
The default data are synthetic 100x100 JPEGs in RAF-DB's layout; cartoon faces compress better
than photographs, so they may decode a little faster than real faces.

What train.py's input pipeline does, following these measurements (on 2 CPU cores, ViT-B/16
shape: the step waited milliseconds for data out of a ~60-s CPU step; evaluation was the main
cost outside the steps, about 9% of a run evaluated every epoch, 2% with --eval-every 5):
- the workers decode, crop and flip, and hand over uint8 pixels: a quarter of the bytes between
  processes and to the device, 1.25-1.55x the per-image CPU rate of the float path; CLIP's
  normalisation and random erasing run batched on the device (`data.device_augment`, the same
  bits as ToTensor + Normalize, the same distribution as RandomErasing(p=0.25)), seeded by
  (seed, epoch, step, rank) so that a resumed run repeats an uninterrupted one;
- pinned memory, non-blocking copies, fixed batch shapes (the last partial batch is dropped);
- workers are not persistent: each epoch starts them afresh from (seed, epoch), since
  persistent workers would carry their random state into the next epoch (a resumed run would
  crop differently); their start is the first-batch wait measured here;
- no decode-once cache: decoding a 100-px JPEG was 18-20% of a training crop's cost (the
  bicubic resize to 224 px about 70%), so a cache could save at most that share.
None of this is measured on a GPU yet, where the step is fast and leaves the CPU cores to the
workers: `python -m mpafer.bench gpu` measures it there.
"""
import os
import statistics
import tempfile
import time
from typing import Dict

import torch
from torch.utils.data import DataLoader, Subset

from ...data import (
    RAFDB_EXPECTED_COUNTS,
    TrainBatchAugment,
    build_dataset,
    eval_transform,
    normalize_on_device,
    train_transform,
)
from ...precision import autocast
from ...prototypes import compute_prototypes, prototype_subset
from ..config import TrainConfig
from ..engine import make_optimizer, predict, train_epoch, train_step, trainable_parameters
from ..loader import TrainLoader
from . import measure
from .files import per_sample_rates, rafdb_like_jpegs, write_grey_pngs, write_rafdb_like

RAFDB_RUN = dict(epochs=120, train=sum(RAFDB_EXPECTED_COUNTS["train"]),
                 test=sum(RAFDB_EXPECTED_COUNTS["test"]))


def add_arguments(parser):
    group = parser.add_argument_group("epoch benchmark")
    group.add_argument("--data-root", default="", help="a real dataset (default: synthetic "
                       "100x100 JPEGs in RAF-DB's layout, written to a temporary folder)")
    group.add_argument("--dataset", default="rafdb", help="with --data-root: rafdb | affectnet7 | "
                       "affectnet8 | ferplus | folder")
    group.add_argument("--eval-split", default="test")
    group.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                       help="DataLoader workers (train.py's default)")
    group.add_argument("--epoch-steps", type=int, default=None,
                       help="training steps per measured epoch (default: 50 on CUDA, 4 on CPU)")
    group.add_argument("--loader-batches", type=int, default=None,
                       help="batches of the loader-alone pass (default: max(epoch steps, 20))")
    group.add_argument("--eval-images", type=int, default=None,
                       help="images of the measured evaluation (default: 10 eval batches)")
    group.add_argument("--prefetch-factor", type=int, default=2)
    group.add_argument("--run-epochs", type=int, default=RAFDB_RUN["epochs"],
                       help="epochs of the full run modelled by outside_step_share")
    group.add_argument("--eval-every", type=int, default=1, help="of the modelled run")
    group.add_argument("--path-seconds", type=float, default=1.0,
                       help="seconds per path of the per-sample CPU figures")


def timed(device, fn):
    measure.synchronize(device)
    start = time.perf_counter()
    out = fn()
    measure.synchronize(device)
    return time.perf_counter() - start, out


def loader_pass(loader, batches: int):
    """-> the seconds at which each batch arrived, counted from starting the workers."""
    start = time.perf_counter()
    iterator, arrivals = iter(loader), []
    for _ in range(batches):
        next(iterator)
        arrivals.append(time.perf_counter() - start)
    return arrivals


def steady_rate(arrivals, batch: int, workers: int) -> float:
    """Images per second once every worker is busy: from the arrival of batch `workers` (the
    first batches come out of the workers' head start) to the last batch."""
    k = min(max(workers, 1), len(arrivals) - 1)
    if k < 1:
        return batch / arrivals[0]
    return (len(arrivals) - k) * batch / (arrivals[-1] - arrivals[k - 1])


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


def epoch_pass(model, batches, steps, augment, optimization, amp, device, grad_clip):
    """train.py's epoch (`engine.train_epoch`) over the first `steps` of `batches` -> (seconds
    until the first batch, workers starting included; seconds in all; seconds spent waiting
    for the later batches)."""
    model.train()
    measure.synchronize(device)
    start = time.perf_counter()
    timed_batches = Arrivals(batches, steps)
    train_epoch(model, timed_batches, optimization, augment, epoch=0, amp=amp,
                grad_clip=grad_clip, log_interval=steps, progress=False)
    measure.synchronize(device)
    return (timed_batches.arrivals[0] - start, time.perf_counter() - start,
            sum(timed_batches.waits[1:]))


def eval_forward(model, images, batches: int, amp):
    """The evaluation's forward passes on a batch already on the device."""
    with torch.no_grad(), autocast(images.device, amp):
        for _ in range(batches):
            model(images).logits.argmax(dim=-1)


def datasets(args, root, resolution):
    """-> (train set, uint8 crops; eval set, uint8; train set with the eval transform)."""
    train = build_dataset(args.dataset, root, "train", train_transform(resolution, uint8=True))
    evaluation = build_dataset(args.dataset, root, args.eval_split,
                               eval_transform(resolution, uint8=True))
    protos = build_dataset(args.dataset, root, "train", eval_transform(resolution, uint8=True))
    return train, evaluation, protos


def measure_rounds(args, device, model, train_set, eval_set) -> Dict[str, list]:
    """Step-only, epoch, loader-alone and evaluation passes, taking turns over the rounds.
    Training uses train.py's recipe: its loader, optimiser, schedule, clipping and epoch loop;
    the step-only pass runs the same loop on batches already on the device."""
    batch, steps, amp, recipe = args.train_batch, args.epoch_steps, args.amp_dtype, TrainConfig()
    loader = TrainLoader(train_set, batch, seed=0, workers=args.workers,
                         pin_memory=device.type == "cuda", prefetch_factor=args.prefetch_factor)
    optimization = make_optimizer(trainable_parameters(model), recipe.lr, recipe.momentum,
                                  recipe.weight_decay, round(recipe.warmup_epochs * len(loader)),
                                  recipe.epochs * len(loader), device, amp)
    augment = TrainBatchAugment(device, seed=0)
    res = model.clip.visual.input_resolution
    pixels = torch.randint(0, 256, (max(batch, args.eval_batch), 3, res, res), dtype=torch.uint8)
    pixels = pixels.to(device)
    in_memory = [(pixels[:batch], (torch.arange(batch) % 7).to(device))] * steps
    eval_images = normalize_on_device(pixels[:args.eval_batch])
    eval_batches = -(-len(eval_set) // args.eval_batch)

    def evaluate():
        return predict(model.eval(), eval_set, device, amp, batch_size=args.eval_batch,
                       workers=args.workers, progress=False)

    def train_pass(batches):
        return epoch_pass(model, batches, steps, augment, optimization, amp, device,
                          recipe.grad_clip)

    passes = {
        "step": lambda: train_pass(in_memory)[1],
        "epoch": lambda: train_pass(loader.start_epoch(0)),
        "loader": lambda: loader_pass(loader.start_epoch(0), args.loader_batches),
        "eval": lambda: timed(device, evaluate)[0],
        "eval_forward": lambda: timed(device, lambda: eval_forward(
            model.eval(), eval_images, eval_batches, amp))[0],
    }
    for _ in range(args.warmup):  # compilation, autotuning, allocator, page cache
        train_pass(in_memory)
        evaluate()
    times = {name: [] for name in passes}
    for r in range(args.repeats):
        for name in (list(passes) if r % 2 == 0 else list(passes)[::-1]):
            times[name].append(passes[name]())
    if device.type == "cuda":
        times["host_syncs"] = measure.count_host_syncs(lambda: train_step(
            model.train(), augment(pixels[:batch], 0, 1), in_memory[0][1],
            optimization.optimizer, optimization.scaler, amp, recipe.grad_clip), device)
    return times


def run_model(args, seconds: Dict[str, float], run_train: int, run_eval: int) -> Dict[str, float]:
    """A full run's seconds by part, modelled from the measured rates (see the module doc)."""
    per_epoch = run_train // args.train_batch
    epochs = args.run_epochs
    evaluations = sum(1 for e in range(1, epochs + 1) if e % args.eval_every == 0 or e == epochs)
    excess = max(0.0, seconds["epoch_after_first_per_step"] - seconds["step"])
    parts = {"steps": epochs * per_epoch * seconds["step"],
             "loader": epochs * (seconds["epoch_first_batch"] + per_epoch * excess),
             "evaluation": evaluations * run_eval / seconds["eval_rate"],
             "prototypes": run_train / seconds["prototype_rate"]}
    outside = parts["loader"] + parts["evaluation"] + parts["prototypes"]
    return {**parts, "total": outside + parts["steps"], "outside_step_share":
            outside / (outside + parts["steps"]), "epochs": epochs, "evaluations": evaluations,
            "train_images": run_train, "eval_images": run_eval, "steps_per_epoch": per_epoch}


def summarize_rounds(args, times, eval_images: int, proto_images: int, proto_seconds: float):
    """Medians over rounds -> the benchmark's figures (images per second, ratios)."""
    batch, steps, median = args.train_batch, args.epoch_steps, statistics.median
    firsts, totals, waits = zip(*times["epoch"])
    step = median(times["step"]) / steps
    eval_forward_images = -(-eval_images // args.eval_batch) * args.eval_batch
    out = {"step_images_per_second": batch / step,
           "epoch_images_per_second": steps * batch / median(totals),
           "epoch_ratio": measure.paired_ratio(times["step"], totals),  # same images: rates' ratio
           "epoch_first_batch_seconds": median(firsts),
           "epoch_loader_wait_seconds_per_step": median(waits) / max(1, steps - 1),
           "loader_images_per_second": median(steady_rate(a, batch, args.workers)
                                               for a in times["loader"]),
           "loader_first_batch_seconds": median(a[0] for a in times["loader"]),
           "eval_images_per_second": eval_images / median(times["eval"]),
           "eval_forward_images_per_second": eval_forward_images / median(times["eval_forward"]),
           "prototype_images_per_second": proto_images / proto_seconds}
    out["loader_images_per_second_per_worker"] = (out["loader_images_per_second"]
                                                  / max(1, args.workers))
    seconds = {"step": step, "epoch_first_batch": out["epoch_first_batch_seconds"],
               "epoch_after_first_per_step": median(t - f for f, t in zip(firsts, totals)) / steps,
               "eval_rate": out["eval_images_per_second"],
               "prototype_rate": out["prototype_images_per_second"]}
    return out, seconds


def run_epoch_benchmark(args, device: torch.device, model) -> Dict[str, object]:
    """The epoch benchmark (see the module doc) on `model`, an MPA-FER with prototypes set."""
    args.epoch_steps = args.epoch_steps or (50 if device.type == "cuda" else 4)
    args.loader_batches = args.loader_batches or max(args.epoch_steps, 20)
    resolution = model.clip.visual.input_resolution
    train_images = max(args.epoch_steps, args.loader_batches) * args.train_batch
    with tempfile.TemporaryDirectory(prefix="mpafer-epoch-") as tmp:
        samples = write_rafdb_like(os.path.join(tmp, "samples"), 64, 0, seed=1)
        cpu_path = per_sample_rates(rafdb_like_jpegs(samples), write_grey_pngs(
            os.path.join(tmp, "png48"), 64), seconds=args.path_seconds)
        root = args.data_root or write_rafdb_like(os.path.join(tmp, "rafdb"), train_images,
                                                  args.eval_images or 10 * args.eval_batch)
        train_set, eval_set, proto_set = datasets(args, root, resolution)
        run_train, run_eval = ((len(train_set), len(eval_set)) if args.data_root
                               else (RAFDB_RUN["train"], RAFDB_RUN["test"]))
        eval_set = Subset(eval_set, range(min(len(eval_set), args.eval_images or len(eval_set))))
        if len(train_set) < train_images:
            raise ValueError(f"--data-root {root}: {len(train_set)} training images, fewer than "
                             f"the {train_images} the benchmark reads; lower --epoch-steps, "
                             "--loader-batches or --train-batch")
        times = measure_rounds(args, device, model, train_set, eval_set)
        # A class-balanced subset of about as many images as the measured evaluation.
        per_class = -(-len(eval_set) // len(train_set.classnames))
        proto_images = len(prototype_subset(proto_set.targets, per_class))
        proto_loader = DataLoader(proto_set, batch_size=128, num_workers=args.workers,
                                  pin_memory=device.type == "cuda")  # as train.py's prototypes
        proto_seconds, _ = timed(device, lambda: compute_prototypes(
            model, proto_loader, len(train_set.classnames), per_class, progress=False,
            amp_dtype=args.amp_dtype))
    out, seconds = summarize_rounds(args, times, len(eval_set), proto_images, proto_seconds)
    modelled = run_model(args, seconds, run_train, run_eval)
    out.update(outside_step_share=modelled["outside_step_share"], full_run_model=modelled,
               cpu_path_images_per_second_per_core=cpu_path,
               epoch_settings={"data": args.data_root or "synthetic 100x100 JPEGs, RAF-DB layout",
                               "dataset": args.dataset, "workers": args.workers,
                               "batch": args.train_batch, "eval_batch": args.eval_batch,
                               "epoch_steps": args.epoch_steps,
                               "loader_batches": args.loader_batches,
                               "eval_images": len(eval_set), "prototype_images": proto_images,
                               "prefetch_factor": args.prefetch_factor,
                               "pin_memory": device.type == "cuda", "rounds": args.repeats},
               times={"epoch": {k: v for k, v in times.items() if k != "host_syncs"}})
    if "host_syncs" in times:
        out["epoch_step_host_syncs"] = times["host_syncs"]
    print_epoch(out)
    return out


def print_epoch(out: Dict[str, object]):
    s, m = out["epoch_settings"], out["full_run_model"]
    print(f"epoch: {s['data']}, batch {s['batch']}, {s['workers']} workers, {s['epoch_steps']} "
          f"steps per measured epoch, {s['rounds']} rounds")
    rows = [("step only, inputs on the device", out["step_images_per_second"], ""),
            ("epoch from files (train.py's loop)", out["epoch_images_per_second"],
             f"epoch_ratio {out['epoch_ratio']:.3f}; first batch after "
             f"{out['epoch_first_batch_seconds']:.2f}s, then waited "
             f"{1e3 * out['epoch_loader_wait_seconds_per_step']:.1f}ms a step for data"),
            ("DataLoader alone", out["loader_images_per_second"],
             f"{out['loader_images_per_second_per_worker']:.0f} per worker; first batch after "
             f"{out['loader_first_batch_seconds']:.2f}s"),
            ("evaluation from files", out["eval_images_per_second"],
             f"forward passes alone {out['eval_forward_images_per_second']:.1f} img/s"),
            ("prototype pass from files", out["prototype_images_per_second"], "")]
    for label, rate, note in rows:
        print(f"  {label:<38}{rate:>9.1f} img/s   {note}")
    if "epoch_step_host_syncs" in out:
        print(f"  host-device synchronisations in a step: {out['epoch_step_host_syncs']}")
    print(f"  full run modelled from these rates ({m['epochs']} epochs x {m['steps_per_epoch']} "
          f"steps, {m['evaluations']} evaluations of {m['eval_images']} images): steps "
          f"{m['steps']:.0f}s, loader {m['loader']:.0f}s, evaluation {m['evaluation']:.0f}s, "
          f"prototypes {m['prototypes']:.0f}s -> outside_step_share "
          f"{out['outside_step_share']:.3f}")
    print("  per image on one core (per CPU-second), file -> tensor (224 px):")
    for name, rate in out["cpu_path_images_per_second_per_core"].items():
        print(f"    {name:<34}{rate:>8.0f} img/s")
