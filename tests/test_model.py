"""MPA-FER: trainable state, equivalences, alignment block, losses, prototypes, learning."""
import ast
import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from mpafer import clip, losses
from mpafer.alignment import GlobalLocalAlignment
from mpafer.checkpoint import load_checkpoint, make_checkpoint
from mpafer.clip.model import CLIP
from mpafer.labels import BASIC_CLASSES
from mpafer.model import MPAFER, MPAFERConfig
from mpafer.prompts import HARD_TEMPLATES, build_hard_prompts, load_descriptions
from tests.helpers import tiny_clip

CLASSES = list(BASIC_CLASSES)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def descriptions():
    return load_descriptions(CLASSES)


def make_model(descriptions, seed=0, **cfg):
    torch.manual_seed(seed)
    model = MPAFER(tiny_clip(), CLASSES, descriptions, MPAFERConfig(**cfg))
    model.set_prototypes(torch.randn(len(CLASSES), 32))
    return model


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % len(CLASSES)


def test_only_prompts_train_and_only_they_get_gradients(descriptions):
    model = make_model(descriptions, text_prompt_depth=2)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"text_prompts.ctx", "text_prompts.deep", "visual_prompts.prompts"}
    images, labels = batch()
    model.train()
    total, _ = model.loss(model(images), labels)
    total.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    with_proj = make_model(descriptions, learnable_alignment=True, attention_temperature=0.1)
    extra = {k for k, p in with_proj.named_parameters() if p.requires_grad} - trainable
    assert extra == {"alignment.q_proj.weight", "alignment.k_proj.weight", "alignment.v_proj.weight"}


def zero_shot_logits(clip_model, images, texts):
    image = F.normalize(clip_model.encode_image(images), dim=-1)
    text = F.normalize(clip_model.encode_text(clip.tokenize(texts)), dim=-1)
    return clip_model.logit_scale.exp() * image @ text.t()


def test_phrase_context_without_visual_prompts_or_local_term_is_zero_shot_clip(descriptions):
    model = make_model(descriptions, ctx_init="a photo of a", visual_prompt_depth=0, local_weight=0.0).eval()
    images, _ = batch()
    expected = zero_shot_logits(model.clip, images, [f"a photo of a {c}." for c in CLASSES])
    with torch.no_grad():
        torch.testing.assert_close(model(images).logits, expected, rtol=1e-5, atol=1e-4)


def hand_top_k(cosines, k):
    """Indices of the k largest values, by a plain sort."""
    return sorted(range(len(cosines)), key=lambda n: cosines[n], reverse=True)[:k]


def test_topk_attention_selects_and_weights_the_most_similar_patches():
    torch.manual_seed(0)
    B, N, C, D, k, t = 2, 10, 3, 8, 4, 0.1
    patches, text = F.normalize(torch.randn(B, N, D), dim=-1), F.normalize(torch.randn(C, D), dim=-1)
    uniform, uniform_attn = GlobalLocalAlignment(D, top_k=k)(patches, text)
    soft, soft_attn = GlobalLocalAlignment(D, top_k=k, temperature=t)(patches, text)
    for b in range(B):
        for c in range(C):
            cosines = [float(patches[b, n] @ text[c]) for n in range(N)]
            top = hand_top_k(cosines, k)
            expected_uniform = [1 / k if n in top else 0.0 for n in range(N)]
            z = sum(math.exp(cosines[n] / t) for n in top)
            expected_soft = [math.exp(cosines[n] / t) / z if n in top else 0.0 for n in range(N)]
            assert uniform_attn[b, c].tolist() == pytest.approx(expected_uniform, abs=1e-6)
            assert soft_attn[b, c].tolist() == pytest.approx(expected_soft, abs=1e-6)
            assert uniform[b, c].item() == pytest.approx(sum(cosines[n] for n in top) / k, abs=1e-6)
            assert soft[b, c].item() == pytest.approx(sum(w * x for w, x in zip(expected_soft, cosines)), abs=1e-6)
    # Identity-initialised projections start out equal to the same block without them.
    learnable, _ = GlobalLocalAlignment(D, top_k=k, temperature=t, learnable=True)(patches, text)
    torch.testing.assert_close(learnable, soft)
    # k larger than the number of patches uses all of them.
    all_patches, _ = GlobalLocalAlignment(D, top_k=50)(patches, text)
    torch.testing.assert_close(all_patches, (patches @ text.t()).mean(1))


def test_learnable_projections_need_softmax_weights():
    message = r"learnable_alignment=True \(--learnable-alignment\).*attention_temperature \(--attention-temperature\)"
    with pytest.raises(ValueError, match=message):
        GlobalLocalAlignment(8, learnable=True)
    with pytest.raises(ValueError, match=message):
        MPAFERConfig(learnable_alignment=True)
    config = MPAFERConfig(learnable_alignment=True, attention_temperature=0.1)
    config.attention_temperature = None  # changed after construction: the model checks again
    with pytest.raises(ValueError, match=message):
        MPAFER(tiny_clip(), CLASSES, None, config)


@pytest.mark.parametrize("name, value", [
    ("n_ctx", 0), ("text_prompt_depth", 0), ("visual_prompt_tokens", -1), ("visual_prompt_depth", -2),
    ("hard_prompt_template", 4), ("top_k", 0), ("local_weight", -1.0), ("attention_temperature", 0.0),
    ("tau", 0.0), ("pa_distance", "l2"), ("v_distance", "mean"), ("beta", -0.5), ("gamma", -1.0),
    ("ta_weight", -0.1)])
def test_config_rejects_out_of_range_values_naming_the_field(name, value):
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ValueError, match=rf"MPAFERConfig\.{name} \({flag}\) must be .*got {value!r}"):
        MPAFERConfig(**{name: value})
    with pytest.raises(ValueError, match="unknown MPAFERConfig fields"):
        MPAFERConfig.from_dict({"n_ctx": 4, "topk": 3})


def test_every_config_field_has_help_text():
    for f in dataclasses.fields(MPAFERConfig):
        assert len(f.metadata.get("help", "")) >= 15, f.name
    choices = [f.name for f in dataclasses.fields(MPAFERConfig) if "(choice)" in f.metadata["help"]]
    assert {"text_prompt_depth", "attention_temperature", "learnable_alignment", "tau"} <= set(choices)


def test_config_reaches_the_modules(descriptions):
    model = make_model(descriptions, n_ctx=4, class_specific_ctx=True, text_prompt_depth=2, visual_prompt_tokens=3,
                       visual_prompt_depth=1, prompt_init_std=0.5, top_k=5, attention_temperature=0.2,
                       learnable_alignment=True)
    assert model.text_prompts.ctx.shape == (len(CLASSES), 4, 64) and model.text_prompts.deep.shape == (1, 4, 64)
    assert model.visual_prompts.prompts.shape == (1, 3, 64)
    assert model.visual_prompts.prompts.std().item() == pytest.approx(0.5, rel=0.3)
    assert (model.alignment.top_k, model.alignment.temperature) == (5, 0.2) and model.alignment.q_proj is not None
    assert make_model(descriptions, global_local=False).alignment is None
    assert make_model(descriptions, visual_prompt_tokens=0).visual_prompts is None


def test_scores_and_losses_are_fp32_under_bf16_autocast(descriptions):
    model = make_model(descriptions).train()
    images, labels = batch(12, seed=1)
    with torch.no_grad():
        reference = model(images)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
        total, parts = model.loss(out, labels)
        local, attention = model.alignment(out.local_features.bfloat16(), out.text_features.bfloat16())
    tensors = {"logits": out.logits, "attention": out.attention, "z_g": out.global_features,
               "z_l": out.local_features, "text": out.text_features, "S_l": local, "alignment attention": attention,
               "total": total, **parts}
    assert {name: t.dtype for name, t in tensors.items()} == {name: torch.float32 for name in tensors}
    assert not torch.equal(out.logits, reference.logits)  # the towers did run in bf16
    # The logits are exactly s * (S_g + S_l) recomputed in fp32 from the output's features:
    # bf16 scores would be off by ~1/256 of their size.
    s_g = out.global_features @ out.text_features.t()
    s_l = (out.attention * torch.einsum("bnd,cd->bcn", out.local_features, out.text_features)).sum(-1)
    torch.testing.assert_close(out.logits, model.clip.logit_scale.exp() * (s_g + s_l), rtol=1e-6, atol=1e-5)
    # Predictions equal the fp32 path's wherever the fp32 top-2 margin exceeds the bf16 noise.
    top2 = reference.logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.2
    assert clear.sum() >= 6
    assert torch.equal(out.logits.argmax(-1)[clear], reference.logits.argmax(-1)[clear])


def test_logits_are_scaled_global_plus_local(descriptions):
    model = make_model(descriptions, local_weight=0.5).eval()
    images, _ = batch()
    with torch.no_grad():
        out = model(images)
    s_g = out.global_features @ out.text_features.t()
    s_l = (out.attention * torch.einsum("bnd,cd->bcn", out.local_features, out.text_features)).sum(-1)
    torch.testing.assert_close(out.logits, model.clip.logit_scale.exp() * (s_g + 0.5 * s_l))
    assert out.attention.shape == (6, len(CLASSES), 16)


def test_total_is_cls_plus_beta_t_plus_gamma_v(descriptions):
    model = make_model(descriptions, beta=0.3, gamma=2.5).train()
    images, labels = batch()
    out = model(images)
    total, parts = model.loss(out, labels)
    assert all(parts[k] > 0 for k in ("cls", "ta", "pa", "v"))
    expected = parts["cls"] + 0.3 * (parts["ta"] + parts["pa"]) + 2.5 * parts["v"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    # Each part equals the plain loss function on the output and the frozen buffers.
    assert parts["pa"].item() == pytest.approx(losses.prompt_alignment_loss(
        out.text_features, model.hard_features, model.hard_labels).item())
    assert parts["v"].item() == pytest.approx(losses.prototype_alignment_loss(
        out.global_features, model.prototypes, labels).item())
    ablated = make_model(descriptions, soft_hard_alignment=False, prototype_alignment=False).train()
    total, parts = ablated.loss(ablated(images), labels)
    assert parts["ta"] == parts["pa"] == parts["v"] == 0 and total.item() == pytest.approx(parts["cls"].item())
    no_protos = MPAFER(tiny_clip(), CLASSES, descriptions)
    with pytest.raises(RuntimeError, match="set_prototypes"):
        no_protos.loss(no_protos(images), labels)


def test_hard_prompt_templates_and_frozen_features(descriptions):
    texts, labels = build_hard_prompts(CLASSES, descriptions, 3)
    assert len(texts) == sum(len(v) for v in descriptions.values()) and labels == sorted(labels)
    assert texts[0].startswith("a photo of a person making a facial expression of neutral, ")
    assert build_hard_prompts(CLASSES, None, 1)[0][1] == "a photo of happiness"
    assert build_hard_prompts(CLASSES, None, 2)[0][2] == "a photo of a person making a facial expression of surprise"
    assert HARD_TEMPLATES == {1: "a photo of {c}", 2: "a photo of a person making a facial expression of {c}",
                              3: "a photo of a person making a facial expression of {c}, {d}"}
    model = make_model(descriptions, hard_prompt_template=2)
    expected = F.normalize(model.clip.encode_text(clip.tokenize(build_hard_prompts(CLASSES, None, 2)[0])), dim=-1)
    torch.testing.assert_close(model.hard_features, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs descriptions"):
        MPAFER(tiny_clip(), CLASSES, None, MPAFERConfig(hard_prompt_template=3))


class CallCounter:
    def __init__(self, module, method):
        self.calls, original = 0, getattr(module, method)

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)
        setattr(module, method, counted)


def test_text_features_cached_in_eval_and_hard_prompts_never_recomputed(descriptions):
    model = make_model(descriptions)
    counter = CallCounter(model.clip, "encode_text_embeddings")
    images, labels = batch()
    model.train()
    for _ in range(2):
        model.loss(model(images), labels)[0].backward()
    assert counter.calls == 2  # the C soft prompts once per step; hard prompts never
    model.eval()
    with torch.no_grad():
        first = model(images).logits
        for _ in range(3):
            model(images)
    assert counter.calls == 3
    with torch.no_grad():
        model.visual_prompts.prompts.add_(1.0)
        model.text_prompts.ctx.add_(1.0)
    model.load_trainable_state_dict(model.trainable_state_dict())  # invalidates the cache
    with torch.no_grad():
        assert not torch.allclose(model(images).logits, first)
    assert counter.calls == 4
    model.train().eval()
    with torch.no_grad():
        model(images)
    assert counter.calls == 5


def test_trainable_state_round_trip_gives_identical_logits(descriptions, tmp_path):
    a = make_model(descriptions, seed=1)
    images, labels = batch()
    opt = torch.optim.SGD([p for p in a.parameters() if p.requires_grad], lr=0.1)
    a.train()
    for _ in range(2):
        opt.zero_grad()
        a.loss(a(images), labels)[0].backward()
        opt.step()
    torch.save(a.trainable_state_dict(), tmp_path / "prompts.pt")
    b = make_model(descriptions, seed=2)
    b.load_trainable_state_dict(torch.load(tmp_path / "prompts.pt", weights_only=True))
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(images).logits, b(images).logits)
    assert all(v.numel() < 5000 for v in a.trainable_state_dict().values())
    other = make_model(descriptions, visual_prompt_tokens=4)
    with pytest.raises(ValueError, match=r"visual_prompts.prompts: \(2, 8, 64\) vs model \(2, 4, 64\)"):
        other.load_trainable_state_dict(a.trainable_state_dict())
    with pytest.raises(ValueError, match="missing"):
        make_model(descriptions, text_prompt_depth=2).load_trainable_state_dict(a.trainable_state_dict())


def test_a_checkpoint_of_an_older_format_is_refused_in_one_line(descriptions, tmp_path):
    """Checkpoints record their format version; one written before it is refused by name."""
    checkpoint = make_checkpoint(make_model(descriptions), descriptions, 1, {})
    torch.save({**checkpoint, "format": "mpafer-checkpoint/1"}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="format mpafer-checkpoint/1, written before") as error:
        load_checkpoint(str(tmp_path / "old.pt"))
    assert "\n" not in str(error.value) and "old.pt" in str(error.value)
    torch.save(checkpoint, tmp_path / "new.pt")
    assert load_checkpoint(str(tmp_path / "new.pt"))["format"] == "mpafer-checkpoint/2"


def test_a_few_steps_lower_the_loss(descriptions):
    model = make_model(descriptions).train()
    images, labels = batch(8)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.005, momentum=0.9)
    history = []
    for _ in range(20):
        opt.zero_grad()
        total, _ = model.loss(model(images), labels)
        total.backward()
        opt.step()
        history.append(total.item())
    assert history[-1] < 0.85 * history[0], history


def test_load_descriptions_validates(tmp_path, descriptions):
    assert set(descriptions) == set(CLASSES) and all(len(v) >= 3 for v in descriptions.values())
    with pytest.raises(ValueError, match=r"no descriptions for \['awe'\]"):
        load_descriptions(CLASSES + ["awe"])
    long = tmp_path / "long.json"
    long.write_text(json.dumps({"classes": {"fear": {"face": ["wide eyes " * 40]}}}))
    with pytest.raises(ValueError, match=r"long.json: the hard prompt for 'fear'.*tokens long"):
        load_descriptions(["fear"], str(long))
    broken = tmp_path / "broken.json"
    broken.write_text('{"classes": {\n"fear": [,]}}')
    with pytest.raises(ValueError, match=r"broken.json:2"):
        load_descriptions(["fear"], str(broken))
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_descriptions(["fear"], str(tmp_path / "nowhere.json"))


def vit_b16_default_count():
    with torch.device("meta"):
        clip_model = CLIP(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                          vision_patch_size=16, context_length=77, vocab_size=49408, transformer_width=512,
                          transformer_heads=8, transformer_layers=12)
    model = MPAFER(clip_model, CLASSES, None, MPAFERConfig(soft_hard_alignment=False))
    return model.num_trainable_parameters()


def test_readme_states_the_vit_b16_trainable_count():
    count = vit_b16_default_count()
    assert count == 10 * 512 + 12 * 8 * 768  # M = 10 context vectors + N_p = 8 tokens x 12 layers
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    assert f"{count:,}" in readme, f"README must state the ViT-B/16 default trainable count {count:,}"


ALLOWED = {"torch", "torchvision", "ftfy", "regex", "tqdm", "numpy", "PIL", "mpafer"}
# Imported lazily, inside the optional Exp-CLIP teacher and the face-detection benchmark (its
# reference and its default photo) only.
OPTIONAL = {"transformers", "facenet_pytorch", "skimage"}


def test_package_imports_only_runtime_dependencies():
    import sys
    for folder, _, files in os.walk(os.path.join(REPO, "mpafer")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                           [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                for module in modules:
                    top = module.split(".")[0]
                    assert top in ALLOWED or top in sys.stdlib_module_names or top in OPTIONAL, f"{path}: {module}"
                    if top in OPTIONAL:
                        assert node.col_offset > 0, f"{path}: {module} must be imported lazily"
