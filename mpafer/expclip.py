"""Exp-CLIP: zero-shot facial expression recognition by LLM knowledge transfer.

Zhao, Cao, Gong, Patras, "Enhancing Zero-Shot Facial Expression Recognition by LLM Knowledge
Transfer", WACV 2025 (arXiv 2405.19100). DESIGN.md section 4.

CLIP stays frozen. One bias-free linear head `W: D -> 4096` maps CLIP features into the space
of a teacher: BLIP-2 (Flan-T5-XXL) told to describe facial actions, its T5 encoder output
mean-pooled (`mpafer.expclip_teacher`). Training pairs unlabelled face images with their
teacher embeddings under a symmetric InfoNCE (`info_nce`). Zero-shot, the same head is applied
to the image feature and to every class prompt's text feature; logits are `100 * cos`.

Since CLIP and the teacher are frozen, training runs on cached features:

    python -m mpafer.expclip cache   --clip ViT-B/16 --images CAER-S/ --out feats.pt
    python -m mpafer.expclip teacher --features feats.pt             # needs `transformers`
    python -m mpafer.expclip train   --features feats.pt --out expclip_head.pth

Inputs follow the released heads: `Resize((224, 224))` (a squash, no crop) + `ToTensor()`,
**no** mean/std normalisation (`mpafer.data.expclip_transform`; normalisation is an option).
"""
import argparse
import datetime
import json
import math
import os
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mpafer import clip
from mpafer.clip.loading import load_plain_state_dict, safe_load
from mpafer.data import CANONICAL_CLASSES, IMAGE_EXTENSIONS, expclip_transform, load_image
from mpafer.utils import atomic_save, atomic_write_json

# CLIP widths, only to make error messages helpful (widths are always read off the models).
CLIP_MODELS_BY_WIDTH = {512: ("ViT-B/32", "ViT-B/16"), 768: ("ViT-L/14", "ViT-L/14@336px")}
TEACHER_WIDTH = 4096  # Flan-T5-XXL's d_model: the released heads' output width
LOGIT_SCALE = 100.0   # the `s` of the paper (CLIP's exp(logit_scale) for the released weights)
FEATURES_FORMAT = "mpafer.expclip.features/1"


def _clip_models_with_width(width: int) -> str:
    names = CLIP_MODELS_BY_WIDTH.get(width)
    return " / ".join(names) if names else f"no OpenAI CLIP model has width {width}"


def _clip_name(clip_model) -> str:
    return getattr(clip_model, "checkpoint_name", None) or f"CLIP (embed_dim {clip_model.embed_dim})"


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# ---------------------------------------------------------------------------------------------
# Projection head

class ProjectionHead(nn.Module):
    """The Exp-CLIP head: one bias-free linear map `W: in_dim -> out_dim`.

    Stored as `self.mlp` so the state dict is exactly `{"mlp.weight": [out_dim, in_dim]}`, the
    format of the released heads (`ExpCLIP_B16_model.pth`, ...).
    """

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
        raise ValueError(
            f"{source} takes {head.in_dim}-d CLIP features (mlp.weight [{head.out_dim}, {head.in_dim}]; "
            f"it fits {_clip_models_with_width(head.in_dim)}), but the CLIP model "
            f"{_clip_name(clip_model)} has embed_dim {clip_model.embed_dim} "
            f"({_clip_models_with_width(clip_model.embed_dim)})")


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


def load_head(path: str, clip_model=None, check_clip: bool = True) -> ProjectionHead:
    """Read an Exp-CLIP head: `{"mlp.weight": [out_dim, D]}` (the released format), also
    wrapped as `{"state_dict": ...}` or with `module.` prefixes.

    With `clip_model`, the head's input width must be the model's `embed_dim` and the head is
    moved to the model's device. If the head has a `save_head` sidecar naming the CLIP it was
    trained on (SHA-256), a different CLIP is an error unless `check_clip=False`.
    """
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
        metadata = read_head_metadata(path)
        trained_on = metadata.get("clip_sha256")
        used = getattr(clip_model, "checkpoint_sha256", None)
        if check_clip and trained_on and used and trained_on != used:
            raise ValueError(
                f"the Exp-CLIP head {path} was trained on CLIP {metadata.get('clip_name')} "
                f"(SHA-256 {trained_on}) but the CLIP model given is {_clip_name(clip_model)} "
                f"(SHA-256 {used}); load the matching CLIP or pass check_clip=False")
        head = head.to(_device_of(clip_model))
    return head.eval()


def save_head(head: ProjectionHead, path: str, metadata: Optional[dict] = None):
    """Write `head` in the official format, atomically: a bare state dict
    `{"mlp.weight": [out_dim, D]}`, so `head.load_state_dict(torch.load(path, weights_only=True))` works as it does
    for the released heads. `metadata` (plain JSON values: CLIP name and SHA-256, teacher,
    hyper-parameters, history, ...) goes to the sidecar `<path>.json`, also written atomically.
    """
    if metadata is not None:
        try:
            json.dumps(metadata)
        except TypeError as e:
            raise TypeError(f"save_head metadata must be plain JSON values: {e}") from e
    atomic_save({"mlp.weight": head.mlp.weight.detach().float().cpu().contiguous()}, path)
    if metadata is not None:
        atomic_write_json(metadata, head_metadata_path(path))


# ---------------------------------------------------------------------------------------------
# Prompts

# The paper's five prompt types. The first three are the paper's exact templates. The two
# ensembles are *our choice* of wording (DESIGN.md gives only their sizes): 5 and 10 FER
# templates, each with the class word once; the first two of each ensemble are the paper's
# "expression" and "photo" templates. The official release ships its own hand-varied
# ensembles, so ensemble results can differ slightly from the paper's.
PROMPT_TEMPLATES: Dict[str, tuple] = {
    "class": ("{c}.",),
    "expression": ("an expression of {c}.",),
    "photo": ("a photo of a face with an expression of {c}.",),
    "ensemble5": (
        "an expression of {c}.",
        "a photo of a face with an expression of {c}.",
        "a photo of a person showing {c}.",
        "a close-up photo of a face expressing {c}.",
        "a cropped photo of a face displaying {c}.",
    ),
}
PROMPT_TEMPLATES["ensemble10"] = PROMPT_TEMPLATES["ensemble5"] + (
    "a facial expression of {c}.",
    "a photo of someone whose face shows {c}.",
    "a portrait of a person with a look of {c}.",
    "a good photo of a face conveying {c}.",
    "a low-resolution photo of a face showing {c}.",
)

# Prompt-type name -> {canonical class name: [prompts]}.
PROMPT_SETS: Dict[str, Dict[str, List[str]]] = {
    name: {c: [t.format(c=c) for t in templates] for c in CANONICAL_CLASSES}
    for name, templates in PROMPT_TEMPLATES.items()
}

PromptSet = Union[str, Mapping[str, Sequence[str]]]


def build_prompts(prompt_set: PromptSet, classnames: Sequence[str]) -> Dict[str, List[str]]:
    """{class: [prompts]} for `classnames`, in their order.

    prompt_set: a name from `PROMPT_SETS` (its templates are filled with each class word, so
    non-canonical class names work too), or a mapping {class: [prompts]} (any number of
    prompts per class) that must cover every class.
    """
    if not classnames:
        raise ValueError("build_prompts needs at least one class name")
    if isinstance(prompt_set, str):
        if prompt_set not in PROMPT_TEMPLATES:
            raise ValueError(f"unknown Exp-CLIP prompt set {prompt_set!r}; "
                             f"available: {', '.join(PROMPT_TEMPLATES)}")
        return {c: [t.format(c=c) for t in PROMPT_TEMPLATES[prompt_set]] for c in classnames}
    missing = [c for c in classnames if not prompt_set.get(c)]
    if missing:
        raise ValueError(f"the prompt set has no prompts for class(es) {missing} "
                         f"(it covers {sorted(prompt_set)})")
    return {c: [str(p) for p in prompt_set[c]] for c in classnames}


# ---------------------------------------------------------------------------------------------
# Zero-shot classifier

class ZeroShotClassifier(nn.Module):
    """Zero-shot FER with Exp-CLIP (or plain CLIP when `head=None`), same prompts either way.

    Text side (once, at construction, no grad): every prompt of every class ->
    `encode_text` -> head -> L2-normalise, cached as a buffer `[P, E]` (class-major order).
    Image side: `[B, 3, H, W]` (or video `[B, T, 3, H, W]`: the *projected* frame features are
    averaged before normalising) -> `encode_image` -> head -> L2-normalise. Logits per prompt
    are `scale * cos` (scale = 100); a class's logit is the mean of its prompts' logits.
    Returns `[B, C]` in the order of `classnames`.

    The head and the cosine run in fp32 even under `torch.autocast` (only the CLIP towers are
    autocast). The cached text features are frozen: build a new classifier after changing
    the head. The head is moved to the CLIP model's device.
    """

    def __init__(self, clip_model, classnames: Sequence[str], prompt_set: PromptSet,
                 head: Optional[ProjectionHead] = None, scale: float = LOGIT_SCALE):
        super().__init__()
        device = _device_of(clip_model)
        if head is not None:
            check_head_fits(head, clip_model)
            head = head.to(device)
        self.clip_model, self.head, self.scale = clip_model, head, float(scale)
        self.classnames = list(classnames)
        self.prompts = build_prompts(prompt_set, self.classnames)
        texts = [p for c in self.classnames for p in self.prompts[c]]
        counts = torch.tensor([len(self.prompts[c]) for c in self.classnames])
        owner = torch.repeat_interleave(torch.arange(len(self.classnames)), counts)  # [P]
        # Logit averaging as one matrix: weights[p, c] = 1 / n_c if prompt p belongs to class c.
        weights = F.one_hot(owner, len(self.classnames)).float() / counts[owner, None]  # [P, C]
        self.register_buffer("prompt_weights", weights.to(device), persistent=False)
        self.register_buffer("text_features", self._encode_texts(texts, device), persistent=False)

    @torch.no_grad()
    def _encode_texts(self, texts: List[str], device, batch_size: int = 256) -> torch.Tensor:
        tokens = clip.tokenize(texts, context_length=self.clip_model.context_length)  # [P, L]
        chunks = [self.clip_model.encode_text(tokens[i:i + batch_size].to(device)).float()
                  for i in range(0, len(texts), batch_size)]
        return self._project(torch.cat(chunks))  # [P, E]

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        """CLIP features `[..., D]` -> head (if any), in fp32 -> L2-normalised `[..., E]`."""
        with torch.autocast(features.device.type, enabled=False):
            features = features.float()
            if self.head is not None:
                features = self.head(features)
            return F.normalize(features, dim=-1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` or video `[B, T, 3, H, W]` -> normalised (projected) features `[B, E]`."""
        if images.dim() == 5:
            B, T = images.shape[:2]
            feats = self.clip_model.encode_image(images.flatten(0, 1)).float()  # [B*T, D]
            with torch.autocast(feats.device.type, enabled=False):
                if self.head is not None:
                    feats = self.head(feats)  # [B*T, E]
                feats = feats.view(B, T, -1).mean(dim=1)  # [B, E]: average projected frames
            return F.normalize(feats, dim=-1)
        if images.dim() != 4:
            raise ValueError(f"expected images [B, 3, H, W] or video [B, T, 3, H, W], "
                             f"got shape {tuple(images.shape)}")
        return self._project(self.clip_model.encode_image(images).float())  # [B, E]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        image_features = self.encode_images(images)  # [B, E]
        with torch.autocast(image_features.device.type, enabled=False):
            per_prompt = self.scale * image_features @ self.text_features.t()  # [B, P]
            return per_prompt @ self.prompt_weights  # [B, C]: mean logit over each class's prompts


# ---------------------------------------------------------------------------------------------
# Loss

def info_nce(z: torch.Tensor, e: torch.Tensor, scale: float = LOGIT_SCALE) -> torch.Tensor:
    """Symmetric InfoNCE of Exp-CLIP (the paper's training loss, DESIGN.md section 4):

        L = 1/2 CE(s * Z E^T, I) + 1/2 CE(s * E Z^T, I)

    z `[N, E]`: projected CLIP image features `Z = norm(W f_I(x))`; e `[N, E]`: teacher
    embeddings. Both must be L2-normalised already (this function does not normalise, so it
    is the equation as written). Row i of z and of e come from the same image; the other rows
    of the batch are the negatives. CE is averaged over the N rows; s = 100.
    """
    logits = scale * z @ e.t()  # [N, N]: image i vs teacher j
    target = torch.arange(z.shape[0], device=z.device)
    return 0.5 * F.cross_entropy(logits, target) + 0.5 * F.cross_entropy(logits.t(), target)


# ---------------------------------------------------------------------------------------------
# Feature files

def list_images(folder: str) -> List[str]:
    """Image files under `folder`, recursively (jpg/jpeg/png/bmp/webp), sorted, relative."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder} not found")
    found = sorted(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
                   for root, _, files in os.walk(folder) for name in files
                   if name.lower().endswith(IMAGE_EXTENSIONS))
    if not found:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
    return found


class ImageFiles(Dataset):
    """Images by path (labels ignored): `transform(RGB PIL image)`; unreadable files raise
    an error naming the file."""

    def __init__(self, paths: Sequence[str], transform: Callable, root: str = ""):
        self.paths, self.transform, self.root = list(paths), transform, root

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(load_image(os.path.join(self.root, self.paths[i])))


def resolve_images(images: Union[str, Sequence[str]]):
    """A folder (searched recursively) or a list of image files -> (root, relative paths)."""
    if isinstance(images, (str, os.PathLike)):
        return os.path.abspath(images), list_images(images)
    paths = [str(p) for p in images]
    if not paths:
        raise ValueError("no image paths given")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image file(s) not found, first: {missing[0]}")
    return "", paths


def describe_transform(transform, resolution: int, normalize: bool) -> str:
    if transform is not None:
        return repr(transform)
    return (f"Resize(({resolution}, {resolution})) squash (bilinear), ToTensor, "
            + ("CLIP mean/std normalisation" if normalize else "no normalisation"))


def autocast_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device supports it, else fp16 (DESIGN.md section 2)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


@torch.no_grad()
def cache_image_features(clip_model, images: Union[str, Sequence[str]], out_path: str,
                         transform: Optional[Callable] = None, normalize: bool = False,
                         batch_size: int = 128, num_workers: int = 4,
                         device: Optional[Union[str, torch.device]] = None,
                         progress: bool = True) -> dict:
    """Run every image through the frozen CLIP image tower and write a feature file.

    images: a folder (searched recursively for jpg/jpeg/png/bmp/webp; labels and sub-folder
    names are ignored) or a list of image paths. transform: default Exp-CLIP's input
    (`Resize((r, r))` squash + `ToTensor`, no normalisation; `normalize=True` adds CLIP's).
    Autocast (bf16, else fp16) on CUDA, fp32 on CPU. The model is moved to `device` (default:
    where it is).

    The file (atomic write, loads with `torch.load(weights_only=True)`) is a dict:
    `clip_features` fp32 `[N, D]`, `paths` (relative to `root` for a folder, else as given),
    `root`, `clip_name`, `clip_sha256`, `preprocess`, `created`, `format`. Teacher features
    are added to the same file later (`add_teacher_features`). Returns the dict.
    """
    device = torch.device(device) if device is not None else _device_of(clip_model)
    clip_model = clip_model.to(device)
    resolution = clip_model.visual.input_resolution
    preprocess = describe_transform(transform, resolution, normalize)
    transform = transform or expclip_transform(resolution, normalize=normalize)
    root, paths = resolve_images(images)
    loader = DataLoader(ImageFiles(paths, transform, root), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    features = []
    for batch in tqdm(loader, desc="CLIP image features", unit="batch", disable=not progress):
        with torch.autocast(device.type, dtype=autocast_dtype(device), enabled=device.type == "cuda"):
            features.append(clip_model.encode_image(batch.to(device, non_blocking=True)).float().cpu())
    data = {
        "format": FEATURES_FORMAT,
        "clip_features": torch.cat(features),  # [N, D]
        "paths": paths,
        "root": root,
        "clip_name": str(getattr(clip_model, "checkpoint_name", "") or ""),
        "clip_sha256": str(getattr(clip_model, "checkpoint_sha256", "") or ""),
        "preprocess": preprocess,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    atomic_save(data, out_path)
    return data


def add_teacher_features(path: str, teacher_features: torch.Tensor, teacher_name: str,
                         instruction: str, preprocess: str = "",
                         paths: Optional[Sequence[str]] = None) -> dict:
    """Add `teacher_features [N, E]` (stored fp16: unit vectors computed in bf16, so nothing is
    lost, at half the size) with `teacher_name`, `instruction` and `teacher_preprocess` to the
    feature file `path`, rewriting it atomically. `paths`, if given, must be the file's."""
    data = load_features(path, require_teacher=False)
    n = data["clip_features"].shape[0]
    if teacher_features.dim() != 2 or teacher_features.shape[0] != n:
        raise ValueError(f"{path} holds {n} images but the teacher features have shape "
                         f"{tuple(teacher_features.shape)} (expected [{n}, E])")
    if paths is not None and list(paths) != data["paths"]:
        raise ValueError(f"the teacher features' image paths are not those of {path} "
                         f"(same images in the same order are required)")
    data.update(teacher_features=teacher_features.detach().to(torch.float16).cpu(),
                teacher_name=str(teacher_name), instruction=str(instruction),
                teacher_preprocess=str(preprocess),
                teacher_created=datetime.datetime.now().isoformat(timespec="seconds"))
    atomic_save(data, path)
    return data


def load_features(path: str, require_teacher: bool = True) -> dict:
    """Read and validate a feature file (see `cache_image_features`); tensors come back fp32."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"feature file {path} not found (make one with "
                                f"`python -m mpafer.expclip cache`)")
    data = safe_load(path, "feature file")
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not an Exp-CLIP feature file (it holds a {type(data).__name__})")
    missing = [k for k in ("clip_features", "paths") if k not in data]
    if missing:
        raise ValueError(f"{path} is not an Exp-CLIP feature file: missing {missing} "
                         f"(keys: {sorted(data)})")
    clip_features = data["clip_features"]
    if not isinstance(clip_features, torch.Tensor) or clip_features.dim() != 2:
        raise ValueError(f"{path}: clip_features must be a 2-d tensor [N, D]")
    n = clip_features.shape[0]
    if len(data["paths"]) != n:
        raise ValueError(f"{path}: {n} CLIP feature rows but {len(data['paths'])} image paths")
    data["clip_features"] = clip_features.float()
    if "teacher_features" in data:
        teacher = data["teacher_features"]
        if not isinstance(teacher, torch.Tensor) or teacher.dim() != 2 or teacher.shape[0] != n:
            raise ValueError(f"{path}: teacher_features has shape "
                             f"{tuple(getattr(teacher, 'shape', ()))}, but the file holds {n} "
                             f"images (expected [{n}, E])")
        data["teacher_features"] = teacher.float()
    elif require_teacher:
        raise ValueError(f"{path} has no teacher_features yet; add them with "
                         f"`python -m mpafer.expclip teacher --features {path}` "
                         f"(needs `pip install transformers` and a GPU)")
    return data


# ---------------------------------------------------------------------------------------------
# Training

def train_head(clip_features: torch.Tensor, teacher_features: torch.Tensor, epochs: int = 5,
               batch_size: int = 512, lr: float = 1e-3, momentum: float = 0.9,
               weight_decay: float = 1e-4, seed: int = 1, device: Union[str, torch.device] = "cpu",
               scale: float = LOGIT_SCALE, log: Optional[Callable[[str], None]] = print):
    """Train an Exp-CLIP head on cached features -> (head, history).

    clip_features `[N, D]`, teacher_features `[N, E]` (row i of both from image i; the head's
    output width is E). SGD(lr, momentum, weight_decay), shuffled batches with `drop_last`
    from a generator seeded with `seed` (the head's initialisation uses it too; the global RNG
    is untouched), symmetric InfoNCE (`info_nce`, s = 100) on `Z = norm(W f)`,
    `E = norm(teacher)`. history: per epoch `{"epoch", "loss", "accuracy"}`, the mean loss and
    the mean in-batch retrieval accuracy (image -> its own teacher embedding among the batch).

    N < batch_size is an error: with drop_last there would be nothing to train on, and a
    smaller batch silently changes the contrastive task (fewer negatives).
    """
    if clip_features.dim() != 2 or teacher_features.dim() != 2:
        raise ValueError(f"expected clip_features [N, D] and teacher_features [N, E], got "
                         f"{tuple(clip_features.shape)} and {tuple(teacher_features.shape)}")
    n = clip_features.shape[0]
    if teacher_features.shape[0] != n:
        raise ValueError(f"{n} CLIP feature rows but {teacher_features.shape[0]} teacher rows")
    if n < batch_size:
        raise ValueError(f"{n} training images but batch_size {batch_size}: with drop_last no "
                         f"batch would be trained; use a smaller --batch-size (at most {n})")
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own init must not move the global RNG
        head = ProjectionHead(clip_features.shape[1], teacher_features.shape[1])
    bound = 1.0 / math.sqrt(head.in_dim)  # nn.Linear's default init, drawn from our generator
    with torch.no_grad():
        head.mlp.weight.uniform_(-bound, bound, generator=generator)
    head = head.to(device).train()
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps = n // batch_size
    history = []
    for epoch in range(1, epochs + 1):
        start = time.time()
        order = torch.randperm(n, generator=generator)
        total_loss = total_acc = 0.0
        for step in range(steps):
            idx = order[step * batch_size:(step + 1) * batch_size]
            f = clip_features[idx].to(device).float()  # [B, D]
            e = F.normalize(teacher_features[idx].to(device).float(), dim=-1)  # [B, E]
            z = F.normalize(head(f), dim=-1)  # [B, E]
            loss = info_nce(z, e, scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                hits = (z @ e.t()).argmax(dim=1) == torch.arange(len(idx), device=device)
            total_loss += loss.item()
            total_acc += hits.float().mean().item()
        history.append({"epoch": epoch, "loss": total_loss / steps, "accuracy": total_acc / steps})
        if log is not None:
            log(f"epoch {epoch}/{epochs}  loss {history[-1]['loss']:.4f}  in-batch retrieval "
                f"accuracy {100 * history[-1]['accuracy']:.2f}%  ({steps} steps, "
                f"{time.time() - start:.1f}s)")
    return head.eval(), history


# ---------------------------------------------------------------------------------------------
# Command line

def _cli_cache(args):
    model, _ = clip.load(args.clip, device=args.device, download_root=args.download_root)
    data = cache_image_features(model, args.images, args.out, normalize=args.normalize,
                                batch_size=args.batch_size, num_workers=args.workers)
    print(f"wrote {args.out}: {len(data['paths'])} images, clip_features "
          f"{tuple(data['clip_features'].shape)} ({data['clip_name']}; {data['preprocess']})")


def _cli_teacher(args):
    from mpafer.expclip_teacher import extract_teacher_features
    data = load_features(args.features, require_teacher=False)
    root = args.images if args.images is not None else data.get("root", "")
    paths = [os.path.join(root, p) for p in data["paths"]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in {args.features} not found, "
                                f"first: {missing[0]} (pass the image folder with --images)")
    teacher, preprocess = extract_teacher_features(
        paths, model_name=args.model, instruction=args.instruction,
        batch_size=args.batch_size, device=args.device, normalize=args.normalize,
        num_workers=args.workers, return_preprocess=True)
    add_teacher_features(args.features, teacher, args.model, args.instruction, preprocess)
    print(f"added teacher_features {tuple(teacher.shape)} to {args.features}")


def train_head_from_file(features: str, out: str, device="cpu", log=print, **hparams) -> dict:
    """Train a head on a feature file and save it (released format + metadata sidecar).

    `hparams` are `train_head`'s (epochs, batch_size, lr, momentum, weight_decay, seed).
    Shared by `python -m mpafer.expclip train` and `train.py --method expclip`; returns the
    metadata written beside the head.
    """
    data = load_features(features)
    log(f"{features}: {data['clip_features'].shape[0]} images, CLIP {data.get('clip_name')} "
        f"features {tuple(data['clip_features'].shape)}, teacher {data.get('teacher_name')} "
        f"features {tuple(data['teacher_features'].shape)}")
    head, history = train_head(data["clip_features"], data["teacher_features"], device=device,
                               log=log, **hparams)
    metadata = {
        "format": "mpafer.expclip.head/1", "method": "expclip",
        "clip_name": data.get("clip_name"), "clip_sha256": data.get("clip_sha256"),
        "teacher_name": data.get("teacher_name"), "instruction": data.get("instruction"),
        "preprocess": data.get("preprocess"), "features_file": os.path.abspath(features),
        "num_images": int(data["clip_features"].shape[0]), "hparams": hparams, "history": history,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    save_head(head, out, metadata)
    log(f"wrote {out} (mlp.weight {tuple(head.mlp.weight.shape)}) and {head_metadata_path(out)}")
    return metadata


def _cli_train(args):
    train_head_from_file(args.features, args.out, device=args.device, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                         weight_decay=args.weight_decay, seed=args.seed)


def main(argv=None):
    from mpafer.expclip_teacher import DEFAULT_TEACHER, INSTRUCTION
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(prog="python -m mpafer.expclip", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("cache", help="cache the CLIP image features of an image folder")
    p.add_argument("--clip", required=True, help="CLIP name (e.g. ViT-B/16) or checkpoint path")
    p.add_argument("--images", required=True, help="image folder (recursive; labels ignored)")
    p.add_argument("--out", required=True, help="feature file to write (.pt)")
    p.add_argument("--normalize", action="store_true",
                   help="CLIP mean/std normalisation (off by default, as for the released heads)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default=default_device)
    p.add_argument("--download-root", default="weights")
    p.set_defaults(run=_cli_cache)

    p = sub.add_parser("teacher", help="add BLIP-2 teacher features to a feature file "
                                       "(needs `pip install transformers`)")
    p.add_argument("--features", required=True, help="feature file made by `cache`")
    p.add_argument("--images", default=None, help="image folder (default: the one cached)")
    p.add_argument("--model", default=DEFAULT_TEACHER, help="BLIP-2 model (Hugging Face name or path)")
    p.add_argument("--instruction", default=INSTRUCTION)
    p.add_argument("--normalize", action="store_true",
                   help="normalise the teacher's input (the official code fed it un-normalised)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default=default_device)
    p.set_defaults(run=_cli_teacher)

    p = sub.add_parser("train", help="train a head on a feature file")
    p.add_argument("--features", required=True)
    p.add_argument("--out", required=True, help="head file to write (.pth, the released format)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=_cli_train)

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
