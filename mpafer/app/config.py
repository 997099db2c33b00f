"""The commands' settings as dataclasses (every field a flag, its help in the metadata), and
parsing that checks every value before anything runs. Precedence: defaults < dataset preset <
--demo < flags you give."""
import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, get_args, get_type_hints

from .. import clip
from ..data import DATASET_NAMES, DATASETS, TRAINING_DATASETS
from ..expclip import INPUT_TRANSFORMS, PROMPT_SETS, is_prompt_file
from ..model import MPAFERConfig
from ..precision import AMP_CHOICES
from .cli import ArgumentParser
from .protocol import CLASS_SETS


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


AMP_FLAG = {"help": "autocast: auto = bf16 on CUDA where supported, else fp16; off on CPU",
            "choices": AMP_CHOICES}


@dataclass
class TrainConfig:
    """Every training setting, each a flag. `metadata["result"] = False`: the setting does not
    change what a run computes (a path whose content is identified otherwise counts too), so
    `report` ignores it when grouping runs and a resume may change it."""
    dataset: str = field(default="rafdb", metadata={"help": " | ".join(TRAINING_DATASETS)})
    data_root: str = field(default="data/RAF-DB", metadata={"result": False})
    classnames: str = field(default="", metadata={
        "help": "--dataset folder: the class folder names, comma-separated, in label order "
                "(default: canonical names or their usual synonyms, e.g. happy, sad)"})
    clip: str = field(default="ViT-B/16", metadata={
        "help": "CLIP name (downloaded to --cache-dir), path (a checkpoint file or a Hugging Face "
                "transformers folder) or Hugging Face model id (from the local cache); --demo: "
                "\"\" = the tiny demo CLIP"})
    clip_activation: str = field(default="", metadata={
        "help": "quick_gelu | gelu: the CLIP's MLP activation, which its file does not show; "
                "open_clip models without -quickgelu in their name use gelu (default: QuickGELU, "
                "with a note for a file; a transformers config's hidden_act; a resumed run keeps "
                "its own)"})
    cache_dir: str = field(default="", metadata={
        "help": "CLIP downloads, the prototype cache and the marks of image sets that "
                "decoded (checked-images/) (default: $MPAFER_WEIGHTS, else the repository's "
                "weights/)", "result": False})
    descriptions: str = field(default="", metadata={
        "help": "class descriptions JSON (default: the shipped one)", "result": False})
    out: str = field(default="", metadata={
        "help": "the run folder (default runs/<dataset>/<yyyymmdd-hhmmss>, or see --name)",
        "result": False})
    name: str = field(default="", metadata={"help": "the run folder is runs/<dataset>/NAME",
                                            "result": False})
    overwrite: bool = field(default=False, metadata={
        "help": "replace the run in an existing run folder (default: refuse)", "result": False})
    epochs: int = field(default=120, metadata={"help": "(the paper's RAF-DB recipe: 120)"})
    batch_size: int = field(default=32, metadata={
        "help": "per process; lowered, with a note, when the training set is smaller (few-shot) "
                "(the paper's RAF-DB recipe: 32)"})
    lr: float = field(default=0.032, metadata={"help": "(the paper's RAF-DB recipe: 0.032)"})
    momentum: float = field(default=0.9, metadata={"help": "(choice) SGD momentum, CoOp's"})
    weight_decay: float = field(default=5e-4, metadata={"help": "(choice) CoOp's"})
    warmup_epochs: float = field(default=1.0, metadata={
        "help": "(choice) linear warm-up, then cosine decay to 0, per step"})
    grad_clip: float = field(default=1.0, metadata={
        "help": "(choice) max gradient norm, 0 = off (the README gives the ablation)"})
    grad_clip_mode: str = field(default="global", metadata={
        "help": "global: one norm over all trainable parameters | per-group: the text prompts, "
                "the visual prompts and the alignment projections each clipped on their own"})
    workers: int = field(default=min(4, os.cpu_count() or 1), metadata={
        "help": "DataLoader workers per process", "result": False})
    amp: str = field(default="auto", metadata=AMP_FLAG)
    seed: int = field(default=1)
    device: str = field(default="", metadata={"help": "default: cuda if available, else cpu",
                                              "result": False})
    resume: str = field(default="", metadata={
        "help": "a last.pt to continue from, as recorded; of the other flags only "
                "--epochs (to extend the run), --stop-after, --eval-every, --workers, "
                "--log-interval, --device, --cache-dir, --clip (the same file), "
                "--data-root (the same data, moved), --grad-checkpointing and --compile may "
                "change", "result": False})
    demo: bool = field(default=False, metadata={
        "help": "synthetic faces and a tiny pre-trained CLIP: the whole pipeline, nothing "
                "downloaded"})
    ablation: bool = field(default=False, metadata={
        "help": "train each row of the paper's ablation ladder (CoOp, + visual prompts, "
                "+ prototype alignment, + soft-hard alignment, full) for each of --seeds, each "
                "run in a folder under --out, then write one table (ablation.md, .json)"})
    seeds: str = field(default="", metadata={
        "help": "the seeds, comma-separated: train the configuration once per seed (each run "
                "in <out>/seed-<s>), then print mpafer.report's table over them (report.md); "
                "with --ablation, every row per seed (default: --seed alone)"})
    demo_ablation: bool = field(default=False, metadata={"help": "the same as --demo --ablation"})
    demo_train_per_class: int = field(default=200, metadata={"help": "synthetic faces per class"})
    demo_test_per_class: int = field(default=60, metadata={"help": "test faces per class"})
    stop_after: int = field(default=0, metadata={
        "help": "stop after this epoch (0 = never), e.g. to fit a job's time limit; "
                "resume later", "result": False})
    eval_split: str = field(default="test", metadata={"help": "chooses best.pt, each epoch"})
    eval_every: int = field(default=1)
    balanced_sampler: bool = field(default=False, metadata={"help": "class-balanced (AffectNet)"})
    samples_per_epoch: int = field(default=0, metadata={
        "help": "with the balanced sampler; 0 = the training set's size"})
    prototypes_per_class: int = field(default=0, metadata={"help": "0 = every training image"})
    skip_bad_images: bool = field(default=False, metadata={
        "help": "leave unreadable images out (default: an unreadable image is an error, "
                "found before training)"})
    log_interval: int = field(default=20, metadata={
        "help": "steps between loss syncs (progress bar, NaN check)", "result": False})
    grad_checkpointing: bool = field(default=False, metadata={
        "help": "recompute CLIP blocks in backward: less memory",
        "result": False})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the image tower (CUDA; first steps are slow)", "result": False})
    base_classes: str = field(default="", metadata={
        "help": "base-to-novel: train (and choose best.pt) on these classes only, comma-"
                "separated; the test split's other classes are novel: best.pt is evaluated on "
                "base, novel and all classes, with their harmonic mean (default: all classes)"})
    demo_class_words: str = field(default="labels", metadata={
        "help": "--demo: labels (the FER label names, which the demo CLIP never saw) | moods (the "
                "everyday mood words of its captions, e.g. happy, scared), for base-to-novel"})
    shots: int = field(default=0, metadata={
        "help": "few-shot: train on K images per class (min(K, available)) drawn with --seed, "
                "listed in <out>/shots.json; evaluation uses the full split (default 0 = all)"})
    val_fraction: float = field(default=0.0, metadata={
        "help": "hold out this stratified, seeded fraction of the training set (listed in "
                "<out>/heldout.json) to choose best.pt; best.pt is then evaluated once on the "
                "test split (default 0 = off: evaluate on --eval-split)"})

    def validate(self):
        """Raise ValueError naming the flag of the first value out of range."""
        finite = math.isfinite
        names = [c.strip() for c in self.classnames.split(",")] if self.classnames else []
        checks = [
            ("clip_activation", self.clip_activation in ("", *clip.ACTIVATIONS),
             " or ".join(clip.ACTIVATIONS)),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("lr", finite(self.lr) and self.lr > 0, "a finite number > 0"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("weight_decay", finite(self.weight_decay) and self.weight_decay >= 0, ">= 0"),
            ("warmup_epochs", finite(self.warmup_epochs) and self.warmup_epochs >= 0, ">= 0"),
            ("grad_clip", finite(self.grad_clip) and self.grad_clip >= 0, ">= 0 (0 = off)"),
            ("grad_clip_mode", self.grad_clip_mode in ("global", "per-group"),
             "global or per-group"),
            ("seeds", all(part.strip().isdigit() for part in self.seeds.split(","))
             if self.seeds else True, "seeds >= 0, comma-separated (e.g. 1,2,3)"),
            ("demo_class_words", self.demo_class_words in ("labels", "moods"), "labels or moods"),
            ("base_classes", all(c.strip() for c in self.base_classes.split(","))
             and len({c.strip() for c in self.base_classes.split(",")})
             == len(self.base_classes.split(",")) if self.base_classes else True,
             "distinct non-empty class names, comma-separated"),
            ("workers", self.workers >= 0, ">= 0"),
            ("seed", self.seed >= 0, ">= 0"),
            ("stop_after", self.stop_after >= 0, ">= 0 (0 = never)"),
            ("eval_every", self.eval_every >= 1, ">= 1"),
            ("eval_split", self.eval_split in ("val", "test"), "val or test"),
            ("log_interval", self.log_interval >= 1, ">= 1"),
            ("samples_per_epoch", self.samples_per_epoch >= 0, ">= 0"),
            ("prototypes_per_class", self.prototypes_per_class >= 0, ">= 0 (0 = all)"),
            ("demo_train_per_class", self.demo_train_per_class >= 1, ">= 1"),
            ("demo_test_per_class", self.demo_test_per_class >= 1, ">= 1"),
            ("classnames", not names or self.dataset == "folder", "used with --dataset folder"),
            ("classnames", all(names) and len(set(names)) == len(names),
             "distinct non-empty names, comma-separated"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{flag(name)} must be {expected}, got {getattr(self, name)!r}")


# Each dataset's preset is in `mpafer.data.DATASETS`; the demo and Exp-CLIP have their own.
DEMO = dict(dataset="synthetic", clip="", epochs=10, batch_size=32, lr=0.032, workers=0,
            amp="off")
DEMO_MODEL = dict(top_k=8)  # the demo CLIP has only 16 patches
TRAIN_FIELDS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
# The settings by what they are about, for --help and the settings a run prints.
SETTING_GROUPS = {
    "data": ("dataset", "data_root", "classnames", "eval_split", "val_fraction", "shots",
             "base_classes", "balanced_sampler", "samples_per_epoch", "prototypes_per_class",
             "skip_bad_images", "demo", "demo_train_per_class", "demo_test_per_class",
             "demo_class_words"),
    "model": ("clip", "clip_activation", "descriptions"),
    "optimisation": ("epochs", "batch_size", "lr", "momentum", "weight_decay", "warmup_epochs",
                     "grad_clip", "grad_clip_mode", "amp", "seed"),
    "run": ("out", "name", "overwrite", "resume", "stop_after", "eval_every", "log_interval",
            "workers", "device", "cache_dir", "grad_checkpointing", "compile", "ablation",
            "seeds", "demo_ablation"),
}


def format_settings(record: Dict, width: int = 100) -> str:
    """A run's settings (`runs.run_record`) as `key = value` lines under their group."""
    values = {**record["train"], **record["model"], "precision": record["precision"],
              "processes": record["processes"]}
    groups = {**SETTING_GROUPS, "model": (*SETTING_GROUPS["model"], *record["model"]),
              "run": (*SETTING_GROUPS["run"], "precision", "processes")}
    lines = []
    for group, names in groups.items():
        lines.append(f"  {group}:")
        line = "   "
        for name in names:
            item = f" {name} = {values[name]!r}"
            if len(line) + len(item) > width and line.strip():
                lines.append(line)
                line = "   "
            line += item + ";"
        lines.append(line.rstrip(";"))
    return "\n".join(lines)
RESULT_NEUTRAL = frozenset(f.name for f in dataclasses.fields(TrainConfig)
                           if not f.metadata.get("result", True))
# What a resume may change: the result-neutral settings but the run's folder and descriptions,
# plus --epochs (only to extend it), --eval-every and --clip (only the same file, by SHA-256).
# --data-root may point to data that moved: `faults.check_data` checks it is the run's.
RESUME_MAY_CHANGE = (RESULT_NEUTRAL - {"out", "name", "overwrite", "descriptions"}
                     | {"epochs", "eval_every", "clip"})


def add_fields(cls, group, names=None):
    """One flag per field of `cls` (of `names` only, if given), with its `metadata` help."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        kind = hints[f.name]
        kind = next((a for a in get_args(kind) if a is not type(None)), kind)  # Optional[X] -> X
        flags = (flag(f.name), *f.metadata.get("aliases", ()))
        text = f.metadata.get("help", "")
        text = text if "default" in text else f"{text} (default {f.default!r})".strip()
        if kind is bool:
            group.add_argument(*flags, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=text)
        else:
            group.add_argument(*flags, type=kind, default=argparse.SUPPRESS,
                               choices=f.metadata.get("choices"),
                               metavar=kind.__name__.upper(), help=text)


def parse_flags(argv=None, description: str = None):
    """-> (the parser, the TrainConfig fields given, the MPAFERConfig fields given)."""
    parser = ArgumentParser(description=description or __doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    for group, names in SETTING_GROUPS.items():
        add_fields(TrainConfig, parser.add_argument_group(group), names)
    add_fields(MPAFERConfig, parser.add_argument_group("MPA-FER model (MPAFERConfig)"))
    given = vars(parser.parse_args(argv))
    train = {k: v for k, v in given.items() if k in TRAIN_FIELDS}
    model = {k: v for k, v in given.items() if k not in TRAIN_FIELDS}
    if train.get("demo_ablation"):  # the shorthand of --demo --ablation
        train.update(demo=True, ablation=True)
    if train.get("ablation") and train.get("resume"):
        parser.error("--ablation starts new runs; resume one row's run with --resume alone")
    if train.get("seeds") and train.get("resume"):
        parser.error("--seeds starts new runs; resume one seed's run with --resume alone")
    return parser, train, model


def check_config(parser, values: Dict, model_values: Dict,
                 given: Dict) -> Tuple["TrainConfig", MPAFERConfig]:
    """The settings as config objects, every value checked (an argument error naming the flag)."""
    try:
        cfg = TrainConfig(**values)
        cfg.validate()
        model_cfg = MPAFERConfig(**model_values)
    except ValueError as e:
        parser.error(str(e))
    if cfg.shots < 0:
        parser.error(f"--shots must be >= 0 (0 = the full training set), got {cfg.shots}")
    if not 0 <= cfg.val_fraction < 1:
        parser.error(f"--val-fraction must be in [0, 1) (0 = off), got {cfg.val_fraction}")
    if cfg.val_fraction > 0 and "eval_split" in given:  # it chooses best.pt itself
        parser.error("--val-fraction chooses best.pt on the part it holds out; drop "
                     f"--eval-split {given['eval_split']}")
    if cfg.base_classes and model_cfg.class_specific_ctx:
        parser.error("--base-classes needs the shared context: a class-specific context "
                     "(--class-specific-ctx) has none for the novel classes")
    cfg.cache_dir = os.path.abspath(os.path.expanduser(cfg.cache_dir or
                                                       clip.default_weights_dir()))
    return cfg, model_cfg


def new_run_values(parser, train: Dict, model: Dict):
    """Settings of a new run: defaults < dataset preset (or the demo's) < flags."""
    if train.get("demo"):
        values = dict(DEMO)
        model = {**DEMO_MODEL, **model}
    else:
        dataset = train.get("dataset", TrainConfig.dataset)
        if dataset not in TRAINING_DATASETS:
            parser.error(f"--dataset must be one of {', '.join(TRAINING_DATASETS)}, got "
                         f"{dataset!r}")
        values = dict(DATASETS[dataset].preset)
    values.update(train)
    return values, model


ACTIVATIONS = tuple(clip.ACTIVATIONS)  # (the field `clip` hides the module in the class)


@dataclass
class EvalConfig:
    """eval.py's settings; data left None is that of the run that trained --checkpoint."""
    checkpoint: Optional[str] = field(default=None, metadata={
        "help": "an MPA-FER checkpoint (best.pt / last.pt)"})
    zero_shot: bool = field(default=False, metadata={"help": "plain CLIP with --prompts"})
    method: str = field(default="mpafer", metadata={
        "help": "mpafer: --checkpoint and/or --zero-shot; expclip: plain CLIP and the Exp-CLIP "
                "--head side by side", "choices": ("mpafer", "expclip")})
    head: Optional[str] = field(default=None, metadata={
        "help": "Exp-CLIP projection head (.pth, the released format)"})
    prompts: str = field(default="photo", metadata={
        "help": "zero-shot / Exp-CLIP prompt set: " + ", ".join(PROMPT_SETS) + "; descriptions "
                "= MPA-FER's hard prompts; or a prompt file (.json: {class: [prompts]} or "
                "[templates with {c}], see the README)"})
    expclip_transform: str = field(default="released", metadata={
        "help": "--method expclip: the input transform of both classifiers; released = "
                "Resize((R, R)) squash + ToTensor, no normalisation (the released Exp-CLIP "
                "protocol); clip = CLIP's own preprocessing", "choices": INPUT_TRANSFORMS})
    clip: Optional[str] = field(default=None, metadata={
        "help": "CLIP name, file, transformers folder or Hugging Face model id (default: the "
                "checkpoint's or head's; ViT-B/16 otherwise)"})
    clip_activation: Optional[str] = field(default=None, metadata={
        "help": "the CLIP's MLP activation (default: the checkpoint's; else QuickGELU, with a "
                "note for a file); open_clip models without -quickgelu in their name use gelu",
        "choices": ACTIVATIONS})
    allow_other_clip: bool = field(default=False, metadata={
        "help": "use a CLIP other than the one the checkpoint or head was trained on"})
    demo: bool = field(default=False, metadata={
        "help": "the synthetic demo test split (and demo CLIP); the default for a checkpoint "
                "trained with --demo"})
    dataset: Optional[str] = field(default=None, metadata={
        "help": "default: the checkpoint's, else rafdb", "choices": DATASET_NAMES})
    data_root: Optional[str] = field(default=None, metadata={
        "help": "default: the checkpoint's, else data/RAF-DB"})
    split: Optional[str] = field(default=None, metadata={
        "help": "default: the checkpoint's evaluation split, else test"})
    classnames: Optional[str] = field(default=None, metadata={
        "help": "--dataset folder: the class folder names in label order (default: the "
                "checkpoint's, else canonical names or their usual synonyms)"})
    class_set: Optional[str] = field(default=None, metadata={
        "help": "a checkpoint on data whose classes differ from its own: shared = only the "
                "images of the classes both have, scored among those; open = the data's "
                "classes, those the checkpoint was not trained on scored through its learned "
                "context (recall marked seen/unseen)", "choices": CLASS_SETS})
    skip_bad_images: bool = field(default=False, metadata={
        "help": "leave unreadable images out (default: they are an error)"})
    detect_faces: bool = field(default=False, metadata={
        "help": "find each image's face (MTCNN) and align it as python -m mpafer.predict does, "
                "before classifying: photos scored like aligned crops"})
    detector_weights: Optional[str] = field(default=None, metadata={
        "help": "--detect-faces: a folder holding MTCNN's pnet.pt, rnet.pt and onet.pt "
                "(default: downloaded once into --cache-dir)"})
    json: Optional[str] = field(default=None, metadata={"help": "write the metrics as JSON"})
    confusion_png: Optional[str] = field(default=None, metadata={
        "help": "draw the confusion matrix (percent of each true class)"})
    confusion_counts: bool = field(default=False, metadata={
        "help": "--confusion-png: counts in the cells instead of percentages"})
    cache_dir: str = field(default="", metadata={
        "help": "CLIP downloads and the marks of image sets that decoded "
                "(default: $MPAFER_WEIGHTS, else the repository's weights/)"})
    device: str = field(default="", metadata={"help": "default: cuda if available, else cpu"})
    amp: str = field(default="auto", metadata=AMP_FLAG)
    batch_size: int = field(default=64, metadata={"help": "images per evaluation batch"})
    workers: int = field(default=min(4, os.cpu_count() or 1), metadata={
        "help": "DataLoader workers (the demo's faces are in memory: none)"})


EVAL_GROUPS = {
    "what to evaluate": ("checkpoint", "zero_shot", "method", "head", "prompts",
                         "expclip_transform", "clip", "clip_activation", "allow_other_clip"),
    "data": ("demo", "dataset", "data_root", "split", "classnames", "class_set",
             "skip_bad_images", "detect_faces", "detector_weights"),
    "output": ("json", "confusion_png", "confusion_counts"),
    "runtime": ("cache_dir", "device", "amp", "batch_size", "workers"),
}


def parse_eval_flags(argv=None, description: str = None) -> EvalConfig:
    """eval.py's flags as an EvalConfig, every combination checked (an argument error)."""
    parser = ArgumentParser(description=description,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    for group, names in EVAL_GROUPS.items():
        add_fields(EvalConfig, parser.add_argument_group(group), names)
    cfg = EvalConfig(**vars(parser.parse_args(argv)))
    known = (*PROMPT_SETS, "descriptions")
    checks = [
        (cfg.method == "expclip" and not cfg.head, "--method expclip needs --head"),
        (cfg.prompts not in known and not is_prompt_file(cfg.prompts),
         f"--prompts must be one of {', '.join(known)} or a prompt file (.json), got "
         f"{cfg.prompts!r}"),
        (cfg.method == "mpafer" and not (cfg.checkpoint or cfg.zero_shot),
         "give --checkpoint (MPA-FER), --zero-shot (plain CLIP) or --method expclip --head FILE"),
        (cfg.batch_size < 1, f"--batch-size must be >= 1, got {cfg.batch_size}"),
        (cfg.workers < 0, f"--workers must be >= 0, got {cfg.workers}"),
        (cfg.class_set and not cfg.checkpoint,
         "--class-set compares a checkpoint's classes with the data's: give --checkpoint"),
    ]
    for failed, message in checks:
        if failed:
            parser.error(message)
    cfg.cache_dir = cfg.cache_dir or clip.default_weights_dir()
    return cfg
