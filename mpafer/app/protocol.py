"""The evaluation protocol: which images train (--shots), which choose best.pt (--eval-split,
--val-fraction) and which test it once at the end (the test split, unless it chose best.pt, as
in the paper's RAF-DB recipe); base-to-novel (--base-classes) scores base, novel and all."""
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from ..checkpoint import load_checkpoint
from ..data import (
    DATASETS,
    build_dataset,
    eval_transform,
    format_class_counts,
    require_readable,
    train_transform,
)
from ..data.subsets import Subset, class_subset, few_shot_indices, stratified_split, subset_record
from ..files import atomic_write_json
from ..labels import match_classes, same_class
from ..metrics import format_report, over_classes
from ..progress import counted
from ..prompts import hard_prompts_by_class, load_descriptions
from ..zeroshot import ZeroShotClassifier
from .demo import demo_datasets, description_aliases
from .engine import evaluate, evaluate_base_novel
from .fingerprint import image_identity
from .prototype_cache import prototype_key_fields, training_prototypes


@dataclass
class Splits:
    """The sets of one run. `records`: (file name, content) of the files listing a drawn subset;
    `read`: the splits as read, before any draw ({} for the demo), for `faults.check_data`."""
    train: object
    selection: object
    test: Optional[object]  # None: the selection set is the test split
    selection_name: str
    records: List[Tuple[str, Dict]] = field(default_factory=list)
    read: Dict[str, object] = field(default_factory=dict)
    base: Optional[List[str]] = None  # base-to-novel: the classes trained on (see read_splits)
    description_aliases: Dict[str, str] = field(default_factory=dict)  # class -> descriptions' name

    @property
    def classnames(self) -> List[str]:
        return list(self.train.classnames)

    @property
    def all_classnames(self) -> List[str]:
        return list(self.reported.classnames)

    @property
    def reported_name(self) -> str:
        return "test" if self.test is not None else self.selection_name

    @property
    def reported(self):
        return self.test if self.test is not None else self.selection

    def set_transforms(self, resolution: int):
        """Augmentation for training, CLIP's preprocessing for the rest (uint8)."""
        self.train.transform = train_transform(resolution, uint8=True)
        for evaluated in (self.selection, self.test):
            if evaluated is not None:
                evaluated.transform = eval_transform(resolution, uint8=True)

    def write_records(self, run):
        for name, record in self.records:
            run.write_json(name, record)
            run.log(f"{record['protocol']}: {counted(record['num_images'], 'image')}, listed in "
                    f"{run.path(name)}")

    def describe(self) -> str:
        lines = [f"read {os.path.join(d.root, getattr(d, 'split_folder', name))}:\n"
                 f"{d.format_reading()}" for name, d in self.read.items()
                 if hasattr(d, "format_reading")]
        lines.append(f"train: {counted(len(self.train), 'image')}\n"
                     f"{format_class_counts(self.train)}")
        if self.base:
            novel = [c for c in self.all_classnames if c not in self.base]
            lines.append(f"base-to-novel: training and choosing best.pt on the base classes "
                         f"{', '.join(self.base)}; the novel classes {', '.join(novel)} are seen "
                         "only in the test split")
        lines.append(f"{self.selection_name}: {counted(len(self.selection), 'image')} (evaluated "
                     "every epoch, chooses the best checkpoint)")
        if self.test is not None:
            lines.append(f"test: {counted(len(self.test), 'image')} (the best checkpoint, once "
                         "at the end)")
        return "\n".join(lines)


def selection_split_name(cfg) -> str:
    """The set that chooses best.pt: the eval split or "heldout" (+ " base")."""
    name = "heldout" if cfg.val_fraction > 0 else cfg.eval_split
    return f"{name} base" if cfg.base_classes else name


def dataset_options(cfg) -> Dict:
    options = {"skip_bad_images": True} if cfg.skip_bad_images else {}
    if cfg.classnames:
        options["classnames"] = [c.strip() for c in cfg.classnames.split(",")]
    return options


def read_splits(cfg) -> Splits:
    """The run's sets, read and checked before CLIP is loaded, without transforms."""
    aliases = {}
    if cfg.demo:  # drawn in memory: nothing to check
        train, test = demo_datasets(cfg.demo_train_per_class, cfg.demo_test_per_class,
                                    words=cfg.demo_class_words)
        evaluated, read = {"test": test}, {}
        aliases = description_aliases(cfg.demo_class_words)
        if cfg.val_fraction == 0 and cfg.eval_split != "test":
            raise ValueError(f"--eval-split {cfg.eval_split}: the demo has train and test faces "
                             "only (--val-fraction holds out a validation part)")
    else:
        options = dataset_options(cfg)
        if cfg.resume and not os.path.isdir(cfg.data_root):
            raise FileNotFoundError(
                f"dataset root not found: {cfg.data_root} (the data of the run to resume); if "
                f"the data moved, resume with --resume {cfg.resume} --data-root NEW (the run "
                "checks that NEW holds the same files and labels)")
        train = build_dataset(cfg.dataset, cfg.data_root, "train", **options)
        names = {"test"} | ({cfg.eval_split} if cfg.val_fraction == 0 else set())
        evaluated = {name: build_dataset(cfg.dataset, cfg.data_root, name, **options)
                     for name in sorted(names)}
        read = {"train": train, **evaluated}
    base = base_classes(cfg.base_classes, train.classnames)
    if base:
        train = class_subset(train, base)
    empty = [c for c, n in zip(train.classnames, train.class_counts()) if n == 0]
    if empty:  # a class that could never be learned, nor its prototype built
        read_train = read.get("train")
        if not hasattr(read_train, "class_folder"):
            raise ValueError(f"no training images for class(es) {', '.join(empty)}: every class "
                             "needs training images")
        split_dir = os.path.join(read_train.root, read_train.split_folder)
        where = "; ".join(f"{read_train.class_folder(c)} (class {c}) holds no image"
                          if read_train.class_folder(c) is not None
                          else f"{split_dir} has no folder for class {c}" for c in empty)
        raise ValueError(f"{where}: every class needs training images; put its images there, "
                         "or remove the class's folders from every split")
    train, held_out, records = carve_subsets(cfg, train)
    selection = held_out if held_out is not None else evaluated[cfg.eval_split]
    if held_out is None and base:
        selection = class_subset(selection, base)
    test = None if cfg.eval_split == "test" and held_out is None and not base else evaluated["test"]
    splits = Splits(train, selection, test, selection_split_name(cfg), records, read, base,
                    aliases)
    if read and not cfg.skip_bad_images:  # (with it, unreadable images were dropped)
        require_all_readable(splits, cfg.workers, cfg.cache_dir)
    return splits


def require_all_readable(splits: Splits, workers: int, cache_dir: Optional[str] = None):
    """Decode every image the run reads: a bad one fails now, not mid-epoch."""
    checked = []
    for name, dataset in (("train", splits.train), (splits.selection_name, splits.selection),
                          ("test", splits.test)):
        if dataset is not None and not any(dataset is done for done in checked):
            require_readable_once(dataset, name, workers, cache_dir)
            checked.append(dataset)


def require_readable_once(dataset, split: str, workers: int, cache_dir: Optional[str] = None):
    """`data.require_readable`, skipped where the same images, unchanged (names, labels, crops,
    file sizes and modification times), passed before: <cache_dir>/checked-images/ keeps a
    marker per set that passed. A marker that cannot be written costs the next run a check."""
    marker = None
    base = dataset.base if isinstance(dataset, Subset) else dataset
    if cache_dir and hasattr(base, "source_files"):
        identity = {"reader": type(base).__name__, "root": os.path.abspath(base.root),
                    **image_identity(dataset)}
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()
        marker = os.path.join(cache_dir, "checked-images", f"{key[:32]}.json")
        if os.path.isfile(marker):
            return
    require_readable(dataset, split, workers)
    if marker is not None:
        try:
            atomic_write_json({**identity, "split": split, "images": len(dataset)}, marker)
        except OSError:  # (a WriteError too) read-only or full: the check itself passed
            pass


def base_classes(flag: str, classnames) -> Optional[List[str]]:
    """--base-classes as the data spells them (None: off); one class must stay novel."""
    if not flag:
        return None
    base, unknown = match_classes([c.strip() for c in flag.split(",")], classnames)
    if unknown:
        raise ValueError(f"--base-classes: {', '.join(unknown)} not a class of the data (its "
                         f"classes: {', '.join(classnames)})")
    if len(set(base)) < len(base):
        raise ValueError(f"--base-classes names one class twice (as {', '.join(base)})")
    if len(set(base)) == len(classnames):
        raise ValueError("--base-classes names every class of the data: leave at least one "
                         "class out as novel")
    return base


def carve_subsets(cfg, train_set) -> Tuple[object, Optional[Subset], List[Tuple[str, Dict]]]:
    """--val-fraction, then --shots -> (training set, held-out part or None, records)."""
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
    """-> (a batch size that fills every process's batch, a note if lowered)."""
    per_process = (-(-(samples_per_epoch or train_size) // world) if balanced
                   else train_size // world)
    if per_process < 1:
        raise ValueError(f"the training set ({counted(train_size, 'image')}) is smaller than "
                         f"the {world} processes that would share it")
    if batch_size <= per_process:
        return batch_size, None
    return per_process, (f"note: the training set gives each process "
                         f"{counted(per_process, 'image')}, "
                         f"fewer than --batch-size {batch_size}; training with batches of "
                         f"{per_process}")


def evaluate_reported(classifier_for: Callable, splits: Splits, device, amp=None,
                      **evaluate_options) -> Dict:
    """The metrics of `classifier_for(classnames)` on `splits.reported`; in base-to-novel also
    "base", "novel" (each among its own classes) and their harmonic mean "hm"."""
    if not splits.base:
        return evaluate(classifier_for(splits.classnames), splits.reported, splits.classnames,
                        device, amp, **evaluate_options)
    result = evaluate_base_novel(classifier_for(splits.all_classnames), splits.reported,
                                 splits.base, device, amp, **evaluate_options)
    keep = ("war", "uar", "per_class_recall", "num_samples")
    return {**result["all"], **{part: {k: result[part][k] for k in keep}
                                for part in ("base", "novel", "all")}, "hm": result["hm"]}


def evaluate_selection(model, splits: Splits, device, amp=None, **evaluate_options) -> Dict:
    """An epoch's evaluation of the selection set; in base-to-novel the test split's base, novel
    and all-class numbers beside it, for the record only (novel never chooses a checkpoint)."""
    metrics = evaluate(model, splits.selection, splits.classnames, device, amp,
                       **evaluate_options)
    if splits.base:
        reported = evaluate_reported(model.with_classes, splits, device, amp, **evaluate_options)
        metrics["base_to_novel"] = {**{part: {k: reported[part][k] for k in ("war", "uar")}
                                       for part in ("base", "novel", "all")}, "hm": reported["hm"]}
    return metrics


def baselines(model, splits: Splits, descriptions=None, amp=None, **evaluate_options) -> Dict:
    """Before training, on the reported set: random prompts, and zero-shot CLIP with the hard
    prompts, the baseline to beat (None when the run's template needs missing descriptions)."""
    device = model.clip.logit_scale.device
    measured = {"random_prompts": evaluate_reported(model.eval().with_classes, splits, device,
                                                    amp, **evaluate_options),
                "zero_shot_hard_prompts": None, "hard_prompt_template": 3}
    names = splits.all_classnames if splits.base else splits.classnames
    try:
        descriptions = {**(descriptions or {}), **load_descriptions(
            [c for c in names if c not in (descriptions or {})],
            aliases=splits.description_aliases)}
    except ValueError:  # classes the shipped descriptions do not cover (--dataset folder)
        if model.config.hard_prompt_template == 3:
            return measured
        measured["hard_prompt_template"] = model.config.hard_prompt_template  # no descriptions
    template = measured["hard_prompt_template"]

    def zero_shot(classnames):
        return ZeroShotClassifier(model.clip, classnames,
                                  hard_prompts_by_class(classnames, descriptions, template)).eval()

    measured["zero_shot_hard_prompts"] = evaluate_reported(zero_shot, splits, device, amp,
                                                           desc="zero-shot", **evaluate_options)
    return measured


def run_prototypes(run, model, train_set, resolution: int):
    """L_v's class prototypes, computed (or read from the cache) on rank 0, given to every rank.
    The key holds the data root: file names and labels cannot tell the same images apart."""
    cfg, per_class = run.cfg, run.cfg.prototypes_per_class or None
    prototypes = None
    if run.master:
        key = prototype_key_fields(model, train_set, resolution,
                                   "synthetic-demo" if cfg.demo else cfg.dataset,
                                   "" if cfg.demo else os.path.abspath(cfg.data_root), per_class,
                                   cfg.seed, run.amp)
        prototypes = training_prototypes(model, train_set, resolution, cfg.cache_dir, key,
                                         per_class, cfg.seed, cfg.workers, run.amp, run.log)
    return run.from_master(prototypes).to(run.device)


def record_baselines(run, model, splits: Splits, descriptions=None) -> Dict:
    measured = baselines(model, splits, descriptions, run.amp,
                         batch_size=2 * run.cfg.batch_size, workers=run.cfg.workers)
    zero_shot = measured["zero_shot_hard_prompts"]
    template = measured["hard_prompt_template"]
    which = "the hard prompts" + (f" of template {template}" if template != 3 else "")
    run.log(f"before training, on {splits.reported_name}: random prompts WAR "
            f"{100 * measured['random_prompts']['war']:.2f}%; " + (
                f"zero-shot CLIP with {which} WAR {100 * zero_shot['war']:.2f}%  UAR "
                f"{100 * zero_shot['uar']:.2f}%" if zero_shot else
                "no zero-shot baseline (the descriptions do not cover these classes)")
            + f"  (chance {100 / len(splits.all_classnames):.1f}%)")
    run.write_json("baseline.json", {"split": splits.reported_name, **measured})
    return measured


def report_best(run, model, splits: Splits, best: Dict):
    """best.pt on the test set when another set chose it, then beside zero-shot CLIP."""
    trained = best["war"]
    if splits.test is not None:
        run.barrier()  # rank 0 wrote best.pt; the others read it only after that
        model.load_trainable_state_dict(load_checkpoint(run.path("best.pt"))["state_dict"])
        test = evaluate_reported(model.eval().with_classes, splits, run.device, run.amp,
                                 batch_size=2 * run.cfg.batch_size, workers=run.cfg.workers)
        run.log(f"\nbest.pt (epoch {best['epoch']}) on the test split:\n{format_report(test)}")
        run.write_json("test.json", {"epoch": best["epoch"], "chosen_on": splits.selection_name,
                                     **test})
        trained = test["war"]
    zero_shot, template = None, 3
    if os.path.isfile(run.path("baseline.json")):
        with open(run.path("baseline.json")) as f:
            baseline = json.load(f)
        zero_shot, template = baseline["zero_shot_hard_prompts"], baseline.get(
            "hard_prompt_template", 3)
    if splits.base and splits.test is not None:  # a small table of WAR
        rows = {"zero-shot CLIP, hard prompts": zero_shot} if zero_shot else {}
        rows["MPA-FER, trained on base"] = test
        width = max(len(label) for label in rows) + 2
        table = [" " * width + f"{'base':>8}{'novel':>8}{'all':>8}{'HM':>8}   (WAR %)"] + [
            f"{label:<{width}}" + "".join(f"{100 * v:>8.2f}" for v in (
                r["base"]["war"], r["novel"]["war"], r["all"]["war"], r["hm"]))
            for label, r in rows.items()]
        run.log(f"\nbase-to-novel on the test split ({len(splits.base)} base classes, best.pt "
                f"chosen on {splits.selection_name} images):\n" + "\n".join(table))
    if zero_shot:
        which = "the hard prompts" + (f" of template {template}" if template != 3 else "")
        run.log(f"\n{'DEMO: ' if run.cfg.demo else ''}zero-shot CLIP with {which} "
                f"{100 * zero_shot['war']:.2f}% -> trained MPA-FER {100 * trained:.2f}% (WAR on "
                f"{splits.reported_name}, {100 * (trained - zero_shot['war']):+.2f} points)")


# -- cross-dataset evaluation: a checkpoint on data whose classes differ from its own --------------

CLASS_SETS = ("shared", "open")


def class_set_data(dataset, trained: List[str], class_set: Optional[str], source: str):
    """`dataset` as far as the classes `source` was trained on allow (--class-set shared or
    open, see its help); a class the checkpoint spells otherwise takes the checkpoint's name."""
    data = [next((t for t in trained if same_class(c, t)), c) for c in dataset.classnames]
    if data != list(dataset.classnames):
        dataset.classnames = tuple(data)
    if set(data) == set(trained):
        if class_set:
            print(f"note: --class-set {class_set}: the data has the checkpoint's classes; "
                  "nothing to leave out or add")
        return dataset
    if not class_set:
        raise ValueError(f"{source} was trained on classes {trained}, but the requested data has "
                         f"classes {data}: --class-set shared evaluates the classes both have, "
                         "--class-set open scores the data's classes (the unseen ones through the "
                         "learned context)")
    if class_set == "open":
        return dataset
    shared = [c for c in data if c in trained]
    if not shared:
        raise ValueError(f"{source} and the data have no class in common")
    kept = class_subset(dataset, shared)
    left = [c for c in data if c not in trained]
    print(f"--class-set shared: the {counted(len(shared), 'class')} both have "
          f"({', '.join(shared)}); left out: {counted(len(dataset) - len(kept), 'image')} of "
          f"{', '.join(left) or 'no class'}")
    return kept


def seen_and_unseen(metrics: Dict, seen_classes: List[str]) -> Dict:
    """--class-set open: WAR and UAR of the classes the checkpoint was trained on and the rest."""
    seen = [c for c in metrics["classnames"] if c in seen_classes]
    unseen = [c for c in metrics["classnames"] if c not in seen_classes]
    return {"seen": over_classes(metrics, seen), "unseen": over_classes(metrics, unseen)}


def format_seen_and_unseen(metrics: Dict) -> str:
    lines = []
    for part in ("seen", "unseen"):
        m = metrics[part]
        recall = ", ".join(f"{c} {100 * metrics['per_class_recall'][c]:.1f}%"
                           for c in m["classes"] if c in metrics["per_class_recall"])
        scores = (f"WAR {100 * m['war']:.2f}%  UAR {100 * m['uar']:.2f}%" if m["war"] is not None
                  else "WAR n/a  UAR n/a")  # no image of these classes: nothing to score
        lines.append(f"{part} classes ({counted(m['num_samples'], 'image')}): {scores}  "
                     f"recall: {recall or 'n/a'}")
    return "\n".join(lines)


def evaluation_data(given: Dict, checkpoint: Optional[Dict]) -> Dict:
    """eval.py's data flags left None (in `given`): those of the run that trained `checkpoint`
    (a --val-fraction run is tested on test), else RAF-DB's test split."""
    trained = (checkpoint or {}).get("train_config", {})
    demo = given["demo"] or (given["dataset"] is None and bool(trained.get("demo")))
    same = not demo and given["dataset"] in (None, trained.get("dataset"))
    run = trained if same and trained.get("dataset") in DATASETS else {}
    split = "test" if run.get("val_fraction", 0) > 0 else run.get("eval_split", "test")
    return {"demo": demo,
            "demo_test_per_class": trained.get("demo_test_per_class", 60) if demo else 60,
            "demo_class_words": trained.get("demo_class_words", "labels"),
            "dataset": given["dataset"] or run.get("dataset", "rafdb"),
            "data_root": given["data_root"] or run.get("data_root", "data/RAF-DB"),
            "split": given["split"] or split,
            "classnames": given["classnames"] or run.get("classnames", "")}
