"""Exp-CLIP's zero-shot classifier and its two input protocols: "released" (how the released
heads were trained: a `Resize((r, r))` squash + `ToTensor`, no normalisation) and "clip" (CLIP's
own preprocessing). Both sides of a comparison must use the same one, or it measures the
preprocessing, not the head."""
from typing import Optional, Sequence

from ..data.transforms import describe_expclip_transform, eval_transform, expclip_transform
from ..zeroshot import ZeroShotClassifier
from .head import LOGIT_SCALE, ProjectionHead, check_head_fits
from .prompt_sets import PromptSet, build_prompts

INPUT_TRANSFORMS = ("released", "clip")


def input_transform(name: str, resolution: int):
    """-> (transform, description) of a zero-shot input protocol ("released" or "clip")."""
    if name == "released":
        return expclip_transform(resolution), "released: " + describe_expclip_transform(
            resolution)
    if name == "clip":
        return eval_transform(resolution), (f"clip: CLIP's preprocessing (bicubic resize of the "
                                            f"short side to {resolution}, centre crop, CLIP "
                                            "mean/std normalisation)")
    raise ValueError(f"unknown zero-shot input transform {name!r}; choose from "
                     f"{', '.join(INPUT_TRANSFORMS)}")


def expclip_classifier(clip_model, classnames: Sequence[str], prompt_set: PromptSet,
                       head: Optional[ProjectionHead] = None) -> ZeroShotClassifier:
    """Exp-CLIP zero-shot with a prompt set (plain CLIP when `head` is None)."""
    if head is not None:
        check_head_fits(head, clip_model)
    return ZeroShotClassifier(clip_model, classnames, build_prompts(prompt_set, list(classnames)),
                              head=head, scale=LOGIT_SCALE)
