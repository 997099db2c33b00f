"""The built-in demo: synthetic faces and a tiny CLIP, so `train.py --demo` needs no downloads.

A randomly initialised CLIP knows nothing, and prompts alone cannot teach a frozen random
network to see (we measured chance-level accuracy), so the demo first gives a tiny CLIP a
short contrastive pre-training on synthetic face/caption pairs. That takes about a minute on
two CPU cores and is cached in `weights/` (an OpenAI-format state dict, loaded by
`mpafer.clip.load` like any real checkpoint). The pre-training faces come from their own seed
stream, disjoint from the faces MPA-FER later trains and is tested on.
"""
import os
import random
import time

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .clip.model import CLIP
from .clip.tokenizer import tokenize
from .data import train_transform
from .prompts import crop_to_longest
from .synthetic import SYNTHETIC_CLASSES, SyntheticFaces
from .utils import atomic_save

# Small enough to train in a minute on a CPU; the same code path as ViT-B/16.
DEMO_CLIP_CONFIG = dict(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=64,
                        vision_patch_size=8, context_length=77, vocab_size=49408,
                        transformer_width=64, transformer_heads=1, transformer_layers=2)
DEMO_CLIP_FILE = "demo-tiny-clip-v1.pt"
PRETRAIN_SEED = 1000  # seed stream of the pre-training faces (MPA-FER's demo uses seed 0)
CAPTION_TEMPLATES = ("a photo of a {} face.", "a face showing {}.", "{}.", "a drawing of {}.",
                     "an expression of {}.")
FACE_SIZE = 64  # synthetic faces are drawn at 64 px, then resized to the CLIP resolution


class Prerendered(Dataset):
    """Draws every face of a `SyntheticFaces` once and keeps the images in memory.

    Drawing costs ~2 ms an image; the demo's transforms then run in the main process without
    DataLoader workers (which on two cores only compete with training).
    """

    def __init__(self, faces: SyntheticFaces, transform=None):
        self.images = [faces.load(i) for i in range(len(faces))]
        self.targets, self.classnames = list(faces.targets), faces.classnames
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def class_counts(self):
        return [self.targets.count(c) for c in range(len(self.classnames))]

    def __getitem__(self, index):
        image = self.images[index]
        return (self.transform(image) if self.transform else image), self.targets[index]


def demo_datasets(resolution: int, train_transform_, eval_transform_, num_train: int = 200,
                  num_test: int = 60, seed: int = 0):
    """Synthetic train and test faces of the 7 basic expressions, pre-rendered."""
    train = Prerendered(SyntheticFaces("train", num_train, FACE_SIZE, seed), train_transform_)
    test = Prerendered(SyntheticFaces("test", num_test, FACE_SIZE, seed), eval_transform_)
    return train, test


def pretrain_demo_clip(path: str, steps: int = 600, batch_size: int = 64, lr: float = 1e-3,
                       seed: int = 0, log=print) -> str:
    """Contrastively pre-train the tiny demo CLIP on synthetic faces and captions; save it.

    Each step pairs a batch of faces with the captions of the 7 classes (one random template
    per step) and trains image->caption cross-entropy, as CLIP's loss does with the captions
    as candidates. The token embedding table stays at its random initialisation (the
    random rows already tell the words apart, and updating 49,408 rows dominates a step).
    """
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = CLIP(**DEMO_CLIP_CONFIG)
    model.token_embedding.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    faces = Prerendered(SyntheticFaces("train", 300, FACE_SIZE, PRETRAIN_SEED),
                        train_transform(model.visual.input_resolution))
    captions = [crop_to_longest(tokenize([t.format(c) for c in SYNTHETIC_CLASSES])) for t in CAPTION_TEMPLATES]
    log(f"demo: pre-training a tiny CLIP on synthetic face/caption pairs ({steps} steps, about a minute; "
        f"cached in {path} for later runs)")
    start = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(len(faces), (batch_size,), generator=generator)
        batch = [faces[i] for i in idx.tolist()]
        images = torch.stack([b[0] for b in batch])  # [B, 3, R, R]
        labels = torch.tensor([b[1] for b in batch])
        image = F.normalize(model.encode_image(images), dim=-1)
        text = F.normalize(model.encode_text(captions[rng.randrange(len(captions))]), dim=-1)
        loss = F.cross_entropy(model.logit_scale.exp() * image @ text.t(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            log(f"  step {step}/{steps}  loss {loss.item():.3f}  ({time.time() - start:.0f}s)")
    atomic_save(model.state_dict(), path)
    return path


def demo_clip_path(download_root: str = "weights", log=print) -> str:
    """The cached pre-trained demo CLIP, pre-training it first if it is not there yet."""
    path = os.path.join(download_root, DEMO_CLIP_FILE)
    if not os.path.isfile(path):
        pretrain_demo_clip(path, log=log)
    return path
