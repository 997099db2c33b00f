"""Exp-CLIP: zero-shot facial expression recognition by LLM knowledge transfer.

Zhao, Cao, Gong, Patras, "Enhancing Zero-Shot Facial Expression Recognition by LLM Knowledge
Transfer", WACV 2025 (arXiv 2405.19100).

CLIP stays frozen. One bias-free linear head `W: D -> 4096` (`head`) maps CLIP features into
the space of a teacher: BLIP-2 (Flan-T5-XXL) told to describe facial actions, its T5 encoder
output mean-pooled (`teacher`). Training pairs unlabelled face images with their teacher
embeddings under a symmetric InfoNCE (`train`). Zero-shot, the same head is applied to the
image feature and to every class prompt's text feature; logits are `100 * cos` (`zeroshot`,
prompt sets in `prompt_sets`).

Since CLIP and the teacher are frozen, training runs on cached features (`features`):

    python -m mpafer.expclip cache   --clip ViT-B/16 --images CAER-S/ --out feats.pt
    python -m mpafer.expclip teacher --features feats.pt             # needs `transformers`
    python -m mpafer.expclip train   --features feats.pt             # the head, in a run folder

Inputs follow the released heads: `Resize((224, 224))` (a squash, no crop) + `ToTensor()`,
**no** mean/std normalisation (`mpafer.data.expclip_transform`; normalisation is an option).

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
