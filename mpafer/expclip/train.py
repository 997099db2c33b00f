"""Training an Exp-CLIP head on a feature file: the symmetric InfoNCE loss and plain SGD."""
import datetime
import math
import os
import time
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from ..progress import counted
from .features import load_features
from .head import LOGIT_SCALE, ProjectionHead, head_metadata_path, save_head


def info_nce(z: torch.Tensor, e: torch.Tensor, scale: float = LOGIT_SCALE) -> torch.Tensor:
    """Symmetric InfoNCE of Exp-CLIP (the paper's training loss):

        L = 1/2 CE(s * Z E^T, I) + 1/2 CE(s * E Z^T, I)

    z `[N, E]`: projected CLIP image features `Z = norm(W f_I(x))`; e `[N, E]`: teacher
    embeddings of the same images, both already L2-normalised (the equation as written).
    """
    logits = scale * z @ e.t()  # [N, N]: image i vs teacher j
    target = torch.arange(z.shape[0], device=z.device)
    return 0.5 * F.cross_entropy(logits, target) + 0.5 * F.cross_entropy(logits.t(), target)


def train_head(clip_features: torch.Tensor, teacher_features: torch.Tensor, epochs: int = 5,
               batch_size: int = 512, lr: float = 1e-3, momentum: float = 0.9,
               weight_decay: float = 1e-4, seed: int = 1, device: Union[str, torch.device] = "cpu",
               scale: float = LOGIT_SCALE, log: Optional[Callable[[str], None]] = print):
    """SGD on `info_nce(norm(W f), norm(teacher))` over clip_features `[N, D]`, teacher_features
    `[N, E]` -> (head, per-epoch history). N < batch_size is an error: a smaller batch would
    silently change the contrastive task (fewer negatives)."""
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
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum,
                                weight_decay=weight_decay)
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
                f"accuracy {100 * history[-1]['accuracy']:.2f}%  ({counted(steps, 'step')}, "
                f"{time.time() - start:.1f}s)")
    return head.eval(), history


def train_head_from_file(features: str, out: str, device="cpu", log=print, **hparams) -> dict:
    """`python -m mpafer.expclip train`: `train_head` on a feature file, saved; -> metadata. A
    batch larger than the file's images shrinks to all of them, with a note."""
    data = load_features(features)
    num_images = data["clip_features"].shape[0]
    log(f"{features}: {counted(num_images, 'image')}, CLIP {data.get('clip_name')} "
        f"features {tuple(data['clip_features'].shape)}, teacher {data.get('teacher_name')} "
        f"features {tuple(data['teacher_features'].shape)}")
    batch_size = hparams.get("batch_size", 512)
    if batch_size > num_images:  # a small set: one batch of all of it, as MPA-FER's batch shrinks
        log(f"note: {features} holds {counted(num_images, 'image')}, fewer than --batch-size "
            f"{batch_size}; training with batches of {num_images} (fewer negatives per batch "
            "than the recipe's)")
        hparams["batch_size"] = num_images
    head, history = train_head(data["clip_features"], data["teacher_features"], device=device,
                               log=log, **hparams)
    metadata = {
        "format": "mpafer.expclip.head/1", "method": "expclip",
        "clip_name": data.get("clip_name"), "clip_sha256": data.get("clip_sha256"),
        "clip_activation": data.get("clip_activation") or "quick_gelu",
        "teacher_name": data.get("teacher_name"), "instruction": data.get("instruction"),
        "preprocess": data.get("preprocess"), "features_file": os.path.abspath(features),
        "num_images": int(data["clip_features"].shape[0]), "hparams": hparams, "history": history,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    save_head(head, out, metadata)
    log(f"wrote {out} (mlp.weight {tuple(head.mlp.weight.shape)}) and {head_metadata_path(out)}")
    return metadata
