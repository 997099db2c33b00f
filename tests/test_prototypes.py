"""Class prototypes: mean normalised features, seeded per-class subsets, precision, disk cache."""
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from mpafer.app.prototype_cache import cached_prototypes
from mpafer.prototypes import compute_prototypes, prototype_subset
from tests.helpers import tiny_clip

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def clip_model():
    return tiny_clip().requires_grad_(False)


def labelled_images(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % NUM_CLASSES


def hand_prototypes(clip_model, images, labels, indices):
    """Mean of the normalised features of exactly `indices`, per class, re-normalised."""
    with torch.no_grad():
        feats = F.normalize(clip_model.encode_image(images[indices]), dim=-1)
    chosen = labels[indices]
    return torch.stack([F.normalize(feats[chosen == c].mean(0), dim=0) for c in range(NUM_CLASSES)])


def test_prototypes_are_the_mean_of_normalised_features(clip_model):
    images, labels = labelled_images(14)
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    protos = compute_prototypes(clip_model, loader, NUM_CLASSES, progress=False)
    torch.testing.assert_close(protos, hand_prototypes(clip_model, images, labels, list(range(14))),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"no training images for classes \[2\]"):
        compute_prototypes(clip_model, DataLoader(TensorDataset(images[:2], labels[:2])), NUM_CLASSES, progress=False)


def test_subset_is_n_per_class_seeded_and_random():
    targets = [0] * 10 + [1] * 3 + [2] * 7
    subset = prototype_subset(targets, per_class=4, seed=5)
    assert Counter(targets[i] for i in subset) == {0: 4, 1: 3, 2: 4}  # min(N, available)
    assert subset == sorted(set(subset))
    assert prototype_subset(targets, 4, seed=5) == subset
    draws = {tuple(prototype_subset(targets, 4, seed=s)) for s in range(6)}
    assert len(draws) > 1
    # Not simply the first N images of each class, for most seeds.
    first = [0, 1, 2, 3, 10, 11, 12, 13, 14, 15, 16]
    assert sum(list(d) != first for d in draws) >= len(draws) - 1
    with pytest.raises(ValueError, match="per_class must be >= 1"):
        prototype_subset(targets, 0)


class CountingDataset(Dataset):
    """Images with `targets`, recording which indices were loaded."""

    def __init__(self, images, labels):
        self.images, self.targets, self.loaded = images, labels.tolist(), []

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        self.loaded.append(i)
        return self.images[i], self.targets[i]


def test_per_class_uses_exactly_the_seeded_subset(clip_model):
    images, labels = labelled_images(30)
    dataset = CountingDataset(images, labels)
    loader = DataLoader(dataset, batch_size=4)
    protos = compute_prototypes(clip_model, loader, NUM_CLASSES, per_class=3, progress=False, seed=7)
    chosen = prototype_subset(dataset.targets, 3, seed=7)
    assert sorted(dataset.loaded) == chosen  # only those images were loaded
    torch.testing.assert_close(protos, hand_prototypes(clip_model, images, labels, chosen), rtol=1e-5, atol=1e-6)
    other = compute_prototypes(clip_model, loader, NUM_CLASSES, per_class=3, progress=False, seed=8)
    assert not torch.allclose(protos, other)
    # A TensorDataset works too (its labels are the last tensor).
    tensors = DataLoader(TensorDataset(images, labels), batch_size=8)
    torch.testing.assert_close(compute_prototypes(clip_model, tensors, NUM_CLASSES, per_class=3, progress=False, seed=7),
                               protos, rtol=1e-5, atol=1e-6)


def test_precision_is_fp32_unless_asked(clip_model):
    images, labels = labelled_images(6)
    loader = DataLoader(TensorDataset(images, labels), batch_size=6)
    fp32 = compute_prototypes(clip_model, loader, NUM_CLASSES, progress=False)
    torch.testing.assert_close(fp32, hand_prototypes(clip_model, images, labels, list(range(6))), rtol=1e-5, atol=1e-6)
    bf16 = compute_prototypes(clip_model, loader, NUM_CLASSES, progress=False, amp_dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    torch.testing.assert_close(bf16, fp32, rtol=0, atol=0.05)


def test_cache_is_keyed_by_its_fields(tmp_path):
    protos, calls = torch.randn(NUM_CLASSES, 32), []
    compute = lambda: calls.append(1) or protos  # noqa: E731
    key = {"clip_sha256": "abc", "dataset": "rafdb", "split": "train", "transform": "Resize(32)",
           "per_class": 3, "seed": 0}
    first = cached_prototypes(str(tmp_path), key, compute, log=lambda m: None)
    again = cached_prototypes(str(tmp_path), key, compute, log=lambda m: None)
    assert torch.equal(first, again) and len(calls) == 1
    cached_prototypes(str(tmp_path), {**key, "seed": 1}, compute, log=lambda m: None)
    cached_prototypes(str(tmp_path), {**key, "split": "test"}, compute, log=lambda m: None)
    assert len(calls) == 3


def test_the_cache_key_follows_what_changes_the_features(tmp_path, clip_model):
    """The key covers the preprocessing's parameters, the files' sizes and modification times
    (re-aligned images under the same names), and the demo's face renderer."""
    from mpafer.app.demo import demo_datasets
    from mpafer.app.prototype_cache import prototype_key_fields
    from mpafer.app.synthetic import RENDERER_VERSION
    from mpafer.data import RAFDB
    from mpafer.model import MPAFER, MPAFERConfig
    from tests.dataset_writers import write_synthetic_rafdb

    model = MPAFER(clip_model, ["surprise", "fear", "disgust", "happiness", "sadness", "anger",
                                "neutral"], config=MPAFERConfig(soft_hard_alignment=False))
    root = write_synthetic_rafdb(tmp_path / "raf", 2, 1)

    def key(resolution=32, dataset=None):
        return prototype_key_fields(model, dataset or RAFDB(str(root), "train"), resolution,
                                    "rafdb", str(root), None, 1, None)

    before = key()
    assert before == key()  # stable
    assert {"step": "Resize", "size": 32, "interpolation": "bicubic", "antialias": True,
            "max_size": None} in before["transform"]
    assert key(resolution=48)["transform"] != before["transform"]
    image = RAFDB(str(root), "train").image_path(0)
    with open(image, "rb") as f:
        data = f.read()
    with open(image, "wb") as f:  # the same name, the same labels, a re-saved file
        f.write(data + b"\0")
    changed = key()
    assert changed["items_sha256"] == before["items_sha256"]
    assert changed["files_sha256"] != before["files_sha256"]
    demo = prototype_key_fields(model, demo_datasets(2, 1)[0], 32,
                                "synthetic-demo", "", None, 1, None)
    assert demo["renderer"] == RENDERER_VERSION and demo["files_sha256"] is None
