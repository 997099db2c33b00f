"""The built-in demo: synthetic faces and a tiny CLIP, so `train.py --demo` needs no downloads.

The tiny CLIP is pre-trained once (then cached) on "web" faces captioned in everyday words,
never the label words; MPA-FER trains on aligned grey "portrait" crops. So the prompts have a
vocabulary gap and a domain gap to close, as on real FER data. (Prompts alone cannot teach a
random CLIP to see, hence the pre-training.)
"""
import os
import time
from typing import Dict

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..clip.loading import activation_record_path, recorded_activation
from ..clip.model import CLIP
from ..clip.tokenizer import tokenize
from ..data import train_transform
from ..files import atomic_save, atomic_write_json
from ..prompts import crop_to_longest
from .synthetic import (
    CAPTION_TEMPLATES,
    CAPTION_WORDS,
    SYNTHETIC_CLASSES,
    SyntheticFaces,
    face_captions,
)

# Small enough to train in a minute on a CPU; the same code path as ViT-B/16.
DEMO_CLIP_CONFIG = dict(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=64,
                        vision_patch_size=8, context_length=77, vocab_size=49408,
                        transformer_width=64, transformer_heads=1, transformer_layers=2)
DEMO_CLIP_FILE = "demo-tiny-clip-v2.pt"  # v2: web-style faces, everyday-word captions
PRETRAIN_SEED = 1000  # seed stream of the pre-training faces (MPA-FER's demo uses seed 0)
PRETRAIN_PER_CLASS = 300
FACE_SIZE = 64  # synthetic faces are drawn at 64 px, then resized to the CLIP resolution

class Prerendered(Dataset):
    """Every face of a `SyntheticFaces`, drawn once and kept in memory, so the demo needs no
    DataLoader workers (which on few cores only compete with training)."""

    def __init__(self, faces: SyntheticFaces, transform=None, classnames=None):
        self.images = [faces.load(i) for i in range(len(faces))]
        self.targets, self.classnames = list(faces.targets), tuple(classnames or faces.classnames)
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def class_counts(self):
        return [self.targets.count(c) for c in range(len(self.classnames))]

    def __getitem__(self, index):
        image = self.images[index]
        return (self.transform(image) if self.transform else image), self.targets[index]


# The demo classes' words: the FER labels, which the demo CLIP never saw, or the mood words of
# its captions, which it has seen, so it can score classes no prompt was trained on (novel).
DEMO_CLASS_WORDS = {"labels": tuple(SYNTHETIC_CLASSES),
                    "moods": tuple(CAPTION_WORDS[c][0] for c in SYNTHETIC_CLASSES)}


def demo_datasets(num_train: int = 200, num_test: int = 60, seed: int = 0,
                  words: str = "labels"):
    """Portrait train and test faces, classes named by `words`; set `.transform` later."""
    names = DEMO_CLASS_WORDS[words]
    return tuple(Prerendered(SyntheticFaces(split, n, FACE_SIZE, seed, style="portrait"),
                             classnames=names)
                 for split, n in (("train", num_train), ("test", num_test)))


def description_aliases(words: str) -> Dict[str, str]:
    """{demo class word: the FER label whose LLM descriptions it takes} for `words`."""
    return dict(zip(DEMO_CLASS_WORDS[words], SYNTHETIC_CLASSES))


def pretrain_demo_clip(path: str, steps: int = 600, batch_size: int = 64, lr: float = 1e-3,
                       seed: int = 0, log=print) -> str:
    """Pre-train the tiny demo CLIP with image->text cross-entropy against each expression's
    caption ensemble (one random caption per step left both towers at chance), and save it.
    The caller's RNG state is restored, so prompts initialise as when the file is cached."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(**DEMO_CLIP_CONFIG)
        log(f"demo: pre-training a tiny CLIP on web-style synthetic faces and their captions "
            f"({steps} steps, under a minute; cached in {path} for later runs)")
        # One thread: with more, sums are taken in another order and give another CLIP, and
        # the demo's numbers would depend on the machine's thread count.
        torch.set_num_threads(1)
        try:
            _contrastive_pretraining(model, steps, batch_size, lr,
                                     torch.Generator().manual_seed(seed), log)
        finally:
            torch.set_num_threads(threads)
    atomic_save(model.state_dict(), path)
    return path


def _contrastive_pretraining(model: CLIP, steps: int, batch_size: int, lr: float, generator, log):
    faces = Prerendered(SyntheticFaces("train", PRETRAIN_PER_CLASS, FACE_SIZE, PRETRAIN_SEED,
                                       style="web"),
                        train_transform(model.visual.input_resolution))
    num_classes, num_captions = len(SYNTHETIC_CLASSES), len(CAPTION_TEMPLATES)
    captions = [c for name in SYNTHETIC_CLASSES for c in face_captions(name)]  # class-major
    tokens = crop_to_longest(tokenize(captions)).contiguous()  # [C*P, L]
    eot = tokens.argmax(dim=-1)  # [C*P]
    # The caption words' embeddings learn as offsets, added to the table at the end: an
    # update of the whole 49,408-row table would dominate the step. (F.embedding, not
    # offsets[rows]: its backward is deterministic on multi-threaded CPUs, indexing's is not.)
    words = tokens.unique()  # [V]
    offsets = torch.nn.Parameter(torch.zeros(len(words),
                                             model.token_embedding.embedding_dim))  # [V, W]
    rows = torch.searchsorted(words, tokens)  # [C*P, L]: each token's row of `offsets`
    model.token_embedding.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad] + [offsets]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps,
                                                   pct_start=0.1)
    start = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(len(faces), (batch_size,), generator=generator)
        batch = [faces[i] for i in idx.tolist()]
        images = torch.stack([b[0] for b in batch])  # [B, 3, R, R]
        labels = torch.tensor([b[1] for b in batch])
        embedded = model.token_embedding(tokens) + F.embedding(rows, offsets)  # [C*P, L, W]
        text = F.normalize(model.encode_text_embeddings(embedded, eot), dim=-1)  # [C*P, D]
        # An expression's text feature is the mean over its captions (a prompt ensemble).
        text = F.normalize(text.view(num_classes, num_captions, -1).mean(1), dim=-1)  # [C, D]
        image = F.normalize(model.encode_image(images), dim=-1)  # [B, D]
        loss = F.cross_entropy(model.logit_scale.exp() * image @ text.t(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            log(f"  step {step}/{steps}  loss {loss.item():.3f}  ({time.time() - start:.0f}s)")
    with torch.no_grad():
        model.token_embedding.weight[words] += offsets


def demo_clip_path(download_root: str = "weights", log=print) -> str:
    """The cached demo CLIP (pre-trained first if missing), its QuickGELU recorded beside it."""
    path = os.path.join(download_root, DEMO_CLIP_FILE)
    if not os.path.isfile(path):
        pretrain_demo_clip(path, log=log)
    if recorded_activation(path) is None:  # (a file cached before the record was written)
        # Beside the file, which stays as it is: checkpoints name it by its SHA-256.
        atomic_write_json({"activation": "quick_gelu"}, activation_record_path(path))
    return path
