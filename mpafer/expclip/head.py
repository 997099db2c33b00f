"""The Exp-CLIP projection head, in the released heads' format, with a metadata sidecar."""
import json
import os
from typing import Optional

import torch
from torch import nn

from ..clip.loading import load_plain_state_dict
from ..clip.model import check_same_clip
from ..files import atomic_save, atomic_write_json

# CLIP widths, only to make error messages helpful (widths are always read off the models).
CLIP_MODELS_BY_WIDTH = {512: ("ViT-B/32", "ViT-B/16"), 768: ("ViT-L/14", "ViT-L/14@336px")}
TEACHER_WIDTH = 4096  # Flan-T5-XXL's d_model: the released heads' output width
LOGIT_SCALE = 100.0   # the `s` of the paper (CLIP's exp(logit_scale) for the released weights)


class ProjectionHead(nn.Module):
    """One bias-free linear map `W: in_dim -> out_dim`, stored as `self.mlp` so the state dict
    is `{"mlp.weight": [out_dim, in_dim]}`, the format of the released heads."""

    def __init__(self, in_dim: int, out_dim: int = TEACHER_WIDTH):
        super().__init__()
        self.mlp = nn.Linear(in_dim, out_dim, bias=False)

    @property
    def in_dim(self) -> int:
        return self.mlp.in_features

    @property
    def out_dim(self) -> int:
        return self.mlp.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)  # [..., out_dim]


def check_head_fits(head: ProjectionHead, clip_model, source: str = "the Exp-CLIP head"):
    """A clear error when the head's input width is not the CLIP model's embedding width."""
    if head.in_dim != clip_model.embed_dim:
        names = CLIP_MODELS_BY_WIDTH.get(head.in_dim)
        known = f"OpenAI's {' or '.join(names)}" if names else ""
        name = clip_model.checkpoint_name or f"CLIP (embed_dim {clip_model.embed_dim})"
        raise ValueError(
            f"{source} does not fit the CLIP {name}: the head takes "
            f"{head.in_dim}-d CLIP features (mlp.weight [{head.out_dim}, {head.in_dim}]), but "
            f"this CLIP's embed_dim is {clip_model.embed_dim}. Load a CLIP whose embed_dim is "
            f"{head.in_dim}{', e.g. ' + known if known else ''}, best the one the head was "
            "trained on (eval.py: --clip)")


def head_metadata_path(path: str) -> str:
    """The JSON sidecar `save_head` writes beside a head file: `<path>.json`."""
    return path + ".json"


def read_head_metadata(path: str) -> dict:
    """The sidecar metadata of a head saved by `save_head` ({} for a released head)."""
    meta = head_metadata_path(path)
    if not os.path.isfile(meta):
        return {}
    with open(meta, encoding="utf-8") as f:
        return json.load(f)


def recorded_clip(path: str) -> dict:
    """The CLIP a head was trained on, as its sidecar records it: `{"name", "sha256",
    "activation"}` (None where unknown, e.g. for a released head)."""
    metadata = read_head_metadata(path)
    return {"name": metadata.get("clip_name"), "sha256": metadata.get("clip_sha256"),
            "activation": metadata.get("clip_activation")}


def load_head(path: str, clip_model=None, check_clip: bool = True) -> ProjectionHead:
    """Read a head in the released format; with `clip_model`, check that it fits it (and is its
    sidecar's CLIP, unless `check_clip=False`) and move it to its device."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Exp-CLIP head {path} not found")
    state = load_plain_state_dict(path, "Exp-CLIP head")
    keys = [k for k in state if k == "mlp.weight" or k.endswith(".mlp.weight")]
    if len(keys) != 1:
        raise ValueError(f"{path} is not an Exp-CLIP head: expected one 'mlp.weight' tensor "
                         f"[out_dim, D], found keys {sorted(state)[:8]}")
    weight = state[keys[0]]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{path}: '{keys[0]}' must be a 2-d tensor [out_dim, D], "
                         f"got {getattr(weight, 'shape', type(weight).__name__)}")
    head = ProjectionHead(weight.shape[1], weight.shape[0])
    head.load_state_dict({"mlp.weight": weight.float()}, strict=True)
    if clip_model is not None:
        check_head_fits(head, clip_model, source=f"the Exp-CLIP head {path}")
        if check_clip:
            check_same_clip(recorded_clip(path), clip_model, f"the Exp-CLIP head {path}",
                            "load the matching CLIP or pass check_clip=False "
                            "(eval.py: --allow-other-clip)")
        head = head.to(clip_model.logit_scale.device)
    return head.eval()


def save_head(head: ProjectionHead, path: str, metadata: Optional[dict] = None):
    """Write `head` atomically in the released format; `metadata` goes to `<path>.json`."""
    if metadata is not None:
        try:
            json.dumps(metadata)
        except TypeError as e:
            raise TypeError(f"save_head metadata must be plain JSON values: {e}") from e
    atomic_save({"mlp.weight": head.mlp.weight.detach().float().cpu().contiguous()}, path)
    if metadata is not None:
        atomic_write_json(metadata, head_metadata_path(path))
