"""open_clip's ViTs through `mpafer.clip.load`, checked against open_clip itself: its state dicts
and `.safetensors` files, GELU and QuickGELU, the heads of its configs, and the refusal of the
architectures outside OpenAI's ViT family. Tiny models built from config dicts, nothing
downloaded."""
import dataclasses

import pytest
import torch

from mpafer import clip

open_clip = pytest.importorskip("open_clip")
safetensors_torch = pytest.importorskip("safetensors.torch")

TEXTS = ["a photo of a cat", "a close-up photo of a sad face.", "anger"]
# Several layers and heads; head width 64 in both towers, as in every released open_clip ViT
# but ViT-H (tested below), since the state dict does not record the heads.
GELU_TINY = dict(embed_dim=32, quick_gelu=False,
                 vision_cfg=dict(layers=3, width=128, head_width=64, patch_size=8, image_size=32),
                 text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=3))
QUICK_TINY = dict(embed_dim=48, quick_gelu=True,
                  vision_cfg=dict(layers=2, width=192, head_width=64, patch_size=16, image_size=48),
                  text_cfg=dict(context_length=77, vocab_size=49408, width=192, heads=3, layers=2))


def open_clip_model(config, seed=0):
    """An open_clip CLIP from a config dict, every parameter randomised (also the biases and
    LayerNorms its initialisation leaves constant)."""
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def save(model, path):
    """open_clip's files: `open_clip_pytorch_model.bin` (torch.save of the state dict) or
    `open_clip_model.safetensors` (the safetensors package)."""
    state_dict = model.state_dict()
    if str(path).endswith(".safetensors"):
        safetensors_torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save(state_dict, path)
    return str(path)


def images(size, n=3, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_matches(ours, theirs, size, tol=1e-5):
    x, t = images(size), clip.tokenize(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(x), theirs.encode_image(x), rtol=tol, atol=tol)
        torch.testing.assert_close(ours.encode_text(t), theirs.encode_text(t), rtol=tol, atol=tol)


@pytest.mark.parametrize("file", ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"])
@pytest.mark.parametrize("config,activation", [(GELU_TINY, "gelu"), (QUICK_TINY, "quick_gelu")],
                         ids=["gelu", "quick_gelu"])
def test_open_clip_files_match_open_clip_with_the_right_activation(tmp_path, capsys, file,
                                                                   config, activation):
    theirs = open_clip_model(config)
    path = save(theirs, tmp_path / file)
    ours, preprocess = clip.load(path, device="cpu", activation=activation)
    assert ours.activation == activation and capsys.readouterr().out == ""  # given: no note
    size = config["vision_cfg"]["image_size"]
    assert preprocess.transforms[1].size == (size, size)
    assert_matches(ours, theirs, size)
    x, t = images(size), clip.tokenize(TEXTS)
    with torch.no_grad():
        image_features, text_features, scale = theirs(x, t)  # normalised, and exp(logit_scale)
        torch.testing.assert_close(ours(x, t)[0], scale * image_features @ text_features.t(),
                                   rtol=1e-5, atol=1e-4)
    # The other activation is another function: the comparison above can tell them apart.
    other, _ = clip.load(path, device="cpu", activation=({"gelu", "quick_gelu"} - {activation}).pop())
    with torch.no_grad():
        assert (other.encode_text(t) - theirs.encode_text(t)).abs().max() > 1e-3
        assert (other.encode_image(x) - theirs.encode_image(x)).abs().max() > 1e-3


def test_without_the_activation_a_file_is_quick_gelu_with_a_one_line_note(tmp_path, capsys):
    path = save(open_clip_model(GELU_TINY), tmp_path / "open_clip_model.safetensors")
    model, _ = clip.load(path, device="cpu")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and path in lines[0] and "QuickGELU" in lines[0]
    assert "--clip-activation gelu" in lines[0]
    assert model.activation == "quick_gelu"
    # OpenAI's named models are QuickGELU whatever is asked (refused before any download).
    with pytest.raises(ValueError, match="QuickGELU"):
        clip.load("ViT-B/16", activation="gelu")
    with pytest.raises(ValueError, match="activation must be one of"):
        clip.load(path, activation="relu")


def test_same_tensors_with_another_activation_are_another_clip(tmp_path):
    path = save(open_clip_model(GELU_TINY), tmp_path / "open_clip_pytorch_model.bin")
    gelu, _ = clip.load(path, device="cpu", activation="gelu")
    quick, _ = clip.load(path, device="cpu", activation="quick_gelu")
    assert gelu.checkpoint_sha256 == quick.checkpoint_sha256
    assert clip.same_clip(gelu, quick) is False and clip.same_clip(gelu, gelu) is True
    record = {"name": path, "sha256": gelu.checkpoint_sha256, "activation": "gelu"}
    assert clip.same_clip(record, gelu) is True and clip.same_clip(record, quick) is False
    # A record from before the activation was recorded means QuickGELU.
    old = {"name": path, "sha256": gelu.checkpoint_sha256}
    assert clip.same_clip(old, quick) is True and clip.same_clip(old, gelu) is False
    with pytest.raises(ValueError, match=r"trained on CLIP .*GELU\), but the loaded CLIP is .*QuickGELU"):
        clip.check_same_clip(record, quick, "prompts.pt", "load the right one")


def test_vit_h_heads_are_80_wide_as_in_open_clip(tmp_path):
    # ViT-H/14's image tower: width 1280, 16 heads of 80 (OpenAI's rule, width // 64, gives 20).
    config = dict(embed_dim=32, quick_gelu=False,
                  vision_cfg=dict(layers=1, width=1280, head_width=80, patch_size=16, image_size=32),
                  text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1))
    theirs = open_clip_model(config)
    ours, _ = clip.load(save(theirs, tmp_path / "vit-h.safetensors"), device="cpu",
                        activation="gelu")
    assert ours.visual.transformer.resblocks[0].attn.heads == 16
    assert_matches(ours, theirs, 32, tol=2e-5)


# open_clip's configs of the family: the heads read off their state dicts are open_clip's.
FAMILY = ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-B-16-plus-240"]
# And configs outside it, each with (part of) its reason.
OUTSIDE = {"ViT-g-14": "MLPs of width", "ViT-bigG-14": "MLPs of width", "RN50": "ResNet",
           "ViT-M-16-alt": "LayerScale", "ViT-L-14-CLIPA": "visual.ln_pre",
           "coca_ViT-B-32": "visual.attn_pool.*"}


def meta_state_dict(name):
    """The state dict of an open_clip model config, on the meta device (shapes, no memory)."""
    with torch.device("meta"):  # built there, not built on the CPU and moved
        return open_clip.create_model(name, device="meta").state_dict()


@pytest.mark.parametrize("name", FAMILY)
def test_heads_of_open_clip_configs_are_read_off_their_state_dicts(name):
    cfg = open_clip.get_model_config(name)
    config = clip.model_config(meta_state_dict(name))
    vision = cfg["vision_cfg"]
    heads = vision["width"] // vision.get("head_width", 64)
    assert config.get("vision_heads", config["vision_width"] // 64) == heads
    assert config["transformer_heads"] == cfg["text_cfg"]["heads"]
    assert config["vision_layers"] == vision["layers"]
    assert config["image_resolution"] == vision["image_size"]


@pytest.mark.parametrize("name", list(OUTSIDE))
def test_open_clip_configs_outside_the_family_are_refused(name):
    with pytest.raises(NotImplementedError, match="not a CLIP ViT of OpenAI's architecture") as e:
        clip.model_config(meta_state_dict(name))
    assert OUTSIDE[name] in str(e.value) and "\n" not in str(e.value)


def _fields(cls):
    return {f.name for f in dataclasses.fields(cls)}


REFUSED = {  # open_clip options -> what the refusal names
    "attention pooling": (dict(vision_cfg=dict(attentional_pool=True)), "visual.attn_pool.*"),
    "LayerScale": (dict(vision_cfg=dict(ls_init_value=1e-5), text_cfg=dict(ls_init_value=1e-5)),
                   "ls_1.gamma"),
    "QK-norm": (dict(vision_cfg=dict(qk_norm=True)), "attn.ln_q"),
    "no text projection": (dict(text_cfg=dict(proj_type="none")), "without text_projection"),
    "text projection with bias": (dict(text_cfg=dict(proj_bias=True)), "text_projection.bias"),
    "ResNet": (dict(vision_cfg=dict(layers=[1, 1, 1, 1], width=64)), "visual.layer1.*"),
    "SigLIP logit bias": (dict(init_logit_bias=-10.0), "logit_bias"),
    "MLP ratio": (dict(vision_cfg=dict(mlp_ratio=2.0)), "MLPs of width 128 = 2 x 64"),
    "other tokenizer": (dict(text_cfg=dict(vocab_size=1000)), "a vocabulary of 1000 tokens"),
}


@pytest.mark.parametrize("what", list(REFUSED))
def test_other_architectures_are_refused_in_one_line_naming_the_keys(tmp_path, what):
    options, named = REFUSED[what]
    vision = dict(layers=1, width=64, head_width=64, patch_size=8, image_size=32)
    text = dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1)
    vision.update(options.get("vision_cfg", {}))
    text.update(options.get("text_cfg", {}))
    extra = {k: v for k, v in options.items() if k not in ("vision_cfg", "text_cfg")}
    unknown = (set(vision) - _fields(open_clip.model.CLIPVisionCfg)) | \
              (set(text) - _fields(open_clip.model.CLIPTextCfg))
    if unknown:
        pytest.skip(f"this open_clip version has no {sorted(unknown)}")
    model = open_clip.model.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, **extra)
    path = save(model, tmp_path / "open_clip_model.safetensors")
    with pytest.raises(NotImplementedError) as e:
        clip.load(path, device="cpu", activation="gelu")
    message = str(e.value)
    assert message.startswith(path) and named in message and "\n" not in message


# --- the safetensors reader ------------------------------------------------------------------

def test_reads_what_the_safetensors_package_writes(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).half(), "c": torch.randn(2, 2).bfloat16(),
               "d": torch.arange(6, dtype=torch.int64).reshape(2, 3), "e": torch.tensor(1.5)}
    safetensors_torch.save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"x": "y"})
    ours = clip.read_safetensors(str(tmp_path / "t.safetensors"))
    theirs = safetensors_torch.load_file(str(tmp_path / "t.safetensors"))
    assert set(ours) == set(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k

