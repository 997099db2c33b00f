"""Exp-CLIP feature files: the frozen CLIP's and teacher's features of unlabelled faces."""
import datetime
import os
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset

from ..clip.loading import safe_load
from ..data import IMAGE_EXTENSIONS, load_image, unreadable_images
from ..data.transforms import describe_expclip_transform, expclip_transform
from ..files import atomic_save
from ..precision import autocast, resolve_amp
from ..progress import counted, progress_bar

FEATURES_FORMAT = "mpafer.expclip.features/1"


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
    """Images by path: `transform(RGB PIL image)`."""

    def __init__(self, paths: Sequence[str], transform: Callable, root: str = ""):
        self.paths, self.transform, self.root = list(paths), transform, root

    def __len__(self):
        return len(self.paths)

    def load(self, i):
        """The RGB PIL image of file `i`, untransformed."""
        return load_image(os.path.join(self.root, self.paths[i]))

    def __getitem__(self, i):
        return self.transform(self.load(i))


def readable_only(root: str, paths: Sequence[str], skip_bad_images: bool = False,
                  workers: int = 4) -> List[str]:
    """`paths` (relative to `root`), every one checked to decode first, so that one bad file is
    one line before anything runs: an error naming it, or with `skip_bad_images` the readable
    ones only, with a note of how many were left out."""
    bad = unreadable_images(ImageFiles(paths, None, root), workers)
    if not bad:
        return list(paths)
    if not skip_bad_images:
        raise ValueError(f"{len(bad)} of {counted(len(paths), 'image')} cannot be read, first: "
                         f"{bad[0][1]}; replace them, or leave unreadable images out with "
                         "--skip-bad-images (skip_bad_images=True in Python)")
    left_out = {index for index, _ in bad}
    print(f"note: skipping {len(bad)} unreadable image(s) of {len(paths)}, first: {bad[0][1]}")
    return [p for i, p in enumerate(paths) if i not in left_out]


@torch.no_grad()
def cache_image_features(clip_model, images: Union[str, Sequence[str]], out_path: str,
                         transform: Optional[Callable] = None, normalize: bool = False,
                         batch_size: int = 128, num_workers: int = 4,
                         device: Optional[Union[str, torch.device]] = None,
                         progress: bool = True, skip_bad_images: bool = False) -> dict:
    """Write (and return) a feature file of every image (a folder, searched recursively, or a
    list of paths): `clip_features` fp32 `[N, D]`, `paths` (relative to `root` for a folder),
    `skipped` (unreadable files left out with `skip_bad_images`; without it, one is an error
    naming it), `root`, the CLIP's name, SHA-256 and activation, `preprocess`, `created`,
    `format`."""
    device = torch.device(device) if device is not None else clip_model.logit_scale.device
    clip_model = clip_model.to(device)
    resolution = clip_model.visual.input_resolution
    preprocess = (repr(transform) if transform is not None
                  else describe_expclip_transform(resolution, normalize))
    transform = transform or expclip_transform(resolution, normalize=normalize)
    if isinstance(images, (str, os.PathLike)):
        root, listed = os.path.abspath(images), list_images(images)
    else:
        root, listed = "", [str(p) for p in images]
        if not listed:
            raise ValueError("no image paths given")
        missing = [p for p in listed if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image file(s) not found, first: "
                                    f"{missing[0]}")
    paths = readable_only(root, listed, skip_bad_images, num_workers)
    kept = set(paths)
    loader = DataLoader(ImageFiles(paths, transform, root), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    features = []
    for batch in progress_bar(loader, desc="CLIP image features", unit="batch",
                              disable=not progress):
        with autocast(device, resolve_amp("auto", device)):
            features.append(clip_model.encode_image(batch.to(device, non_blocking=True))
                            .float().cpu())
    data = {
        "format": FEATURES_FORMAT,
        "clip_features": torch.cat(features),  # [N, D]
        "paths": paths,
        "skipped": [p for p in listed if p not in kept],
        "root": root,
        "clip_name": clip_model.checkpoint_name or "",
        "clip_sha256": clip_model.checkpoint_sha256 or "",
        "clip_activation": clip_model.activation,
        "preprocess": preprocess,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    atomic_save(data, out_path)
    return data


def add_teacher_features(path: str, teacher_features: torch.Tensor, teacher_name: str,
                         instruction: str, preprocess: str = "",
                         paths: Optional[Sequence[str]] = None) -> dict:
    """Add `teacher_features [N, E]` to the feature file `path`, as fp16 (bf16 unit vectors)."""
    data = load_features(path, require_teacher=False)
    n = data["clip_features"].shape[0]
    if teacher_features.dim() != 2 or teacher_features.shape[0] != n:
        raise ValueError(f"{path} holds {counted(n, 'image')} but the teacher features have shape "
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
        raise ValueError(f"{path} is not an Exp-CLIP feature file (it holds a "
                         f"{type(data).__name__})")
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
