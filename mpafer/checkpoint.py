"""Self-describing checkpoints: trainable tensors plus what rebuilds the model, as plain
containers that load with `torch.load(weights_only=True)`:

    format, method    "mpafer-checkpoint/2" (an older version is refused), "mpafer"
    config            MPAFERConfig as a dict; train_config: the resolved training settings
    classnames        class names in the model's order
    clip              {"name": ..., "sha256": ..., "activation": "quick_gelu" | "gelu"}
    descriptions      the class descriptions used (hard prompts), and their "descriptions_sha256"
    face_convention   how its training faces were cropped (`mpafer.faces.CONVENTIONS`)
    state_dict        trainable tensors only; epoch (1-based) and its metrics
    resume            (last.pt only) optimizer, scheduler and scaler states, where the run
                      stands (`mpafer.app.runs.save_checkpoints`); no RNG states (epochs re-seed)
"""
from typing import Dict, Optional, Sequence

from .clip.loading import safe_load
from .clip.model import check_same_clip
from .faces.align import DATASET_CONVENTIONS
from .model import MPAFER, MPAFERConfig
from .prompts import descriptions_hash

FORMAT = "mpafer-checkpoint/2"


def make_checkpoint(model: MPAFER, descriptions: Optional[Dict], epoch: int, metrics: Dict,
                    train_config: Optional[Dict] = None, resume: Optional[Dict] = None) -> Dict:
    """The checkpoint dict of `model` (see the module docstring)."""
    clip_model = model.clip
    checkpoint = {
        "format": FORMAT,
        "method": "mpafer",
        "config": model.config.to_dict(),
        "train_config": train_config or {},
        "classnames": list(model.classnames),
        "clip": {"name": clip_model.checkpoint_name,
                 "sha256": clip_model.checkpoint_sha256,
                 "activation": clip_model.activation},
        "descriptions": descriptions,
        "descriptions_sha256": descriptions_hash(descriptions),
        "face_convention": face_convention_of(train_config or {}),
        "state_dict": {k: v.cpu() for k, v in model.trainable_state_dict().items()},
        "epoch": epoch,
        "metrics": metrics,
    }
    if resume is not None:
        checkpoint["resume"] = resume
    return checkpoint


def face_convention_of(train_config: Dict) -> str:
    """The crop convention of a run's training faces (its dataset's, else "folder")."""
    dataset = "synthetic" if train_config.get("demo") else train_config.get("dataset", "folder")
    return DATASET_CONVENTIONS.get(dataset, "folder")


def load_checkpoint(path: str) -> Dict:
    """Read a checkpoint safely; refuse anything that is not plain tensors and containers."""
    checkpoint = safe_load(path, "checkpoint")
    found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
    if isinstance(found, str) and found.startswith("mpafer-checkpoint/") and found != FORMAT:
        raise ValueError(f"{path} is a checkpoint of format {found}, written before this version "
                         f"of mpafer (which reads {FORMAT}); train it again")
    if found != FORMAT:
        raise ValueError(f"{path} is not an mpafer checkpoint (format {found!r}, expected "
                         f"{FORMAT!r})")
    return checkpoint


def check_compatible(checkpoint: Dict, path: str, clip_model=None,
                     classnames: Optional[Sequence[str]] = None, allow_other_clip: bool = False):
    """Clear errors when the request does not match what the checkpoint was trained with."""
    if classnames is not None and list(classnames) != checkpoint["classnames"]:
        raise ValueError(f"{path} was trained on classes {checkpoint['classnames']}, but the "
                         f"requested data has classes {list(classnames)}")
    if clip_model is not None and not allow_other_clip:
        check_same_clip(checkpoint["clip"], clip_model, path,
                        "pass the matching --clip and --clip-activation (or --allow-other-clip "
                        "to force it)")


def clip_activation(given: str, checkpoint: Optional[Dict] = None,
                    demo_clip: bool = False) -> Optional[str]:
    """The activation to load the CLIP with: `given` (--clip-activation), else the one
    `checkpoint` recorded, else QuickGELU for the demo CLIP, else None (`clip.load` decides)."""
    if given:
        return given
    if checkpoint is not None:
        return checkpoint["clip"]["activation"]
    return "quick_gelu" if demo_clip else None


def model_from_checkpoint(checkpoint: Dict, clip_model, for_training: bool = False) -> MPAFER:
    """The checkpoint's MPA-FER model on `clip_model` (hard prompts only `for_training`)."""
    config = MPAFERConfig.from_dict(checkpoint["config"])
    if not for_training:
        config.soft_hard_alignment = False
        config.prototype_alignment = False
    model = MPAFER(clip_model, checkpoint["classnames"], checkpoint.get("descriptions"), config)
    model.load_trainable_state_dict(checkpoint["state_dict"])
    return model
