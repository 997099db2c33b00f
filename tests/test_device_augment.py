"""uint8 pixels from the workers, normalisation and random erasing on the device: the same numbers
as torchvision's float path, the same erasing distribution as torchvision's RandomErasing, and
reproducible from an explicit generator. References are built here from torchvision directly."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from mpafer.app.engine import predict
from mpafer.data import (
    TrainBatchAugment,
    as_model_input,
    eval_transform,
    normalize_on_device,
    random_erasing_on_device,
    train_transform,
)
from mpafer.prototypes import compute_prototypes
from tests.helpers import tiny_clip

MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel statistics, written out
STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = T.InterpolationMode.BICUBIC


def photo(seed, size=(100, 100), mode="RGB"):
    """A noisy picture: every crop and resize changes its pixels."""
    channels = 3 if mode == "RGB" else 1
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode)


def reference_train(resolution):
    """The float path with erasing off: crop, flip, ToTensor, Normalize."""
    return T.Compose([lambda im: im.convert("RGB"),
                      T.RandomResizedCrop(resolution, scale=(0.8, 1.0), interpolation=BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])


def reference_eval(resolution):
    return T.Compose([T.Resize(resolution, interpolation=BICUBIC), T.CenterCrop(resolution),
                      lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(MEAN, STD)])


@pytest.mark.parametrize("size,mode", [((100, 100), "RGB"), ((48, 48), "L"), ((90, 120), "RGB")])
def test_uint8_train_crops_normalised_on_the_device_equal_the_float_path(size, mode):
    pixels_tf, reference = train_transform(32, uint8=True), reference_train(32)
    images = [photo(seed, size, mode).convert("RGB") for seed in range(6)]
    pixels, expected = [], []
    for i, image in enumerate(images):
        torch.manual_seed(100 + i)  # the same crop and flip on both paths
        pixels.append(pixels_tf(image))
        torch.manual_seed(100 + i)
        expected.append(reference(image))
    batch = torch.stack(pixels)  # [B, 3, 32, 32]
    assert batch.dtype == torch.uint8 and batch.shape == (6, 3, 32, 32)
    assert torch.equal(normalize_on_device(batch), torch.stack(expected))  # bit for bit
    assert not torch.equal(pixels[0], pixels[1])  # the crops really differ


def test_uint8_eval_normalised_on_the_device_equals_clip_preprocessing():
    images = [photo(seed, (100, 80)) for seed in range(4)] + [photo(9, (48, 48), "L")]
    batch = torch.stack([eval_transform(24, uint8=True)(im) for im in images])  # [B, 3, 24, 24]
    expected = torch.stack([reference_eval(24)(im) for im in images])
    assert torch.equal(normalize_on_device(batch), expected)
    assert torch.equal(normalize_on_device(batch), torch.stack([eval_transform(24)(im)
                                                                for im in images]))


def test_uint8_transforms_pickle_and_as_model_input():
    for make in (train_transform, eval_transform):
        transform = pickle.loads(pickle.dumps(make(16, uint8=True)))  # spawn workers pickle them
        x = transform(photo(0))
        assert x.shape == (3, 16, 16) and x.dtype == torch.uint8
    floats = torch.randn(2, 3, 4, 4)
    assert as_model_input(floats) is floats  # already preprocessed: untouched
    white = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert as_model_input(white)[0, :, 0, 0].tolist() == pytest.approx(
        [(1 - m) / s for m, s in zip(MEAN, STD)], rel=1e-6)
    with pytest.raises(ValueError, match="uint8 images"):
        normalize_on_device(floats)


def erased_boxes(images):
    """(erased?, top, left, h, w) of the zero box in each image of ones [N, C, H, W]."""
    zero = (images == 0).all(dim=1)  # [N, H, W]
    rows, cols = zero.any(dim=2), zero.any(dim=1)  # [N, H], [N, W]
    erased = rows.any(dim=1)
    h, w = rows.sum(dim=1), cols.sum(dim=1)
    top, left = rows.float().argmax(dim=1), cols.float().argmax(dim=1)
    assert torch.equal(zero.sum(dim=(1, 2)), h * w)  # one rectangle per image, nothing else
    return erased, top, left, h, w


def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov distance between integer samples."""
    values = torch.cat([a, b]).unique()
    cdf_a = (a[:, None] <= values).float().mean(0)
    cdf_b = (b[:, None] <= values).float().mean(0)
    return (cdf_a - cdf_b).abs().max().item()


@pytest.mark.parametrize("height,width", [(20, 30), (2, 40)])
def test_device_erasing_follows_torchvision_random_erasing(height, width):
    n = 8000
    torch.manual_seed(0)
    erase = T.RandomErasing(p=0.25)  # defaults: scale (0.02, 0.33), ratio (0.3, 3.3)
    theirs = torch.stack([erase(torch.ones(3, height, width)) for _ in range(n)])
    ours = random_erasing_on_device(torch.ones(n, 3, height, width), 0.25,
                                    torch.Generator().manual_seed(0))
    a, b = erased_boxes(theirs), erased_boxes(ours)
    rate_a, rate_b = a[0].float().mean().item(), b[0].float().mean().item()
    assert abs(rate_a - rate_b) < 4 * (2 * 0.25 * 0.75 / n) ** 0.5  # about 4 standard errors
    if height == 2:  # a flat strip: most boxes do not fit and the image is left alone
        assert rate_a < 0.15
        return
    assert 0.2 < rate_a < 0.26
    bound = 1.95 * (2 / (rate_a * n)) ** 0.5  # KS critical distance at the 0.1% level
    for i, name in ((1, "top"), (2, "left"), (3, "height"), (4, "width")):
        assert ks_statistic(a[i][a[0]], b[i][b[0]]) < bound, name
    area_a = (a[3] * a[4])[a[0]].float().mean() / (height * width)
    area_b = (b[3] * b[4])[b[0]].float().mean() / (height * width)
    assert abs(area_a - area_b) < 0.01


def test_device_erasing_is_reproducible_per_generator_seed_and_per_image():
    images = torch.randn(64, 3, 16, 16)
    once = random_erasing_on_device(images, 0.5, torch.Generator().manual_seed(7))
    again = random_erasing_on_device(images, 0.5, torch.Generator().manual_seed(7))
    other = random_erasing_on_device(images, 0.5, torch.Generator().manual_seed(8))
    assert torch.equal(once, again) and not torch.equal(once, other)
    changed = once != images  # [B, 3, H, W]
    assert torch.equal(changed.any(1), (once == 0).all(1) & changed.any(1))  # erased to 0
    masks = changed.any(1).flatten(1)  # [B, H*W]
    assert 16 < masks.any(1).sum() < 48  # about half the images, each its own box
    assert len({tuple(m.nonzero().flatten().tolist()) for m in masks if m.any()}) > 10
    assert torch.equal(random_erasing_on_device(images, 0.0), images)


def test_train_batch_augment_depends_only_on_seed_epoch_step_and_rank():
    batch = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    augment = TrainBatchAugment(torch.device("cpu"), seed=1)
    first = augment(batch, epoch=2, step=5)
    augment(batch, epoch=0, step=1)  # whatever ran in between
    assert torch.equal(TrainBatchAugment(torch.device("cpu"), seed=1)(batch, 2, 5), first)
    assert torch.equal(augment(batch, 2, 5), first)
    for other in (augment(batch, 2, 6), augment(batch, 3, 5),
                  TrainBatchAugment(torch.device("cpu"), seed=2)(batch, 2, 5),
                  TrainBatchAugment(torch.device("cpu"), seed=1, rank=1)(batch, 2, 5)):
        assert not torch.equal(other, first)
    unerased = first == normalize_on_device(batch)
    assert unerased.float().mean() > 0.8 and (first[~unerased] == 0).all()


class Pixels(Dataset):
    """The same few pictures through a given transform, labelled 0, 1, 2, ..."""

    def __init__(self, transform):
        self.images, self.transform = [photo(seed, (60, 50)) for seed in range(10)], transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(self.images[index]), index % 3


def test_predict_and_prototypes_take_uint8_batches():
    model = tiny_clip(seed=0).eval()
    pixels, floats = Pixels(eval_transform(32, uint8=True)), Pixels(reference_eval(32))
    head = torch.randn(model.embed_dim, 3, generator=torch.Generator().manual_seed(0))
    logits = lambda x: model.encode_image(x) @ head  # noqa: E731
    preds_u8, _ = predict(logits, pixels, torch.device("cpu"), batch_size=4, progress=False)
    preds_f, _ = predict(logits, floats, torch.device("cpu"), batch_size=4, progress=False)
    assert torch.equal(preds_u8, preds_f) and len(set(preds_f.tolist())) > 1
    protos_u8 = compute_prototypes(model, DataLoader(pixels, batch_size=4), 3, progress=False)
    protos_f = compute_prototypes(model, DataLoader(floats, batch_size=4), 3, progress=False)
    torch.testing.assert_close(protos_u8, protos_f, rtol=0, atol=0)
