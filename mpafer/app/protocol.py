"""The evaluation protocol of a run: which images train, which choose best.pt, which test it.

- **train**: the training split, or K images per class of it (`--shots`, the CoOp protocol);
- **selection**: evaluated every `--eval-every` epochs to choose best.pt: the `--eval-split`,
  or a stratified part held out of the training split (`--val-fraction`; the held-out images
  never train);
- **test**: the test split. When the selection set is another set, best.pt is evaluated on it
  once, at the end (`test.json`); when the selection set is the test split itself (the RAF-DB
  recipe, as in the paper), there is nothing more to report.

Base-to-novel (`--base-classes`, CoCoOp's protocol) trains and selects on the base classes'
images only; the test split keeps every class and is scored on base, novel and all classes
(`evaluate_reported`), with zero-shot CLIP measured on the same sets before training
(`baselines`). `read_splits` reads and checks every set before CLIP is loaded (files, labels,
classes, that every image of the evaluation sets decodes); `Splits.set_transforms` gives them
CLIP's resolution once it is known; `report_best` evaluates best.pt on the test set at the end.
"""
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
from ..labels import match_classes, same_class
from ..metrics import format_report, over_classes
from ..progress import counted
from ..prompts import hard_prompts_by_class, load_descriptions
from ..zeroshot import ZeroShotClassifier
from .demo import demo_datasets, description_aliases
from .engine import evaluate, evaluate_base_novel
from .prototype_cache import prototype_key_fields, training_prototypes


@dataclass
class Splits:
    """The sets of one run (see the module doc). `records` are the files that list a drawn
    subset (shots.json, heldout.json): (file name, its content). `read`: the splits as read from
    the data root, before any subset was drawn, by split name ({} for the demo), which identify
    the data (`faults.check_data`)."""
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
        """The classes the model trains on (the base classes in base-to-novel)."""
        return list(self.train.classnames)

    @property
    def all_classnames(self) -> List[str]:
        """The classes of the reported set: the dataset's, novel ones included."""
        return list(self.reported.classnames)

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

    def write_records(self, run):
        """shots.json, heldout.json in the run folder: which images the seeded draws chose."""
        for name, record in self.records:
            run.write_json(name, record)
            run.log(f"{record['protocol']}: {counted(record['num_images'], 'image')}, listed in "
                    f"{run.path(name)}")

    def describe(self) -> str:
        lines = [f"read {os.path.join(d.root, name)}:\n{d.format_reading()}"
                 for name, d in self.read.items() if hasattr(d, "format_reading")]
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
    """The name of the set that chooses best.pt (see `mpafer.app.protocol`): the evaluation split,
    or "heldout", the part of the training split that --val-fraction holds out (heldout.json);
    in base-to-novel, its base-class images ("test base")."""
    name = "heldout" if cfg.val_fraction > 0 else cfg.eval_split
    return f"{name} base" if cfg.base_classes else name


def dataset_options(cfg) -> Dict:
    """The reader options the settings ask for (--skip-bad-images, --classnames)."""
    options = {"skip_bad_images": True} if cfg.skip_bad_images else {}
    if cfg.classnames:
        options["classnames"] = [c.strip() for c in cfg.classnames.split(",")]
    return options


def read_splits(cfg) -> Splits:
    """The run's sets, read and checked, without transforms (see the module doc): the demo's
    synthetic faces with --demo, else --dataset at --data-root.

    With --base-classes (the base-to-novel protocol of CoCoOp), the training and selection sets
    hold the base classes' images only, labelled among the base classes; the test split keeps
    every class, and best.pt is evaluated on it once, on base, novel and all classes."""
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
    require_training_images(train, read.get("train"))
    train, held_out, records = carve_subsets(cfg, train)
    if held_out is not None:
        selection = held_out
    else:
        selection = evaluated[cfg.eval_split]
        selection = class_subset(selection, base) if base else selection
    test = None if cfg.eval_split == "test" and held_out is None and not base else evaluated["test"]
    splits = Splits(train, selection, test, selection_split_name(cfg), records, read, base,
                    aliases)
    if read and not cfg.skip_bad_images:  # (with it, unreadable images were dropped)
        require_all_readable(splits, cfg.workers)
    return splits


def require_all_readable(splits: Splits, workers: int):
    """Decode every image the run will read, before anything expensive: the training images
    (which the prototype pass reads too), the selection set and the test set. An unreadable one
    stops the run in one line that names it and the fix (`require_readable`), not a worker's
    traceback in the middle of an epoch."""
    checked = []
    for name, dataset in (("train", splits.train), (splits.selection_name, splits.selection),
                          ("test", splits.test)):
        if dataset is not None and not any(dataset is done for done in checked):
            require_readable(dataset, name, workers)
            checked.append(dataset)


def require_training_images(train, read_train=None):
    """Every class the model trains on has training images: a class without any (an empty or
    missing class folder) could never be learned, nor its prototype built. Raises ValueError
    naming the folder (`read_train`: the split as read, for its folders) and the fix."""
    empty = [c for c, n in zip(train.classnames, train.class_counts()) if n == 0]
    if not empty:
        return
    if not hasattr(read_train, "class_folder"):
        raise ValueError(f"no training images for class(es) {', '.join(empty)}: every class "
                         "needs training images")
    split_dir = os.path.join(read_train.root, read_train.split)
    where = "; ".join(f"{read_train.class_folder(c)} (class {c}) holds no image"
                      if read_train.class_folder(c) is not None
                      else f"{split_dir} has no folder for class {c}" for c in empty)
    fix = "put its images there, or remove the class's folders from every split"
    raise ValueError(f"{where}: every class needs training images; {fix}")


def base_classes(flag: str, classnames) -> Optional[List[str]]:
    """The base classes --base-classes names (None: not base-to-novel), as the data spells them
    (a name matches in any case or by a usual synonym: happy is happiness); every one must be a
    class of the data, and at least one class must be left novel."""
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
    """The numbers a run reports, on `splits.reported`, of `classifier_for(classnames)` (a model
    or logits function for those classes): WAR, UAR, per-class recall, confusion. In base-to-
    novel the reported set holds every class: then also "base", "novel" (each classified among
    its own classes, see `engine.evaluate_base_novel`) and their harmonic mean "hm", with the
    top-level numbers those of all classes."""
    if not splits.base:
        return evaluate(classifier_for(splits.classnames), splits.reported, splits.classnames,
                        device, amp, **evaluate_options)
    result = evaluate_base_novel(classifier_for(splits.all_classnames), splits.reported,
                                 splits.base, device, amp, **evaluate_options)
    keep = ("war", "uar", "per_class_recall", "num_samples")
    return {**result["all"], **{part: {k: result[part][k] for k in keep}
                                for part in ("base", "novel", "all")}, "hm": result["hm"]}


def evaluate_selection(model, splits: Splits, device, amp=None, **evaluate_options) -> Dict:
    """An epoch's evaluation: the selection set, which chooses best.pt. In base-to-novel it holds
    the base classes only (novel accuracy never chooses a checkpoint); the test split's base,
    novel and all-class numbers are measured beside it, for the record ("base_to_novel")."""
    metrics = evaluate(model, splits.selection, splits.classnames, device, amp,
                       **evaluate_options)
    if splits.base:
        reported = evaluate_reported(model.with_classes, splits, device, amp, **evaluate_options)
        metrics["base_to_novel"] = summary_of(reported)
    return metrics


def summary_of(reported: Dict) -> Dict:
    """{base, novel, all: {war, uar}, hm} of an `evaluate_reported` result in base-to-novel."""
    return {**{part: {k: reported[part][k] for k in ("war", "uar")}
               for part in ("base", "novel", "all")}, "hm": reported["hm"]}


def format_base_to_novel(rows: Dict[str, Dict]) -> str:
    """{label: `evaluate_reported` result} as a small table of WAR: base, novel, all, HM."""
    width = max(len(label) for label in rows) + 2
    lines = [" " * width + f"{'base':>8}{'novel':>8}{'all':>8}{'HM':>8}   (WAR %)"]
    for label, r in rows.items():
        lines.append(f"{label:<{width}}" + "".join(
            f"{100 * v:>8.2f}" for v in (r["base"]["war"], r["novel"]["war"], r["all"]["war"],
                                         r["hm"])))
    return "\n".join(lines)


def baselines(model, splits: Splits, descriptions=None, amp=None, **evaluate_options) -> Dict:
    """The reference points of a run, measured on the set it reports before any training: the
    model with its random prompts, and zero-shot CLIP with MPA-FER's hard prompts (template 3;
    a class's logit is the mean over its descriptions' prompts), the baseline prompt learning
    has to beat. When the descriptions do not cover the classes, a run whose hard prompts need
    none (--hard-prompt-template 1 or 2) is measured with those; otherwise there is no baseline
    (None). In base-to-novel both are measured on base, novel and all classes.
    -> {"random_prompts": metrics, "zero_shot_hard_prompts": metrics or None,
    "hard_prompt_template": the template of the zero-shot prompts}."""
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
    """The class prototypes of L_v for a run: computed once on rank 0 from the training set
    (or read from the cache, keyed by everything they depend on, the data root included:
    file names and labels cannot tell the same images from others, so a dataset that moved
    computes its prototypes once more), then given to every rank."""
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
    """`baselines` on the set the run reports, logged and written to baseline.json."""
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
    """The run's result: when another set chose best.pt (and always in base-to-novel), best.pt
    evaluated once on the test set (test.json, and the base-to-novel table); then the result
    beside zero-shot CLIP's (baseline.json)."""
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
    if splits.base and splits.test is not None:
        rows = {"zero-shot CLIP, hard prompts": zero_shot} if zero_shot else {}
        run.log(f"\nbase-to-novel on the test split ({len(splits.base)} base classes, best.pt "
                f"chosen on {splits.selection_name} images):\n"
                + format_base_to_novel({**rows, "MPA-FER, trained on base": test}))
    if zero_shot:
        which = "the hard prompts" + (f" of template {template}" if template != 3 else "")
        run.log(f"\n{'DEMO: ' if run.cfg.demo else ''}zero-shot CLIP with {which} "
                f"{100 * zero_shot['war']:.2f}% -> trained MPA-FER {100 * trained:.2f}% (WAR on "
                f"{splits.reported_name}, {100 * (trained - zero_shot['war']):+.2f} points)")


# -- cross-dataset evaluation: a checkpoint on data whose classes differ from its own --------------

CLASS_SETS = ("shared", "open")


def class_set_data(dataset, trained: List[str], class_set: Optional[str], source: str):
    """The data to evaluate `source` (a checkpoint trained on classes `trained`) on, as far as
    its classes allow: all of it when the checkpoint knows every class (in any order:
    predictions match by name); with --class-set shared, the images of the classes both have,
    scored among those; with --class-set open, all of it, the classes the checkpoint was not
    trained on scored through its learned context. A class the checkpoint spells otherwise
    (Happy, happy: happiness) is the checkpoint's class."""
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
    """--class-set open: WAR and UAR over the images of the classes the checkpoint was trained
    on ("seen") and of the others ("unseen"), from the predictions over all of them."""
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
    """eval.py's data where the command line leaves it open (`given`: its data flags, None where
    not given): that of the run that trained `checkpoint` (its dataset, root, evaluation split,
    folder class names; the demo's faces), else RAF-DB's test split. A run that chose best.pt on
    a part of its training set (--val-fraction) is tested on test."""
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
