"""The evaluation protocol of a run: which images train, which choose best.pt, which test it.

- **train**: the training split, or K images per class of it (`--shots`, the CoOp protocol);
- **selection**: evaluated every `--eval-every` epochs to choose best.pt: the `--eval-split`,
  or a stratified part held out of the training split (`--val-fraction`; the held-out images
  never train);
- **test**: the test split. When the selection set is another set, best.pt is evaluated on it
  once, at the end (`test.json`); when the selection set is the test split itself (the RAF-DB
  recipe, as in the paper), there is nothing more to report.

`read_splits` reads and checks every set before CLIP is loaded (files, labels, classes, that
every image of the evaluation sets decodes); `Splits.set_transforms` gives them CLIP's
resolution once it is known.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .data import (
    build_dataset,
    eval_transform,
    format_class_counts,
    require_readable,
    train_transform,
)
from .data.subsets import Subset, few_shot_indices, stratified_split, subset_record
from .demo import demo_datasets
from .engine import evaluate
from .expclip.zeroshot import ZeroShotClassifier
from .prompts import hard_prompts_by_class, load_descriptions
from .runs import selection_split_name


@dataclass
class Splits:
    """The sets of one run (see the module doc). `records` are the files that list a drawn
    subset (shots.json, heldout.json): (file name, its content). `read`: the splits as read from
    the data root, before any subset was drawn, by split name ({} for the demo), which identify
    the data (`mpafer.runs.check_data`)."""
    train: object
    selection: object
    test: Optional[object]  # None: the selection set is the test split
    selection_name: str
    records: List[Tuple[str, Dict]] = field(default_factory=list)
    read: Dict[str, object] = field(default_factory=dict)

    @property
    def classnames(self) -> List[str]:
        return list(self.train.classnames)

    @property
    def reported_name(self) -> str:
        return "test" if self.test is not None else self.selection_name

    @property
    def reported(self):
        """The set whose numbers a run reports: the test set, or the selection set when it is
        the test split itself."""
        return self.test if self.test is not None else self.selection

    def set_transforms(self, resolution: int):
        """Training augmentation for the training set, CLIP's preprocessing for the others;
        both hand over uint8 pixels (normalised and erased on the device)."""
        self.train.transform = train_transform(resolution, uint8=True)
        for evaluated in (self.selection, self.test):
            if evaluated is not None:
                evaluated.transform = eval_transform(resolution, uint8=True)

    def describe(self) -> str:
        lines = [f"train: {len(self.train)} images\n{format_class_counts(self.train)}",
                 f"{self.selection_name}: {len(self.selection)} images (evaluated every epoch, "
                 "chooses the best checkpoint)"]
        if self.test is not None:
            lines.append(f"test: {len(self.test)} images (the best checkpoint, once at the end)")
        return "\n".join(lines)


def dataset_options(cfg) -> Dict:
    """The reader options the settings ask for (--skip-bad-images, --classnames)."""
    options = {"skip_bad_images": True} if cfg.skip_bad_images else {}
    if cfg.classnames:
        options["classnames"] = [c.strip() for c in cfg.classnames.split(",")]
    return options


def read_splits(cfg) -> Splits:
    """The run's sets, read and checked, without transforms (see the module doc): the demo's
    synthetic faces with --demo, else --dataset at --data-root."""
    if cfg.demo:  # drawn in memory: nothing to check
        train, test = demo_datasets(None, None, None, cfg.demo_train_per_class,
                                    cfg.demo_test_per_class)
        evaluated, read = {"test": test}, {}
        if cfg.val_fraction == 0 and cfg.eval_split != "test":
            raise ValueError(f"--eval-split {cfg.eval_split}: the demo has train and test faces "
                             "only (--val-fraction holds out a validation part)")
    else:
        options = dataset_options(cfg)
        train = build_dataset(cfg.dataset, cfg.data_root, "train", **options)
        names = {"test"} | ({cfg.eval_split} if cfg.val_fraction == 0 else set())
        evaluated = {name: build_dataset(cfg.dataset, cfg.data_root, name, **options)
                     for name in sorted(names)}
        if not cfg.skip_bad_images:  # (with it, unreadable images were dropped)
            for name, dataset in evaluated.items():
                require_readable(dataset, name, cfg.workers)
        read = {"train": train, **evaluated}
    train, held_out, records = carve_subsets(cfg, train)
    if held_out is not None:
        return Splits(train, held_out, evaluated["test"], selection_split_name(cfg), records,
                      read)
    selection = evaluated[cfg.eval_split]
    test = None if cfg.eval_split == "test" else evaluated["test"]
    return Splits(train, selection, test, cfg.eval_split, records, read)


def carve_subsets(cfg, train_set) -> Tuple[object, Optional[Subset], List[Tuple[str, Dict]]]:
    """--val-fraction: a stratified part of the training set becomes the selection set;
    --shots: training uses K images per class of the rest. Both seeded -> (training set, the
    held-out part or None, the records listing them)."""
    records, kept, held_out = [], None, None
    dataset = "synthetic-demo" if cfg.demo else cfg.dataset
    if cfg.val_fraction > 0:
        kept, held = stratified_split(train_set.targets, cfg.val_fraction, cfg.seed)
        held_out = Subset(train_set, held)
        records.append(("heldout.json", subset_record(
            held_out, protocol="held-out validation", fraction=cfg.val_fraction, seed=cfg.seed,
            dataset=dataset)))
    if cfg.shots > 0:
        train_set = Subset(train_set, few_shot_indices(train_set.targets, cfg.shots, cfg.seed,
                                                       pool=kept))
        records.append(("shots.json", subset_record(train_set, protocol="few-shot",
                                                    shots=cfg.shots, seed=cfg.seed,
                                                    dataset=dataset)))
    elif kept is not None:
        train_set = Subset(train_set, kept)
    return train_set, held_out, records


def fit_batch_size(batch_size: int, train_size: int, world: int = 1, balanced: bool = False,
                   samples_per_epoch: int = 0) -> Tuple[int, Optional[str]]:
    """-> (a batch size that gives every process at least one full batch per epoch, a note when
    it had to be lowered). Few-shot training sets (K images per class, e.g. 7 with one shot) are
    often smaller than the usual batch."""
    per_process = (-(-(samples_per_epoch or train_size) // world) if balanced
                   else train_size // world)
    if per_process < 1:
        raise ValueError(f"the training set ({train_size} images) is smaller than the {world} "
                         "processes that would share it")
    if batch_size <= per_process:
        return batch_size, None
    return per_process, (f"note: the training set gives each process {per_process} images, "
                         f"fewer than --batch-size {batch_size}; training with batches of "
                         f"{per_process}")


def baselines(model, dataset, descriptions=None, amp=None, **evaluate_options) -> Dict:
    """The reference points of a run, measured on `dataset` before any training: the model with
    its random prompts, and zero-shot CLIP with MPA-FER's hard prompts (template 3; a class's
    logit is the mean over its descriptions' prompts), the baseline prompt learning has to
    beat (None when the descriptions do not cover the classes).
    -> {"random_prompts": metrics, "zero_shot_hard_prompts": metrics or None}."""
    classnames, device = model.classnames, model.clip.logit_scale.device
    measured = {"random_prompts": evaluate(model.eval(), dataset, classnames, device, amp,
                                           **evaluate_options), "zero_shot_hard_prompts": None}
    try:
        descriptions = descriptions or load_descriptions(classnames)
    except ValueError:  # classes the shipped descriptions do not cover (--dataset folder)
        return measured
    zero_shot = ZeroShotClassifier(model.clip, classnames,
                                   hard_prompts_by_class(classnames, descriptions, 3)).eval()
    measured["zero_shot_hard_prompts"] = evaluate(zero_shot, dataset, classnames, device, amp,
                                                  desc="zero-shot", **evaluate_options)
    return measured
