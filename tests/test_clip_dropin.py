"""`mpafer.clip` as a drop-in for OpenAI's `clip` package: client code written for OpenAI's
package (its README, its zero-shot notebook, CoOp/VPT/MaPLe-style encoders) runs unchanged."""
import hashlib
import inspect
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mpafer.clip as clip
from mpafer.clip import loading as load_module
from tests import reference_clip
from tests.helpers import MULTIHEAD, tiny_state_dict

CLASSNAMES = ["neutral", "happy", "surprised", "sad", "angry", "disgusted", "fearful"]
TEMPLATES = ["a photo of a {} face.", "a close-up photo of a {} person.", "a {} facial expression."]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny CLIP with two attention heads per tower, saved as a plain state dict."""
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.pt"
    torch.save(tiny_state_dict(seed=7, **MULTIHEAD), path)
    return str(path)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return clip.load(checkpoint, device="cpu")


def pil_images(n, seed=0, size=(48, 40), mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8), mode)
            for _ in range(n)]


def test_signatures_and_attributes_match_openai(loaded):
    params = inspect.signature(clip.load).parameters
    # OpenAI's four parameters in OpenAI's order, then one more with a default (a drop-in).
    assert list(params)[:4] == ["name", "device", "jit", "download_root"]
    assert list(params)[4:] == ["activation"] and params["activation"].default is None
    params = inspect.signature(clip.tokenize).parameters
    assert list(params) == ["texts", "context_length", "truncate"]
    assert (params["context_length"].default, params["truncate"].default) == (77, False)
    assert clip.available_models() == ["ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]
    model, _ = loaded
    assert model.dtype == torch.float32 and model.visual.input_resolution == 32
    assert (model.context_length, model.vocab_size, model.visual.output_dim) == (77, 49408, 32)
    assert isinstance(model.logit_scale, torch.nn.Parameter) and model.logit_scale.dim() == 0
    # build_model on the loaded model's own state dict gives the same model.
    rebuilt = clip.build_model(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(rebuilt.encode_image(x), model.encode_image(x))


def test_preprocess_is_bicubic_resize_centre_crop_rgb_and_clip_normalisation(loaded):
    _, preprocess = loaded
    image = pil_images(1, mode="RGBA", size=(48, 64))[0]  # alpha makes the step order matter
    # OpenAI's order: resize the short side to 32 (48x64 -> 32x42), centre crop, RGB, scale, normalise.
    by_hand = image.resize((32, 42), Image.BICUBIC).crop((0, 5, 32, 37)).convert("RGB")
    pixels = torch.from_numpy(np.asarray(by_hand, dtype=np.float32) / 255).permute(2, 0, 1)  # [3, H, W]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    torch.testing.assert_close(preprocess(image), (pixels - mean) / std)


def test_openai_readme_usage(loaded):
    model, preprocess = loaded
    # As in OpenAI's README, word for word apart from the image.
    image = preprocess(pil_images(1)[0]).unsqueeze(0)
    text = clip.tokenize(["a diagram", "a dog", "a cat"])
    with torch.no_grad():
        image_features = model.encode_image(image)
        text_features = model.encode_text(text)
        logits_per_image, logits_per_text = model(image, text)
        probs = logits_per_image.softmax(dim=-1).cpu().numpy()

    assert probs.shape == (1, 3) and np.isclose(probs.sum(), 1.0)
    img = image_features / image_features.norm(dim=-1, keepdim=True)
    txt = text_features / text_features.norm(dim=-1, keepdim=True)
    by_hand = (model.logit_scale.exp() * img @ txt.T).softmax(dim=-1)
    np.testing.assert_allclose(probs, by_hand.numpy(), rtol=1e-5, atol=1e-6)
    assert torch.equal(logits_per_text, logits_per_image.t())


def zeroshot_classifier(model, classnames, templates):
    """OpenAI's prompt-engineering notebook: per class, normalise, average, renormalise."""
    with torch.no_grad():
        zeroshot_weights = []
        for classname in classnames:
            texts = clip.tokenize([template.format(classname) for template in templates])
            class_embeddings = model.encode_text(texts)
            class_embeddings /= class_embeddings.norm(dim=-1, keepdim=True)
            class_embedding = class_embeddings.mean(dim=0)
            class_embedding /= class_embedding.norm()
            zeroshot_weights.append(class_embedding)
        return torch.stack(zeroshot_weights, dim=1)  # [D, C]


def test_zero_shot_classifier_with_template_ensemble(loaded, checkpoint):
    model, preprocess = loaded
    images = torch.stack([preprocess(im) for im in pil_images(8, seed=1)])  # [8, 3, 32, 32]
    weights = zeroshot_classifier(model, CLASSNAMES, TEMPLATES)
    with torch.no_grad():
        image_features = model.encode_image(images)
        image_features /= image_features.norm(dim=-1, keepdim=True)
        logits = 100.0 * image_features @ weights  # [8, C]

    # Directly, on the independent reference: every prompt in one batch, ensembles by reshaping.
    ref = reference_clip.build_model(torch.load(checkpoint, weights_only=True))
    prompts = clip.tokenize([t.format(c) for c in CLASSNAMES for t in TEMPLATES])
    with torch.no_grad():
        text = torch.nn.functional.normalize(ref.encode_text(prompts), dim=-1)
        text = text.view(len(CLASSNAMES), len(TEMPLATES), -1).mean(dim=1)  # [C, D]
        direct = 100.0 * torch.nn.functional.normalize(ref.encode_image(images), dim=-1) \
            @ torch.nn.functional.normalize(text, dim=-1).T  # [8, C]
    torch.testing.assert_close(logits, direct, rtol=1e-4, atol=1e-3)
    assert torch.equal(logits.argmax(dim=-1), direct.argmax(dim=-1))
    assert logits.argmax(dim=-1).unique().numel() > 1  # the images are not all one class


class TextEncoder(torch.nn.Module):
    """CoOp's text encoder, which runs CLIP's text tower from its attributes."""

    def __init__(self, clip_model):
        super().__init__()
        self.transformer = clip_model.transformer
        self.positional_embedding = clip_model.positional_embedding
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.dtype = clip_model.dtype

    def forward(self, prompts, tokenized_prompts):
        x = prompts + self.positional_embedding.type(self.dtype)
        x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.transformer(x)
        x = x.permute(1, 0, 2)  # LND -> NLD
        x = self.ln_final(x).type(self.dtype)
        return x[torch.arange(x.shape[0]), tokenized_prompts.argmax(dim=-1)] @ self.text_projection


def test_coop_style_text_encoder_reproduces_encode_text(loaded):
    model, _ = loaded
    tokens = clip.tokenize(["a photo of a happy face.", "a sad face", "an angry person, close up"])
    embeddings = model.token_embedding(tokens).type(model.dtype)  # [3, 77, W]
    encoder = TextEncoder(model)
    assert torch.equal(encoder(embeddings, tokens), model.encode_text(tokens))

    # CoOp's learned context: soft tokens after SOT; the package's own hook agrees exactly.
    soft = embeddings.clone()
    soft[:, 1:5] = torch.randn(4, embeddings.shape[-1])
    assert torch.equal(encoder(soft, tokens), model.encode_text_embeddings(soft, tokens.argmax(-1)))

    # The layout matters: the same [L, N, W] input read as batch-first mixes the texts.
    lnd = (embeddings + model.positional_embedding).permute(1, 0, 2)  # [77, 3, W]
    assert not torch.allclose(model.transformer(lnd, batch_first=True), model.transformer(lnd), atol=1e-3)


def visual_forward(visual, x):
    """VPT/MaPLe-style image encoder: OpenAI's VisionTransformer.forward, step by step."""
    x = visual.conv1(x)  # [N, width, grid, grid]
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [N, grid ** 2, width]
    zeros = torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
    x = torch.cat([visual.class_embedding.to(x.dtype) + zeros, x], dim=1)  # [N, grid ** 2 + 1, width]
    x = x + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(x)
    x = x.permute(1, 0, 2)  # NLD -> LND
    x = visual.transformer(x)
    x = x.permute(1, 0, 2)  # LND -> NLD
    x = visual.ln_post(x[:, 0, :])
    return x @ visual.proj


def test_vpt_style_visual_forward_reproduces_encode_image(loaded):
    model, preprocess = loaded
    images = torch.stack([preprocess(im) for im in pil_images(4, seed=2)])
    assert torch.equal(visual_forward(model.visual, images.type(model.dtype)), model.encode_image(images))


def test_transformer_and_blocks_take_openai_layout_like_the_reference(loaded, checkpoint):
    model, _ = loaded
    ref = reference_clip.build_model(torch.load(checkpoint, weights_only=True))
    for ours, theirs in ((model.transformer, ref.transformer), (model.visual.transformer, ref.visual.transformer)):
        x = torch.randn(77 if ours is model.transformer else 17, 3, ours.width)  # [L, N, W]
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        # Block by block, as code that reads intermediate layers does.
        y = x
        for block in ours.resblocks:
            y = block(y)
        torch.testing.assert_close(y, theirs(x), rtol=1e-5, atol=1e-5)


def test_jit_true_is_a_clear_error(checkpoint):
    with pytest.raises(ValueError, match=r"TorchScript models are not provided.*jit=False") as info:
        clip.load(checkpoint, device="cpu", jit=True)
    assert "\n" not in str(info.value)


def test_device_defaults_to_cuda_if_available_else_cpu(checkpoint):
    model, _ = clip.load(checkpoint)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert {p.device.type for p in model.parameters()} == {expected}
    assert model.checkpoint_name == checkpoint
    assert model.checkpoint_sha256 == hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()


def test_download_root_none_is_the_weights_dir(tmp_path, checkpoint, monkeypatch):
    data = Path(checkpoint).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    src = tmp_path / "mirror" / sha / "ViT-B-32.pt"
    src.parent.mkdir(parents=True)
    src.write_bytes(data)
    monkeypatch.setitem(load_module._MODELS, "ViT-B/32", "file://" + str(src))
    monkeypatch.setenv("MPAFER_WEIGHTS", str(tmp_path / "my-weights"))
    assert clip.default_weights_dir() == str(tmp_path / "my-weights")
    model, _ = clip.load("ViT-B/32", device="cpu")
    assert (tmp_path / "my-weights" / "ViT-B-32.pt").read_bytes() == data
    assert (model.checkpoint_name, model.checkpoint_sha256) == ("ViT-B/32", sha)

    # Unset (or empty): the repository's weights/ folder, wherever the current directory is.
    monkeypatch.chdir(tmp_path)
    repository = Path(__file__).resolve().parent.parent  # tests/ sits beside mpafer/
    for unset in (lambda: monkeypatch.delenv("MPAFER_WEIGHTS"), lambda: monkeypatch.setenv("MPAFER_WEIGHTS", "")):
        unset()
        assert os.path.samefile(clip.default_weights_dir(), repository / "weights")
