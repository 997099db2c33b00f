"""The CUDA tier, in process: the vendored CLIP on the device, `engine.train_step` under bf16
and fp16, host-device synchronisations, and peak memory. See tests/cuda_checks.py for how they
are selected (-m cuda), skipped without CUDA, and checked on a CPU.

Models are CLIPs with random weights (nothing downloaded): OpenAI's ViT-B/16 and ViT-L/14 shapes
where the numbers depend on the size, the tiny shape where only the behaviour matters.
"""
import copy
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from mpafer import clip
from mpafer.app.bench import speed
from mpafer.app.engine import build_mpafer, evaluate, predict, train_step, trainable_parameters
from mpafer.data import TrainBatchAugment
from mpafer.labels import BASIC_CLASSES
from mpafer.precision import autocast, grad_scaler, resolve_amp
from mpafer.prompts import load_descriptions
from tests.cuda_checks import (
    DEVICE,
    ON_CUDA,
    TIER,
    cuda_only,
    exact_fp32,
    host_syncs,
    no_host_syncs,
    record_figure,
    relative_error,
)
from tests.helpers import tiny_clip, tiny_state_dict

pytestmark = TIER
CLASSES = list(BASIC_CLASSES)
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
GB = 1e9


# -- the vendored CLIP ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def vit_b16():
    """A ViT-B/16 CLIP with random weights, on the CPU, with the inputs of the prompted paths
    MPA-FER runs: images, 8 visual prompt tokens per layer, two tokenised texts."""
    model = speed.random_clip("ViT-B/16")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 224, 224, generator=g)
    prompts = [0.02 * torch.randn(8, 768, generator=g) for _ in range(12)]
    texts = clip.tokenize(["a photo of a happy face.", "a face with brows raised high"])
    return model, images, prompts, texts


def clip_features(model, images, prompts, texts):
    """(global image features, patch features, text features) of the prompted paths."""
    device = model.logit_scale.device
    with torch.no_grad():
        image, patches = model.encode_image(images.to(device), [p.to(device) for p in prompts],
                                            return_tokens=True)
        return image, patches, model.encode_text(texts.to(device))


def test_clip_fp32_on_the_device_matches_the_cpu(vit_b16):
    model, images, prompts, texts = vit_b16
    with exact_fp32():
        expected = clip_features(model, images, prompts, texts)
        got = clip_features(copy.deepcopy(model).to(DEVICE), images, prompts, texts)
    for name, g, e in zip(("image", "patches", "text"), got, expected):
        assert g.device.type == DEVICE.type and g.dtype == torch.float32
        assert relative_error(g, e) <= 1e-4, name


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_clip_autocast_features_stay_close_to_fp32_and_weights_stay_fp32(vit_b16, precision):
    model, images, prompts, texts = vit_b16
    model = copy.deepcopy(model).to(DEVICE)
    with exact_fp32():
        reference = clip_features(model, images, prompts, texts)
    with autocast(DEVICE, AUTOCAST[precision]):
        mixed = clip_features(model, images, prompts, texts)
    for name, m, r in zip(("image", "patches", "text"), mixed, reference):
        assert m.dtype == AUTOCAST[precision], name  # autocast did run the products
        cosine = F.cosine_similarity(m.float(), r, dim=-1)
        assert cosine.min().item() >= 0.999, f"{name}: {cosine.min().item():.5f}"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())


def test_clip_load_onto_the_device(tmp_path):
    path = tmp_path / "tiny-clip.pt"
    torch.save(tiny_state_dict(seed=3), path)
    model, preprocess = clip.load(str(path), device=str(DEVICE))
    assert {p.device.type for p in model.parameters()} == {DEVICE.type}
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    assert not model.training and model.checkpoint_sha256
    on_cpu, _ = clip.load(str(path), device="cpu")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with exact_fp32(), torch.no_grad():
        got = model.encode_image(images.to(DEVICE))
        expected = on_cpu.encode_image(images)
    assert relative_error(got, expected) <= 1e-4


# -- one training step -------------------------------------------------------------------------

def tiny_training(seed: int = 0, batch: int = 14):
    """MPA-FER on a tiny random CLIP on the device, its optimiser (train.py's SGD) and a fixed
    batch to learn: (model, optimizer, images, labels)."""
    g = torch.Generator().manual_seed(seed)
    model = build_mpafer(tiny_clip(seed).to(DEVICE), CLASSES, load_descriptions(CLASSES))
    model.set_prototypes(torch.randn(len(CLASSES), model.clip.embed_dim, generator=g))
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=0.032, momentum=0.9,
                                weight_decay=5e-4)
    images = torch.randn(batch, 3, 32, 32, generator=g).to(DEVICE)
    labels = (torch.arange(batch) % len(CLASSES)).to(DEVICE)
    return model.train(), optimizer, images, labels


def fp16() -> torch.dtype:
    """fp16 autocast. The package's policy allows it on CUDA only (`resolve_amp`); the tests
    pass the dtype itself so that their code also runs on a CPU."""
    if ON_CUDA:
        assert resolve_amp("fp16", DEVICE) == torch.float16
    return torch.float16


def assert_finite_gradients(model):
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_train_step_bf16_without_a_scaler_keeps_scores_and_losses_fp32():
    model, optimizer, images, labels = tiny_training()
    amp = resolve_amp("bf16", DEVICE)
    scaler = grad_scaler(DEVICE, amp)
    assert amp == torch.bfloat16 and not scaler.is_enabled()
    loss, parts = train_step(model, images, labels, optimizer, scaler, amp, grad_clip=1.0)
    assert loss.device.type == DEVICE.type and loss.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in parts.values()) and torch.isfinite(loss)
    assert_finite_gradients(model)
    with autocast(DEVICE, amp):
        output = model(images)
    for name in ("logits", "global_features", "text_features", "local_features", "attention"):
        assert getattr(output, name).dtype == torch.float32, name
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_train_step_fp16_scaler_backs_off_after_an_injected_overflow():
    model, optimizer, images, labels = tiny_training()
    amp = fp16()
    scaler = grad_scaler(DEVICE, amp)
    assert scaler.is_enabled()
    train_step(model, images, labels, optimizer, scaler, amp, grad_clip=1.0)
    scale, before = scaler.get_scale(), model.trainable_state_dict()
    # The overflow: one prompt gradient becomes inf in the backward pass.
    hook = model.text_prompts.ctx.register_hook(lambda g: torch.full_like(g, float("inf")))
    loss, _ = train_step(model, images, labels, optimizer, scaler, amp, grad_clip=1.0)
    hook.remove()
    assert scaler.get_scale() == scale * 0.5  # backed off by GradScaler's factor
    after = model.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the step was skipped
    assert torch.isfinite(loss)  # the loss itself was fine: only the gradient overflowed
    for _ in range(3):  # the steps that follow train again
        train_step(model, images, labels, optimizer, scaler, amp, grad_clip=1.0)
    assert_finite_gradients(model)
    assert any(not torch.equal(before[k], v) for k, v in model.trainable_state_dict().items())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_loss_falls_over_30_steps_on_a_tiny_task(precision):
    model, optimizer, images, labels = tiny_training()
    amp = resolve_amp("bf16", DEVICE) if precision == "bf16" else fp16()
    scaler = grad_scaler(DEVICE, amp)
    losses = [train_step(model, images, labels, optimizer, scaler, amp, grad_clip=1.0)[0]
              for _ in range(30)]
    losses = torch.stack(losses).cpu()  # one sync, after the steps
    assert torch.isfinite(losses).all()
    assert losses[-5:].max() < 0.8 * losses[0], losses.tolist()  # about 7.9 -> 5.4
    assert_finite_gradients(model)


# -- host-device synchronisations --------------------------------------------------------------

def test_training_steps_bf16_make_no_host_device_sync():
    """train.py's per-step work: batch to the device, augmentation, `train_step` (gradient
    clipping included), the schedule, the running loss sums. Under bf16 no GradScaler runs; under
    fp16 its `step` reads found_inf (`.item()`), one sync a step by design (next test)."""
    model, optimizer, _, labels = tiny_training()
    amp = resolve_amp("bf16", DEVICE)
    scaler = grad_scaler(DEVICE, amp)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    augment = TrainBatchAugment(DEVICE, seed=1)
    pixels = torch.randint(0, 256, (len(labels), 3, 32, 32), dtype=torch.uint8)
    pixels = pixels.pin_memory() if ON_CUDA else pixels  # as the DataLoader hands it over
    running = torch.zeros(5, device=DEVICE)

    def step(number: int):
        images = augment(pixels.to(DEVICE, non_blocking=True), 0, number)
        loss, parts = train_step(model, images, labels, optimizer, scaler, amp, grad_clip=1.0)
        scheduler.step()
        running.add_(torch.stack([loss.float(), *(parts[k].float() for k in parts)]))

    step(1)  # warm-up: lazy initialisation (cuBLAS, momentum buffers, cached constants)
    with no_host_syncs(DEVICE):
        for number in range(2, 5):
            step(number)
    assert torch.isfinite(running).all()


@cuda_only
def test_fp16_step_syncs_only_to_read_the_scalers_inf_check():
    model, optimizer, images, labels = tiny_training()
    amp = fp16()
    scaler = grad_scaler(DEVICE, amp)
    step = lambda: train_step(model, images, labels, optimizer, scaler, amp, 1.0)  # noqa: E731
    step()
    assert host_syncs(step, DEVICE) <= 1  # GradScaler.step: found_inf.item()


def test_evaluation_makes_no_sync_per_batch():
    """`predict` keeps each batch's predictions on the device: the number of syncs does not grow
    with the number of batches (one at the end brings the predictions to the host)."""
    model, _, _, _ = tiny_training()
    model.eval()
    amp = resolve_amp("bf16", DEVICE)
    pixels = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(20) % len(CLASSES)
    logits = lambda x: model(x).logits  # noqa: E731

    def evaluation(images: int):
        data = TensorDataset(pixels[:images], labels[:images])
        return lambda: evaluate(logits, data, CLASSES, DEVICE, amp, batch_size=4, progress=False)

    evaluation(4)()  # warm-up: text features cached, normalisation constants on the device
    one_batch, five_batches = host_syncs(evaluation(4), DEVICE), host_syncs(evaluation(20), DEVICE)
    assert one_batch == five_batches, (one_batch, five_batches)
    preds, targets = predict(logits, TensorDataset(pixels, labels), DEVICE, amp, batch_size=4,
                             progress=False)
    assert preds.shape == targets.shape == (20,) and preds.device.type == "cpu"


# -- memory ------------------------------------------------------------------------------------

def peak_memory_of_a_step(shape: str, grad_checkpointing: bool) -> dict:
    """`mpafer.app.bench`'s memory figure: a bf16 training step at batch 32 (after a warm-up step),
    torch.cuda.max_memory_allocated, on a random CLIP of `shape`."""
    args = types.SimpleNamespace(shape=shape, train_batch=32, amp_dtype=torch.bfloat16,
                                 grad_checkpointing=grad_checkpointing, compile=False)
    out = speed.memory_in_process(args, DEVICE)
    out["reserved_bytes"] = torch.cuda.max_memory_reserved(DEVICE)
    torch.cuda.empty_cache()
    return out


@cuda_only
def test_peak_memory_of_a_bf16_step_vit_b16_batch_32_is_recorded():
    out = peak_memory_of_a_step("ViT-B/16", grad_checkpointing=False)
    record_figure("vit_b16_bf16_batch32_peak_memory_bytes", out["peak_memory_bytes"])
    record_figure("vit_b16_bf16_batch32_reserved_bytes", out["reserved_bytes"])
    assert 0 < out["peak_memory_bytes"] < 80 * GB


@cuda_only
def test_vit_l14_with_grad_checkpointing_fits_24_gb_at_batch_32():
    out = peak_memory_of_a_step("ViT-L/14", grad_checkpointing=True)
    record_figure("vit_l14_grad_checkpointing_bf16_batch32_peak_memory_bytes",
                  out["peak_memory_bytes"])
    record_figure("vit_l14_grad_checkpointing_bf16_batch32_reserved_bytes", out["reserved_bytes"])
    # 24 GB: what a 24 GiB card leaves after the CUDA context and the allocator's spare blocks.
    assert out["peak_memory_bytes"] < 24 * GB
