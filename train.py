"""Train MPA-FER prompts on a frozen CLIP.

    python train.py --demo                                   # synthetic faces, tiny CLIP, CPU
    python train.py --dataset rafdb --data-root data/RAF-DB  # the reported RAF-DB recipe
    python train.py --dataset ferplus --data-root data/FERPlus --clip ViT-L/14 --amp bf16
    python train.py --resume runs/rafdb/<run>/last.pt        # continue exactly where it stopped
    torchrun --nproc_per_node=4 train.py --dataset affectnet7 --data-root data/AffectNet

Precedence: defaults < dataset preset < --demo < flags you give. Each run gets its own folder,
runs/<dataset>/<yyyymmdd-hhmmss> (or --name NAME, --out DIR); a folder holding another run is
refused unless --resume or --overwrite. Ctrl-C or SIGTERM stops at the end of the step, saves a
resumable last.pt and says how to resume (exit status 130 or 143). A dataset that moved resumes
with --resume RUN/last.pt --data-root NEW. (Exp-CLIP: `python -m mpafer.expclip train`.)
"""
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from mpafer.app.ablation import run_ablation, run_seeds
from mpafer.app.cli import run_cli
from mpafer.app.config import RESUME_MAY_CHANGE, format_settings
from mpafer.app.engine import (
    Stepping,
    build_mpafer,
    make_optimizer,
    train_epoch,
    trainable_parameters,
)
from mpafer.app.faults import (
    EXIT_STATUS,
    NonFiniteLoss,
    StopRequest,
    check_data,
    check_room,
    interrupted,
    resume_command,
    stop_on_non_finite,
    write_failed,
)
from mpafer.app.loader import TrainLoader
from mpafer.app.protocol import (
    evaluate_selection,
    fit_batch_size,
    read_splits,
    record_baselines,
    report_best,
    run_prototypes,
)
from mpafer.app.report import write_curves
from mpafer.app.runs import (
    already_finished,
    files_summary,
    load_clip,
    open_folder,
    record_epoch,
    restore,
    run_config,
    run_record,
    save_checkpoints,
    start_run,
)
from mpafer.checkpoint import check_compatible
from mpafer.data import TrainBatchAugment
from mpafer.files import WriteError
from mpafer.metrics import format_report
from mpafer.prompts import load_descriptions

DEMO_BANNER = ("=" * 78 + "\nDEMO: MPA-FER on synthetic cartoon faces with a tiny CLIP. These "
               "numbers say the\npipeline works end to end; they say nothing about real facial "
               "expression data.\n" + "=" * 78)


def main(argv=None):
    cfg, model_cfg, _ = run_config(argv, __doc__)
    if cfg.ablation:
        return run_ablation(cfg, sys.argv[1:] if argv is None else list(argv), main)
    if cfg.seeds:  # the configuration once per seed, then the report over them
        return run_seeds(cfg, sys.argv[1:] if argv is None else list(argv), main)
    run = start_run(cfg, RESUME_MAY_CHANGE)
    run.log((DEMO_BANNER + "\n" if cfg.demo else "") + f"settings (all in "
            f"{run.path('config.json')}):\n{format_settings(run_record(run, model_cfg))}")
    if already_finished(run):
        return

    # Data and CLIP, checked before anything is written (a resumed run's data is the run's own).
    splits = read_splits(cfg)
    check_data(run, cfg.dataset, splits.read)
    if run.resume is not None:
        check_compatible(run.resume, cfg.resume, classnames=splits.classnames)
    cfg.batch_size, note = fit_batch_size(cfg.batch_size, len(splits.train), run.world,
                                          cfg.balanced_sampler, cfg.samples_per_epoch)
    if note:
        run.log(note)
    clip_model = load_clip(run)  # a resumed run's own CLIP, or refused
    resolution = clip_model.visual.input_resolution
    splits.set_transforms(resolution)
    run.log(splits.describe())
    open_folder(run, model_cfg)
    splits.write_records(run)  # shots.json, heldout.json: which images the draws chose

    # The model: frozen CLIP, prompts, hard prompts from the descriptions, prototypes.
    descriptions = (run.resume["descriptions"] if run.resume is not None
                    else load_descriptions(splits.classnames, cfg.descriptions or None,
                                           splits.description_aliases)
                    if model_cfg.soft_hard_alignment and model_cfg.hard_prompt_template == 3
                    else None)
    model = build_mpafer(clip_model, splits.classnames, descriptions, model_cfg,
                         cfg.grad_checkpointing, cfg.compile, seed=cfg.seed).to(run.device)
    check_room(run, model, descriptions)  # a full disk fails now, not after an epoch
    trainable = model.num_trainable_parameters()
    run.log(f"MPA-FER on CLIP {clip_model.checkpoint_name}: {trainable:,} trainable parameters "
            f"({trainable / 1e6:.3f} M); CLIP frozen "
            f"({sum(p.numel() for p in clip_model.parameters()):,})")
    if model_cfg.prototype_alignment:  # computed once, on rank 0, or read from the cache
        model.set_prototypes(run_prototypes(run, model, splits.train, resolution))

    # Batches, optimiser and schedule, and where a resumed run stands.
    loader = TrainLoader(splits.train, cfg.batch_size, cfg.seed, cfg.workers, run.rank,
                         run.world, cfg.balanced_sampler, cfg.samples_per_epoch,
                         pin_memory=run.device.type == "cuda")
    optimization = make_optimizer(
        trainable_parameters(model), cfg.lr, cfg.momentum, cfg.weight_decay,
        round(cfg.warmup_epochs * len(loader)), cfg.epochs * len(loader), run.device, run.amp)
    start_epoch, best, first_step, sums = restore(run, model, optimization)
    forward = model if run.world == 1 else DDP(
        model, device_ids=[run.device.index] if run.device.type == "cuda" else None,
        broadcast_buffers=False)
    if run.resume is None:  # the reference points, on the set the run reports (baseline.json)
        record_baselines(run, model, splits, descriptions)

    try:
        best, metrics, stopped = train(run, model, forward, loader, optimization, splits,
                                       descriptions, start_epoch, best, first_step, sums)
    except NonFiniteLoss as error:
        stop_on_non_finite(run, error)
    except WriteError as error:  # one line (`run_cli`), with what is kept and how to go on
        raise write_failed(run, error)
    if metrics and not stopped:
        run.log(f"\nfinal {splits.selection_name} evaluation (epoch {cfg.epochs}):\n"
                f"{format_report(metrics)}")

    if best["epoch"] > 0 and not stopped:
        # best.pt on the test set, once, when another set chose it (in base-to-novel, always),
        # and the run's result beside zero-shot CLIP's.
        report_best(run, model, splits, best)
    run.log("\n" + files_summary(run, best))
    if run.master and os.path.isfile(run.path("metrics.jsonl")):
        run.log(f"curves: {write_curves(cfg.out)}")
    if torch.distributed.is_initialized():  # (torchrun, one process or more)
        torch.distributed.destroy_process_group()
    if stopped in EXIT_STATUS:
        sys.exit(EXIT_STATUS[stopped])  # 130 or 143, as that signal's; last.pt is saved


def train(run, model, forward, loader, optimization, splits, descriptions, start_epoch, best,
          first_step, sums):
    """The epoch loop -> (best, last evaluation, why it ended early: None, "stop-after", "Ctrl-C"
    or "SIGTERM"). A stop saves at the end of the step, or once the epoch is saved."""
    cfg, metrics = run.cfg, {}
    augment = TrainBatchAugment(run.device, cfg.seed, run.rank)  # erasing drawn per (epoch, step)
    stepping = Stepping(run.amp, cfg.grad_clip, list(model.parameter_groups().values())
                        if cfg.grad_clip_mode == "per-group" else None, cfg.log_interval,
                        run.world, grad_norms=True, progress=run.master)
    with StopRequest() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            forward.train()
            result = train_epoch(
                model, loader.start_epoch(epoch, first_step), optimization, augment, stepping,
                epoch, forward=forward, stop=stop, first_step=first_step, sums=sums,
                desc=f"epoch {epoch + 1}/{cfg.epochs}")
            first_step, sums = 0, None
            if result.grad_norms is not None:
                run.log(f"gradient norms on the prompts at the first step of epoch {epoch + 1}: "
                        + "  ".join(f"{k} {v:.4g}" for k, v in result.grad_norms.items()))
            if result.losses is None:  # stopped in the middle of the epoch: save where
                stop.agree(run)  # (asked on another process: say which signal)
                save_checkpoints(run, model, descriptions, optimization, epoch, {}, best,
                                 result.steps_done, result.sums)
                run.log(f"stopped by {stop.name} after step {result.steps_done} of epoch "
                        f"{epoch + 1}; saved {run.path('last.pt')}")
                return best, metrics, interrupted(run, stop)

            evaluated, eval_seconds = {}, 0.0
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                started = time.time()
                evaluated = metrics = evaluate_selection(
                    model.eval(), splits, run.device, run.amp, batch_size=2 * cfg.batch_size,
                    workers=cfg.workers)
                eval_seconds = time.time() - started
                if evaluated["war"] > best["war"]:
                    best = {"war": evaluated["war"], "uar": evaluated["uar"], "epoch": epoch + 1}
            line = record_epoch(run, epoch, result.losses, result.seconds,
                                len(loader) * cfg.batch_size * run.world / result.seconds,
                                optimization.scheduler.get_last_lr()[0], evaluated, eval_seconds,
                                best, result.grad_norms, model.prompt_diagnostics())
            save_checkpoints(run, model, descriptions, optimization, epoch + 1, evaluated, best)
            run.log(line)

            # Asked during the epoch's last step, its evaluation or saving: every process agrees.
            if stop.agree(run) and epoch + 1 < cfg.epochs:
                return best, metrics, interrupted(run, stop)
            if cfg.stop_after and epoch + 1 == cfg.stop_after and epoch + 1 < cfg.epochs:
                run.log(f"stopping after epoch {epoch + 1} as asked (--stop-after); continue "
                        f"with: {resume_command(run)}")
                return best, metrics, "stop-after"
    return best, metrics, None


if __name__ == "__main__":
    run_cli(main)
