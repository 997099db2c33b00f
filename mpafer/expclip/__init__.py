"""Exp-CLIP: zero-shot FER by LLM knowledge transfer (Zhao et al., WACV 2025).

A linear head `W: D -> 4096` (`head`) maps frozen CLIP features into the space of a teacher
(`teacher`), trained by a symmetric InfoNCE on cached features (`features`, `train`):

    head = load_head("ExpCLIP_B16_model.pth", clip_model)   # the released format loads as is
    classifier = expclip_classifier(clip_model, classnames, "ensemble10", head=head)
    logits = classifier(images)                                # [B, C]
"""
from .features import (
    FEATURES_FORMAT,
    ImageFiles,
    add_teacher_features,
    cache_image_features,
    list_images,
    load_features,
)
from .head import (
    LOGIT_SCALE,
    TEACHER_WIDTH,
    ProjectionHead,
    check_head_fits,
    load_head,
    read_head_metadata,
    recorded_clip,
    save_head,
)
from .prompt_sets import (
    PROMPT_SETS,
    PROMPT_TEMPLATES,
    build_prompts,
    is_prompt_file,
    load_prompt_file,
)
from .train import info_nce, train_head, train_head_from_file
from .zeroshot import INPUT_TRANSFORMS, expclip_classifier, input_transform

__all__ = [
    "FEATURES_FORMAT", "INPUT_TRANSFORMS", "LOGIT_SCALE", "PROMPT_SETS", "PROMPT_TEMPLATES",
    "TEACHER_WIDTH", "ImageFiles", "ProjectionHead",
    "add_teacher_features", "build_prompts", "cache_image_features", "check_head_fits",
    "expclip_classifier",
    "info_nce", "input_transform", "is_prompt_file", "list_images", "load_features", "load_head",
    "load_prompt_file", "read_head_metadata", "recorded_clip", "save_head", "train_head",
    "train_head_from_file",
]
