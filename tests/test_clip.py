"""Vendored CLIP: checkpoint format, loading paths, prompt hooks, tokenizer."""
import hashlib
import io
import os
import pickle
import zipfile

import pytest
import torch
import torch.nn.functional as F

from mpafer import clip
from mpafer.clip import loading as load_module
from mpafer.clip.model import CLIP, LayerNorm, build_model, model_config
from tests import reference_clip
from tests.helpers import MULTIHEAD, TINY, tiny_state_dict

VIT_B16 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
               vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=512,
               transformer_heads=8, transformer_layers=12)


def openai_vit_b16_keys():
    """Every key of OpenAI's ViT-B/16 state dict and its shape, written out from the architecture."""
    W, Wt, D, L, Lt, ctx, vocab = 768, 512, 512, 12, 12, 77, 49408
    grid = 224 // 16
    keys = {
        "positional_embedding": (ctx, Wt), "text_projection": (Wt, D), "logit_scale": (),
        "visual.class_embedding": (W,), "visual.positional_embedding": (grid * grid + 1, W),
        "visual.proj": (W, D), "visual.conv1.weight": (W, 3, 16, 16),
        "visual.ln_pre.weight": (W,), "visual.ln_pre.bias": (W,),
        "visual.ln_post.weight": (W,), "visual.ln_post.bias": (W,),
        "token_embedding.weight": (vocab, Wt), "ln_final.weight": (Wt,), "ln_final.bias": (Wt,),
    }
    for prefix, width, layers in (("visual.transformer", W, L), ("transformer", Wt, Lt)):
        for i in range(layers):
            b = f"{prefix}.resblocks.{i}."
            keys.update({
                b + "attn.in_proj_weight": (3 * width, width), b + "attn.in_proj_bias": (3 * width,),
                b + "attn.out_proj.weight": (width, width), b + "attn.out_proj.bias": (width,),
                b + "ln_1.weight": (width,), b + "ln_1.bias": (width,),
                b + "mlp.c_fc.weight": (4 * width, width), b + "mlp.c_fc.bias": (4 * width,),
                b + "mlp.c_proj.weight": (width, 4 * width), b + "mlp.c_proj.bias": (width,),
                b + "ln_2.weight": (width,), b + "ln_2.bias": (width,),
            })
    return keys


@pytest.fixture(scope="module")
def sd():
    return tiny_state_dict(seed=0)


@pytest.fixture(scope="module")
def model(sd):
    return build_model(sd)


def images(n=3, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


TEXTS = ["a photo of a cat", "a diagram", "a photo of a face with an expression of anger."]


def test_state_dict_keys_and_shapes_match_openai_vit_b16():
    expected = openai_vit_b16_keys()
    assert len(expected) == 2 * 12 * 12 + 14
    with torch.device("meta"):
        model = CLIP(**VIT_B16)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == expected
    # ... and the architecture is read back off those shapes.
    meta_sd = {k: torch.empty(s, device="meta") for k, s in expected.items()}
    assert model_config(meta_sd) == VIT_B16


def test_build_model_is_frozen_fp32_eval(model):
    assert not model.training
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    assert model_config(model.state_dict()) == TINY
    # Built from a state dict, the checkpoint's identity is unknown (declared, not missing).
    assert model.checkpoint_name is None and model.checkpoint_sha256 is None


def test_same_clip_compares_sha256_and_knows_when_it_cannot(sd):
    a, b = "ab" * 32, "cd" * 32
    assert clip.same_clip(a, a.upper()) is True and clip.same_clip(a, b) is False
    assert clip.same_clip(a, None) is None and clip.same_clip("", a) is None
    first, second = build_model(sd), build_model(sd)
    assert clip.same_clip(first, a) is None  # built from a state dict: identity unknown
    first.checkpoint_sha256, second.checkpoint_sha256 = a, b
    assert clip.same_clip(first, a) is True and clip.same_clip(first, second) is False


@pytest.mark.parametrize("shape", [TINY, MULTIHEAD], ids=["1-head", "2-heads"])
def test_matches_independent_multihead_attention_reference(shape):
    sd = tiny_state_dict(seed=4, **shape)
    model, ref = build_model(sd), reference_clip.build_model(sd)  # both strict=True
    heads = {m.num_heads for m in ref.modules() if isinstance(m, torch.nn.MultiheadAttention)}
    assert heads == {shape["vision_width"] // 64}
    assert {m.heads for m in model.modules() if hasattr(m, "in_proj_weight")} == heads
    x, t = images(), clip.tokenize(TEXTS)
    torch.testing.assert_close(model.encode_image(x), ref.encode_image(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.encode_text(t), ref.encode_text(t), rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(model(x, t), ref(x, t)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)


def test_no_prompts_is_the_plain_path_bit_for_bit(model):
    x = images()
    plain = model.encode_image(x)
    for empty in ([], [None] * 2, None):
        assert torch.equal(model.encode_image(x, prompts=empty), plain)
    g, tokens = model.encode_image(x, return_tokens=True)
    assert torch.equal(g, plain) and tokens.shape == (3, (32 // 8) ** 2, TINY["embed_dim"])
    t = clip.tokenize(TEXTS)
    emb = model.token_embedding(t)
    assert torch.equal(model.encode_text_embeddings(emb, t.argmax(-1)), model.encode_text(t))
    assert torch.equal(model.encode_text_embeddings(emb, t.argmax(-1), deep_prompts=[None, None]),
                       model.encode_text(t))


def test_patch_tokens_are_ln_post_and_proj_of_each_patch(model):
    x = images(2)
    captured = {}
    model.visual.transformer.register_forward_hook(lambda m, i, o: captured.update(out=o))
    try:
        g, tokens = model.encode_image(x, return_tokens=True)
    finally:
        model.visual.transformer._forward_hooks.clear()
    hidden = captured["out"]  # [B, 1 + N, W]
    v = model.visual
    by_hand = F.layer_norm(hidden[:, 1:], (hidden.shape[-1],), v.ln_post.weight, v.ln_post.bias) @ v.proj
    torch.testing.assert_close(tokens, by_hand)


def test_visual_prompts_act_per_layer_and_are_dropped(model):
    x = images(4)
    p = torch.randn(5, 64)
    last_only = model.encode_image(x, prompts=[None, p])
    both = model.encode_image(x, prompts=[p, p])
    plain = model.encode_image(x)
    assert not torch.allclose(last_only, plain) and not torch.allclose(both, last_only)
    # Prompts are shared across the batch: each image's output does not depend on the others.
    torch.testing.assert_close(model.encode_image(x[:1], prompts=[p, p]), both[:1])
    # Per-sample prompts [B, P, W] equal shared ones when they are the same.
    torch.testing.assert_close(model.encode_image(x, prompts=[p.expand(4, -1, -1), None]),
                               model.encode_image(x, prompts=[p, None]))
    # Appended after the sequence and dropped after the layer: patch tokens keep their count.
    assert model.encode_image(x, prompts=[p, p], return_tokens=True)[1].shape[1] == 16


def test_deep_text_prompts_replace_context_tokens(model):
    t = clip.tokenize(["x x x x a photo of a cat"])
    emb = model.token_embedding(t)
    eot = t.argmax(-1)
    p = torch.randn(4, 64)
    out = model.encode_text_embeddings(emb, eot, deep_prompts=[None, p])
    assert not torch.allclose(out, model.encode_text(t))
    # Replacing tokens 1..4 before layer 0 is the same as editing the input embeddings.
    # (Deep prompts are hidden states: they replace tokens after the positional embedding.)
    edited = emb.clone()
    edited[:, 1:5] = p - model.positional_embedding[1:5]
    torch.testing.assert_close(model.encode_text_embeddings(emb, eot, deep_prompts=[p]),
                               model.encode_text_embeddings(edited, eot))


def test_autocast_bf16_runs_with_fp32_weights(model):
    x, t = images(), clip.tokenize(TEXTS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img, txt = model.encode_image(x), model.encode_text(t)
    assert img.dtype == torch.bfloat16 and model.visual.conv1.weight.dtype == torch.float32
    assert F.cosine_similarity(img.float(), model.encode_image(x)).min() > 0.98
    assert F.cosine_similarity(txt.float(), model.encode_text(t)).min() > 0.98
    ln = LayerNorm(8)
    y = torch.randn(2, 8).bfloat16()
    assert torch.equal(ln(y), F.layer_norm(y.float(), (8,), ln.weight, ln.bias).bfloat16())


# --- loading ---------------------------------------------------------------------------------

def test_plain_wrapped_and_prefixed_state_dicts_load_alike(tmp_path, sd, model):
    x = images()
    variants = {"plain.pt": sd, "wrapped.pt": {"state_dict": sd},
                "ddp.pt": {"module." + k: v for k, v in sd.items()}}
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        loaded, preprocess = clip.load(str(tmp_path / name))
        assert torch.equal(loaded.encode_image(x), model.encode_image(x)), name
        assert loaded.checkpoint_sha256 == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        assert preprocess.transforms[1].size == (32, 32)


def write_torchscript_archive(sd, path):
    """An archive shaped like OpenAI's releases: a traced model, fp16 tensors, extra attributes."""
    half = {k: v.half().float() for k, v in sd.items()}
    ref = reference_clip.build_model(half)
    ref.register_buffer("input_resolution", torch.tensor(32))
    ref.register_buffer("context_length", torch.tensor(77))
    ref.register_buffer("vocab_size", torch.tensor(49408))
    with pytest.warns(FutureWarning):
        traced = torch.jit.trace_module(
            ref, {"encode_image": images(1), "encode_text": clip.tokenize(TEXTS[:1])})
    traced.to(torch.float16).save(str(path))
    return half


def test_torchscript_archive_loads_without_running_its_code(tmp_path, sd, capsys):
    half = write_torchscript_archive(sd, tmp_path / "ViT-tiny.pt")
    assert load_module.is_torchscript_archive(str(tmp_path / "ViT-tiny.pt"))
    capsys.readouterr()
    from_archive, _ = clip.load(str(tmp_path / "ViT-tiny.pt"))
    # OpenAI's own format: QuickGELU, known without a note.
    assert from_archive.activation == "quick_gelu" and capsys.readouterr().out == ""
    torch.save(half, tmp_path / "plain.pt")
    from_plain, _ = clip.load(str(tmp_path / "plain.pt"))
    x, t = images(), clip.tokenize(TEXTS)
    assert torch.equal(from_archive.encode_image(x), from_plain.encode_image(x))
    assert torch.equal(from_archive.encode_text(t), from_plain.encode_text(t))


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_archives_and_pickles_that_need_code_are_refused(tmp_path):
    bad_zip = tmp_path / "evil.pt"
    with zipfile.ZipFile(bad_zip, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"x": _Boom()}))
        z.writestr("evil/constants.pkl", pickle.dumps(()))
        z.writestr("evil/code/__torch__.py", "")
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        clip.read_checkpoint(str(bad_zip))
    bad_pickle = tmp_path / "evil2.pt"
    bad_pickle.write_bytes(pickle.dumps(_Boom(), protocol=2))
    with pytest.raises(Exception, match="evil2.pt"):
        clip.read_checkpoint(str(bad_pickle))


def test_resnet_checkpoint_is_a_clear_error():
    sd = {"visual.layer1.0.conv1.weight": torch.zeros(1), "visual.attnpool.c_proj.weight": torch.zeros(1)}
    with pytest.raises(NotImplementedError, match="ResNet"):
        build_model(sd)


def _file_url(path):
    return "file://" + os.path.abspath(path)


def test_download_checks_sha256_and_leaves_nothing_on_mismatch(tmp_path, sd):
    src = tmp_path / "src" / "ViT-tiny.pt"
    src.parent.mkdir()
    torch.save(sd, src)
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    root = tmp_path / "weights"
    with pytest.raises(RuntimeError, match="SHA-256 mismatch"):
        load_module.download(_file_url(src), str(root), "0" * 64)
    assert os.listdir(root) == []
    path = load_module.download(_file_url(src), str(root), good)
    assert open(path, "rb").read() == src.read_bytes() and os.listdir(root) == ["ViT-tiny.pt"]
    with pytest.raises(RuntimeError, match=r"could not download .*missing\.pt.*put it at"):
        load_module.download(_file_url(tmp_path / "missing.pt"), str(root), good)


def test_load_by_name_downloads_once(tmp_path, sd, monkeypatch):
    raw = io.BytesIO()
    torch.save(sd, raw)
    sha = hashlib.sha256(raw.getvalue()).hexdigest()
    src = tmp_path / "mirror" / sha / "ViT-B-16.pt"
    src.parent.mkdir(parents=True)
    src.write_bytes(raw.getvalue())
    monkeypatch.setitem(load_module._MODELS, "ViT-B/16", _file_url(src))
    model, _ = clip.load("ViT-B/16", download_root=str(tmp_path / "weights"))
    assert model.checkpoint_sha256 == sha and model.checkpoint_name == "ViT-B/16"
    assert (tmp_path / "weights" / "ViT-B-16.pt").read_bytes() == raw.getvalue()
    src.unlink()  # a second load uses the verified local copy
    clip.load("ViT-B/16", download_root=str(tmp_path / "weights"))
    assert "ViT-L/14@336px" in clip.available_models()
    with pytest.raises(RuntimeError, match="available models"):
        clip.load("ViT-H/99")


# --- tokenizer ---------------------------------------------------------------------------------

# Reference ids from OpenAI's tokenizer (as shipped in open_clip 3.3.0), SOT/EOT included.
REFERENCE_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "a diagram": [49406, 320, 22697, 49407],
    "A Photo Of A  Dog.": [49406, 320, 1125, 539, 320, 1929, 269, 49407],
    "it's &amp;lt;b&amp;gt; 12345 don't": [49406, 585, 568, 283, 321, 285, 272, 273, 274, 275, 276, 847, 713, 49407],
    "café naïve résumé ☺ 😀 中文字符": [49406, 15304, 1097, 35689, 563, 29106, 7054, 4166, 8703, 7334,
                                      19759, 255, 29032, 229, 35751, 245, 163, 105, 355, 49407],
    "\tweird\n whitespace ": [49406, 5613, 4699, 2138, 49407],
    "e-mail@example.com #hashtag $100.00": [49406, 324, 268, 2614, 287, 6228, 269, 2464, 258, 9238, 259,
                                            272, 271, 271, 269, 271, 271, 49407],
}


def test_tokenize_matches_openai_ids():
    tokens = clip.tokenize(list(REFERENCE_IDS))
    assert tokens.dtype == torch.long and tokens.shape == (len(REFERENCE_IDS), 77)
    for row, ids in zip(tokens, REFERENCE_IDS.values()):
        assert row[: len(ids)].tolist() == ids and not row[len(ids):].any()
    tok = clip.get_tokenizer()
    assert (tok.sot_token, tok.eot_token, len(tok.encoder)) == (49406, 49407, 49408)


def test_decode_round_trip():
    tok = clip.get_tokenizer()
    for text in ["a photo of a cat", "raised inner brows, lips pressed together!", "naïve café"]:
        assert tok.decode(tok.encode(text)).strip() == text.replace(",", " ,").replace("!", " !")


def test_too_long_text_errors_unless_truncated():
    text = "smile " * 100
    with pytest.raises(RuntimeError, match=r"102 tokens.*smile smile"):
        clip.tokenize(text)
    t = clip.tokenize(text, truncate=True)
    assert t[0, 0] == 49406 and t[0, -1] == 49407 and (t[0] != 0).all()


def test_vocab_file_is_the_official_one():
    from mpafer.clip.tokenizer import VOCAB_PATH
    digest = hashlib.sha256(open(VOCAB_PATH, "rb").read()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
