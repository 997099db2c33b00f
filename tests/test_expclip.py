"""Exp-CLIP: projection head format, prompt sets and prompt files, zero-shot logits, InfoNCE,
feature files, training on planted data, the BLIP-2 teacher logic (tiny random BLIP-2 when
transformers is installed)."""
import json
import math
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mpafer import clip
from mpafer.app.expclip_command import main, parse_args
from mpafer.data import expclip_transform, load_image
from mpafer.expclip import (
    PROMPT_SETS,
    ProjectionHead,
    add_teacher_features,
    build_prompts,
    cache_image_features,
    expclip_classifier,
    info_nce,
    load_features,
    load_head,
    load_prompt_file,
    read_head_metadata,
    save_head,
    train_head,
    train_head_from_file,
)
from mpafer.expclip.teacher import (
    INSTRUCTION,
    extract_teacher_features,
    require_transformers,
    teacher_features_from_model,
)
from mpafer.labels import CANONICAL_CLASSES
from tests.helpers import run, tiny_clip, tiny_state_dict

D = 32  # tiny CLIP's embed_dim


@pytest.fixture(scope="module")
def model():
    m = tiny_clip(seed=3)
    m.checkpoint_name, m.checkpoint_sha256 = "tiny-test-clip", "ab" * 32
    return m


def random_head(in_dim=D, out_dim=48, seed=0):
    torch.manual_seed(seed)
    head = ProjectionHead(in_dim, out_dim)
    return head.eval()


def images(n, seed=0, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def write_png(path, seed, size):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


# ------------------------------------------------------------------------------ head

def test_head_is_one_bias_free_linear_in_the_official_format():
    head = ProjectionHead(512)
    assert head.mlp.bias is None
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == {"mlp.weight": (4096, 512)}
    assert sum(p.numel() for p in head.parameters()) == 4096 * 512
    x = torch.randn(3, 512)
    assert torch.allclose(head(x), x @ head.mlp.weight.t())


def test_official_head_file_loads(tmp_path, model):
    W = torch.randn(64, D)
    path = str(tmp_path / "ExpCLIP_tiny_model.pth")
    torch.save({"mlp.weight": W}, path)  # exactly how the official code saves its head
    head = load_head(path, model)
    assert torch.equal(head.mlp.weight, W) and head.out_dim == 64 and head.in_dim == D
    # Wrapped variants: {"state_dict": ...} and DataParallel's module. prefix.
    torch.save({"state_dict": {"module.mlp.weight": W}}, path)
    assert torch.equal(load_head(path).mlp.weight, W)


def test_saved_head_is_a_bare_official_state_dict_with_json_sidecar(tmp_path):
    head = random_head()
    path = str(tmp_path / "head.pth")
    save_head(head, path, {"clip_name": "ViT-B/16", "epochs": 5})
    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["mlp.weight"]
    fresh = ProjectionHead(D, 48)
    fresh.load_state_dict(raw)  # what the official test script does with a head file
    assert torch.equal(fresh.mlp.weight, head.mlp.weight)
    assert read_head_metadata(path) == {"clip_name": "ViT-B/16", "epochs": 5}
    with open(path + ".json") as f:
        assert json.load(f)["epochs"] == 5
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    with pytest.raises(TypeError, match="plain JSON"):
        save_head(head, path, {"bad": torch.zeros(1)})


def test_head_width_mismatch_names_the_clip_models(tmp_path, model):
    path = str(tmp_path / "ExpCLIP_L14_model.pth")
    torch.save({"mlp.weight": torch.zeros(4096, 768)}, path)
    with pytest.raises(ValueError) as err:
        load_head(path, model)
    message = str(err.value)
    assert path in message and "768" in message and "ViT-L/14" in message
    assert "tiny-test-clip" in message and "embed_dim is 32" in message
    # A width no OpenAI model has: the message says what fits in plain words.
    torch.save({"mlp.weight": torch.zeros(4096, 64)}, path)
    with pytest.raises(ValueError) as err:
        load_head(path, model)
    message = str(err.value)
    assert "does not fit the CLIP tiny-test-clip" in message
    assert "takes 64-d CLIP features" in message and "embed_dim is 64" in message
    assert "no OpenAI CLIP model has width" not in message and "fits no" not in message
    with pytest.raises(ValueError, match="embed_dim is 32"):
        expclip_classifier(model, ["happiness"], "class", head=ProjectionHead(512, 16))


def test_head_trained_on_another_clip_is_refused(tmp_path, model):
    path = str(tmp_path / "head.pth")
    save_head(random_head(), path, {"clip_name": "other", "clip_sha256": "cd" * 32})
    with pytest.raises(ValueError, match="trained on CLIP other"):
        load_head(path, model)
    assert load_head(path, model, check_clip=False).in_dim == D


def test_bad_head_files(tmp_path):
    path = str(tmp_path / "x.pth")
    with pytest.raises(FileNotFoundError, match="x.pth"):
        load_head(path)
    torch.save({"weight": torch.zeros(4, 2)}, path)
    with pytest.raises(ValueError, match="mlp.weight"):
        load_head(path)


# ------------------------------------------------------------------------------ prompts

def test_prompt_sets_have_the_stated_sizes_and_class_words():
    sizes = {"class": 1, "expression": 1, "photo": 1, "ensemble5": 5, "ensemble10": 10}
    assert set(PROMPT_SETS) == set(sizes)
    for name, size in sizes.items():
        assert list(PROMPT_SETS[name]) == list(CANONICAL_CLASSES)
        for c, prompts in PROMPT_SETS[name].items():
            assert len(prompts) == size and len(set(prompts)) == size
            assert sum(c in p for p in prompts) >= size - 1  # the released tenth: "angry", ...
            clip.tokenize(prompts)  # every prompt fits the context
    assert PROMPT_SETS["class"]["fear"] == ["fear."]
    assert PROMPT_SETS["expression"]["anger"] == ["an expression of anger."]
    assert PROMPT_SETS["photo"]["neutral"] == ["a photo of a face with an expression of neutral."]


def test_ensembles_are_the_released_lists_with_their_exceptions():
    """The released code's per-class wording, not one template for all: sadness, happiness and
    neutral are worded apart, the tenth prompt of anger uses the adjective."""
    five, ten = PROMPT_SETS["ensemble5"], PROMPT_SETS["ensemble10"]
    assert five["fear"][2] == "a photo radiating fear in a person."
    assert five["sadness"][1:3] == ["a cropped photo emphasizing a face expressing sadness.",
                                    "a photo exuding sadness in a person."]
    assert ten["happiness"][5] == "a photo of a face exuding happiness."
    assert ten["neutral"][7] == "a good photo capturing someone's neutral state."
    assert ten["anger"][9] == "a clean photo showcasing a person's angry expression."
    assert ten["sadness"][8] == "a photo of a face with an expression of sadness."
    assert all(ten[c][:5] == five[c] for c in CANONICAL_CLASSES)  # the ten extend the five


def test_build_prompts():
    assert build_prompts("ensemble5", ["calm"])["calm"][0] == "an expression of calm."
    assert build_prompts("ensemble10", ["calm"])["calm"][9] == "a clean photo showcasing a person's calm."
    custom = {"happiness": ["a", "b"], "fear": ["c"]}
    assert build_prompts(custom, ["fear", "happiness"]) == {"fear": ["c"], "happiness": ["a", "b"]}
    with pytest.raises(ValueError, match="unknown Exp-CLIP prompt set"):
        build_prompts("nope", ["fear"])
    with pytest.raises(ValueError, match="anger"):
        build_prompts(custom, ["fear", "anger"])


def write_text(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_prompt_file_per_class_lists_and_shared_templates(tmp_path):
    per_class = write_text(tmp_path / "official.json", json.dumps({
        "happiness": ["a photo of a {c} face.", "a clean photo of a person's {} look."],
        "sadness": "a sad face.",
        "contempt": ["ignored: not evaluated"]}))
    assert load_prompt_file(per_class, ["sadness", "happiness"]) == {
        "sadness": ["a sad face."],
        "happiness": ["a photo of a happiness face.", "a clean photo of a person's happiness look."]}
    templates = write_text(tmp_path / "templates.json",
                           '["an expression of {c}.", "a {} face, {not a placeholder}."]')
    assert load_prompt_file(templates, ["fear", "anger"]) == {
        "fear": ["an expression of fear.", "a fear face, {not a placeholder}."],
        "anger": ["an expression of anger.", "a anger face, {not a placeholder}."]}
    # A prompt file is a prompt set like any other: by path, in build_prompts and the classifier.
    assert build_prompts(templates, ["fear"]) == {"fear": ["an expression of fear.",
                                                           "a fear face, {not a placeholder}."]}


def test_prompt_file_logits_equal_hand_computation(tmp_path, model):
    path = write_text(tmp_path / "p.json", json.dumps({
        "happiness": ["a happy {c} face.", "joy."], "sadness": "a sad face.",
        "anger": ["an angry face.", "a furious person.", "{}."]}))
    expected_prompts = {"happiness": ["a happy happiness face.", "joy."],
                        "sadness": ["a sad face."],
                        "anger": ["an angry face.", "a furious person.", "anger."]}
    head, classnames, x = random_head(), ["sadness", "anger", "happiness"], images(3, seed=2)
    with torch.no_grad():
        logits = expclip_classifier(model, classnames, path, head=head)(x)
    assert torch.allclose(logits, hand_logits(model, head, classnames, expected_prompts, x),
                          atol=1e-4)


@pytest.mark.parametrize("text, message", [
    ('{"happiness": ["a",\n "b",,]}', r"bad\.json:2: not valid JSON"),
    ('42', r"bad\.json: expected a JSON object \{class: \[prompts\]\} or a list of templates"),
    ('{"happiness": ["x."]}', r"bad\.json: no prompts for class\(es\) \['sadness'\]"),
    ('{"happiness": ["x."], "sadness": []}', r"bad\.json: class 'sadness' must be a non-empty"),
    ('{"happiness": ["x."], "sadness": ["y.", 3]}', r"bad\.json: class 'sadness', prompt 2 must"),
    ('["a {c} face.", "a face."]', r"bad\.json: template 2 'a face\.' has no \{c\} or \{\}"),
    ('[]', r"bad\.json: the template list must be a non-empty list"),
    ('["' + "very " * 80 + '{c}."]', r"bad\.json: class 'happiness': text is \d+ tokens long"),
])
def test_bad_prompt_files_name_the_file_and_the_problem(tmp_path, text, message):
    path = write_text(tmp_path / "bad.json", text)
    with pytest.raises(ValueError, match=message):
        load_prompt_file(path, ["happiness", "sadness"])
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_prompt_file(str(tmp_path / "nowhere.json"), ["happiness"])


# ------------------------------------------------------------------------------ zero-shot

UNEQUAL = {
    "happiness": ["a happy face.", "a photo of a smiling person.", "joy."],
    "sadness": ["a sad face."],
    "anger": ["an angry face.", "a furious person."],
}


def hand_logits(model, head, classnames, prompts, x):
    """Per prompt: encode_text -> head -> normalise; image likewise; 100 cos; mean per class."""
    with torch.no_grad():
        img = model.encode_image(x)
        img = F.normalize(head(img) if head is not None else img, dim=-1)
        out = torch.zeros(x.shape[0], len(classnames))
        for j, c in enumerate(classnames):
            for p in prompts[c]:
                t = model.encode_text(clip.tokenize([p]))
                t = F.normalize(head(t) if head is not None else t, dim=-1)
                out[:, j] += 100 * (img @ t.t())[:, 0] / len(prompts[c])
    return out


@pytest.mark.parametrize("use_head", [True, False])
def test_zero_shot_logits_equal_hand_computation(model, use_head):
    head = random_head() if use_head else None
    classnames = ["sadness", "anger", "happiness"]  # not the prompt set's order
    clf = expclip_classifier(model, classnames, UNEQUAL, head=head)
    x = images(4)
    with torch.no_grad():
        logits = clf(x)
    assert logits.shape == (4, 3) and logits.dtype == torch.float32
    assert torch.allclose(logits, hand_logits(model, head, classnames, UNEQUAL, x), atol=1e-4)


def test_plain_clip_matches_clips_own_forward(model):
    classnames = list(CANONICAL_CLASSES[:7])
    clf = expclip_classifier(model, classnames, "photo")
    x = images(3, seed=1)
    texts = [PROMPT_SETS["photo"][c][0] for c in classnames]
    with torch.no_grad():
        logits_per_image, _ = model(x, clip.tokenize(texts))
        expected = 100 * logits_per_image / model.logit_scale.exp()
        assert torch.allclose(clf(x), expected, atol=1e-4)


def test_text_features_are_computed_once(model):
    calls = []
    original = model.encode_text
    model.encode_text = lambda tokens: calls.append(len(tokens)) or original(tokens)
    try:
        clf = expclip_classifier(model, list(CANONICAL_CLASSES), "ensemble10", head=random_head())
        assert sum(calls) == 80  # 8 classes x 10 prompts, at construction
        with torch.no_grad():
            for seed in range(3):
                clf(images(2, seed))
        assert sum(calls) == 80
    finally:
        del model.encode_text
    assert clf.text_features.shape == (80, 48)


def test_video_averages_projected_frames_before_normalising(model):
    head = random_head()
    classnames = ["sadness", "anger", "happiness"]
    clf = expclip_classifier(model, classnames, UNEQUAL, head=head)
    video = torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(5))  # [B, T, 3, H, W]
    with torch.no_grad():
        logits = clf(video)
        expected = torch.zeros(2, 3)
        for b in range(2):
            projected = head(model.encode_image(video[b]))  # [T, E]
            z = F.normalize(projected.mean(dim=0, keepdim=True), dim=-1)  # [1, E]
            for j, c in enumerate(classnames):
                for p in UNEQUAL[c]:
                    t = F.normalize(head(model.encode_text(clip.tokenize([p]))), dim=-1)
                    expected[b, j] += 100 * (z @ t.t()).item() / len(UNEQUAL[c])
        # Normalising each frame before averaging would be a different (wrong) answer.
        frames = F.normalize(head(model.encode_image(video.flatten(0, 1))), dim=-1).view(2, 3, -1)
        wrong = 100 * F.normalize(frames.mean(1), dim=-1) @ clf.text_features.t() @ clf.prompt_weights
    assert torch.allclose(logits, expected, atol=1e-4)
    assert not torch.allclose(logits, wrong, atol=1e-3)


def test_classifier_under_autocast(model):
    clf = expclip_classifier(model, list(CANONICAL_CLASSES), "ensemble5", head=random_head())
    x = images(2, seed=7)
    with torch.no_grad():
        reference = clf(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = clf(x)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert (logits - reference).abs().max() < 5.0  # bf16 towers, fp32 head and cosine
    assert clf.text_features.dtype == torch.float32


# ------------------------------------------------------------------------------ loss

def test_info_nce_equals_hand_computation():
    g = torch.Generator().manual_seed(0)
    N, E, s = 5, 7, 100.0
    z = F.normalize(torch.randn(N, E, generator=g), dim=-1)
    e = F.normalize(torch.randn(N, E, generator=g), dim=-1)
    zl, el = z.double().tolist(), e.double().tolist()

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    image_to_text = text_to_image = 0.0
    for i in range(N):
        row = [s * dot(zl[i], el[j]) for j in range(N)]  # s Z E^T, row i
        m = max(row)
        image_to_text += -(row[i] - (m + math.log(sum(math.exp(v - m) for v in row))))
        col = [s * dot(el[i], zl[j]) for j in range(N)]  # s E Z^T, row i
        m = max(col)
        text_to_image += -(col[i] - (m + math.log(sum(math.exp(v - m) for v in col))))
    expected = 0.5 * image_to_text / N + 0.5 * text_to_image / N
    assert math.isclose(info_nce(z.double(), e.double(), s).item(), expected, rel_tol=1e-9)
    assert math.isclose(info_nce(z, e).item(), expected, rel_tol=1e-4)  # s = 100 by default


# ------------------------------------------------------------------------------ training

def planted(n, seed, d=D, e=64):
    """Teacher = a fixed random linear map of the CLIP features plus noise."""
    g = torch.Generator().manual_seed(seed)
    mapping = torch.randn(d, e, generator=torch.Generator().manual_seed(123))
    f = torch.randn(n, d, generator=g)
    return f, f @ mapping + 0.5 * torch.randn(n, e, generator=g)


def retrieval_accuracy(head, f, t):
    with torch.no_grad():
        z = F.normalize(head(f), dim=-1)
        return ((z @ F.normalize(t, dim=-1).t()).argmax(1) == torch.arange(len(f))).float().mean().item()


def test_training_on_planted_data_learns_the_map():
    f, t = planted(2048, seed=0)
    rng_before = torch.get_rng_state()
    logs = []
    head, history = train_head(f, t, epochs=5, batch_size=256, log=logs.append)
    assert torch.equal(torch.get_rng_state(), rng_before)  # seeded generator, global RNG untouched
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5] and len(logs) == 5
    assert history[-1]["loss"] < 0.2 * history[0]["loss"]
    assert history[-1]["accuracy"] > history[0]["accuracy"] + 0.5
    assert head.mlp.weight.shape == (64, D) and head.mlp.bias is None
    # It generalises to new images drawn from the same planted map (256 candidates).
    f_new, t_new = planted(256, seed=1)
    assert retrieval_accuracy(head, f_new, t_new) > 0.8
    assert retrieval_accuracy(ProjectionHead(D, 64), f_new, t_new) < 0.2
    # The same seed gives the same head.
    again, _ = train_head(f, t, epochs=1, batch_size=256, log=None)
    again2, _ = train_head(f, t, epochs=1, batch_size=256, log=None)
    assert torch.equal(again.mlp.weight, again2.mlp.weight)


def test_training_needs_a_full_batch():
    f, t = planted(100, seed=0)
    with pytest.raises(ValueError, match="batch_size 512"):
        train_head(f, t)
    with pytest.raises(ValueError, match="teacher rows"):
        train_head(f, t[:50], batch_size=10)


# ------------------------------------------------------------------------------ feature files

@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "faces"
    write_png(str(root / "happy" / "b.png"), 0, (40, 30))
    write_png(str(root / "happy" / "sub" / "a.png"), 1, (20, 50))
    write_png(str(root / "z.PNG"), 2, (32, 32))
    (root / "notes.txt").write_text("not an image")
    return str(root)


def test_cache_image_features(tmp_path, model, image_folder):
    out = str(tmp_path / "feats.pt")
    cache_image_features(model, image_folder, out, batch_size=2, num_workers=0, progress=False)
    data = torch.load(out, weights_only=True)
    assert data["paths"] == ["happy/b.png", "happy/sub/a.png", "z.PNG"]
    assert data["clip_features"].shape == (3, D) and data["clip_features"].dtype == torch.float32
    assert data["clip_name"] == "tiny-test-clip" and data["clip_sha256"] == "ab" * 32
    assert "no normalisation" in data["preprocess"] and data["created"]
    assert data["root"] == os.path.abspath(image_folder)
    transform = expclip_transform(32)
    with torch.no_grad():
        for i, p in enumerate(data["paths"]):
            x = transform(load_image(os.path.join(image_folder, p)))[None]
            assert torch.allclose(data["clip_features"][i], model.encode_image(x)[0], atol=1e-5)
    # Normalisation is an option, and it changes the features.
    out2 = str(tmp_path / "feats_norm.pt")
    cache_image_features(model, image_folder, out2, normalize=True, num_workers=0, progress=False)
    normed = load_features(out2, require_teacher=False)
    assert "CLIP mean/std" in normed["preprocess"]
    assert not torch.allclose(normed["clip_features"], data["clip_features"])


def test_teacher_features_join_the_feature_file(tmp_path, model, image_folder):
    out = str(tmp_path / "feats.pt")
    cache_image_features(model, image_folder, out, num_workers=0, progress=False)
    with pytest.raises(ValueError, match="no teacher_features"):
        load_features(out)
    with pytest.raises(ValueError, match="feats.pt holds 3 images"):
        add_teacher_features(out, torch.randn(2, 16), "blip2", INSTRUCTION)
    with pytest.raises(ValueError, match="paths"):
        add_teacher_features(out, torch.randn(3, 16), "blip2", INSTRUCTION, paths=["x", "y", "z"])
    teacher = F.normalize(torch.randn(3, 16), dim=-1)
    add_teacher_features(out, teacher, "blip2-test", INSTRUCTION, "squash 224")
    data = load_features(out)
    assert data["teacher_features"].dtype == torch.float32
    assert torch.allclose(data["teacher_features"], teacher, atol=1e-3)
    assert data["teacher_name"] == "blip2-test" and data["instruction"] == INSTRUCTION
    assert data["clip_features"].shape == (3, D)
    # A file whose teacher rows do not match its images is refused, naming the file.
    raw = torch.load(out, weights_only=True)
    raw["teacher_features"] = raw["teacher_features"][:2]
    bad = str(tmp_path / "bad.pt")
    torch.save(raw, bad)
    with pytest.raises(ValueError, match=r"bad\.pt: teacher_features has shape \(2, 16\)"):
        load_features(bad)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_features(str(tmp_path / "missing.pt"))


def test_command_line_cache_then_train_head_from_file(tmp_path, image_folder, capsys):
    clip_path = str(tmp_path / "tiny_clip.pt")
    torch.save(tiny_state_dict(seed=3), clip_path)
    feats = str(tmp_path / "feats.pt")
    main(["cache", "--clip", clip_path, "--images", image_folder, "--out", feats,
          "--workers", "0", "--device", "cpu"])
    add_teacher_features(feats, torch.randn(3, 16), "blip2-test", INSTRUCTION)
    main(["train", "--features", feats, "--out", str(tmp_path / "run"), "--batch-size", "2",
          "--epochs", "2", "--device", "cpu"])
    head_path = str(tmp_path / "run" / "expclip_head.pth")
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    with pytest.raises(ValueError, match="already holds a run"):  # a second run is refused
        main(["train", "--features", feats, "--out", str(tmp_path / "run")])
    train_head_from_file(feats, str(tmp_path / "head.pth"), batch_size=2, epochs=2)
    printed = capsys.readouterr().out
    assert "epoch 2/2" in printed and "loss" in printed
    head = load_head(head_path, clip.load(clip_path)[0])
    assert head.mlp.weight.shape == (16, D)
    meta = read_head_metadata(head_path)
    assert meta["teacher_name"] == "blip2-test" and len(meta["history"]) == 2
    assert meta["hparams"]["batch_size"] == 2 and meta["clip_name"] == clip_path


# ------------------------------------------------------------------------------ teacher

def test_teacher_without_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="pip install transformers") as err:
        require_transformers()
    assert "not a run-time requirement" in str(err.value)


def tiny_blip2():
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (tests/requirements.txt); "
                               "the BLIP-2 teacher logic test needs it")
    config = transformers.Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, encoder_hidden_size=32, vocab_size=100),
        text_config=dict(model_type="t5", vocab_size=100, d_model=48, d_kv=8, d_ff=64, num_layers=2,
                         num_decoder_layers=1, num_heads=2, decoder_start_token_id=0,
                         pad_token_id=0, eos_token_id=1),
        num_query_tokens=4)
    torch.manual_seed(0)
    return transformers.Blip2ForConditionalGeneration(config).eval()


def test_teacher_logic_on_a_tiny_blip2(tmp_path):
    model = tiny_blip2()
    Q, L = 4, 5
    ids = torch.tensor([11, 12, 13, 14, 1])  # an "instruction" ending with </s>
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    seen = {}
    encoder = model.language_model.get_encoder()
    h1 = encoder.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(kwargs, hidden=out.last_hidden_state), with_kwargs=True)
    h2 = model.language_projection.register_forward_hook(lambda m, i, out: seen.update(queries=out))
    try:
        with torch.no_grad():
            features = teacher_features_from_model(model, pixels, ids)
    finally:
        h1.remove()
        h2.remove()
    assert features.shape == (3, 48) and features.dtype == torch.float32
    assert torch.allclose(features.norm(dim=-1), torch.ones(3), atol=1e-5)
    # The encoder saw [32-query projections ; embedded instruction], and nothing else.
    inputs = seen["inputs_embeds"]
    assert inputs.shape == (3, Q + L, 48)
    assert torch.equal(inputs[:, :Q], seen["queries"])
    assert torch.equal(inputs[:, Q:], model.language_model.get_input_embeddings()(ids).expand(3, -1, -1))
    # Output = L2-normalised mean of the encoder's last hidden state over all Q + L positions.
    hidden = seen["hidden"]
    manual = torch.stack([sum(hidden[b, p] for p in range(Q + L)) / (Q + L) for b in range(3)])
    assert torch.allclose(features, F.normalize(manual, dim=-1), atol=1e-6)

    # Padding (masked out) changes nothing: the mean runs over real positions only.
    padded = torch.cat([ids, torch.zeros(3, dtype=torch.long)])[None].expand(3, -1)
    mask = torch.cat([torch.ones(L), torch.zeros(3)]).long()[None].expand(3, -1)
    with torch.no_grad():
        assert torch.allclose(teacher_features_from_model(model, pixels, padded, mask), features, atol=1e-5)

    # The extractor end to end (images from files, given model and tokenizer: no hub access).
    paths = [write_png(str(tmp_path / f"{i}.png"), i, (40, 30)) for i in range(3)]

    def tokenizer(text, return_tensors):
        return SimpleNamespace(input_ids=ids[None])

    out = extract_teacher_features(paths, model=model, tokenizer=tokenizer, device="cpu",
                                   batch_size=2, num_workers=0, progress=False)
    transform = expclip_transform(32)
    x = torch.stack([transform(load_image(p)) for p in paths])
    with torch.no_grad():
        assert torch.allclose(out, teacher_features_from_model(model, x, ids), atol=1e-5)
    # The feature file records how the teacher ran, down to its T5 feed-forward activation.
    _, preprocess = extract_teacher_features(paths, model=model, tokenizer=tokenizer, device="cpu",
                                             num_workers=0, progress=False,
                                             return_preprocess=True)
    activation = model.config.text_config.dense_act_fn
    assert f"eval mode, T5 feed-forward activation {activation}" in preprocess
    assert "no normalisation" in preprocess


# ------------------------------------------------------------------------------ rough edges

def test_teacher_without_transformers_is_one_line_naming_the_install(tmp_path):
    """`python -m mpafer.expclip teacher` where transformers cannot be imported: one line that
    says `pip install transformers`, before the feature file is even read."""
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from mpafer.app.expclip_command import main\n"
            "from mpafer.app.cli import run_cli\n"
            f"sys.argv = ['mpafer.expclip', 'teacher', '--features', {str(tmp_path / 'no.pt')!r}]\n"
            "run_cli(main)\n")
    result = run("-c", code, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install transformers" in lines[0], result.stderr


def test_cache_stops_on_an_unreadable_image_in_one_line_or_skips_it(tmp_path, model,
                                                                    image_folder, capsys):
    bad = os.path.join(image_folder, "happy", "broken.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really")
    clip_path = str(tmp_path / "tiny_clip.pt")
    torch.save(tiny_state_dict(seed=3), clip_path)
    feats = str(tmp_path / "feats.pt")
    args = ["cache", "--clip", clip_path, "--clip-activation", "quick_gelu", "--images",
            image_folder, "--out", feats, "--workers", "0", "--device", "cpu"]
    with pytest.raises(ValueError) as error:
        main(args)
    message = str(error.value)
    assert "\n" not in message and bad in message and "--skip-bad-images" in message
    assert not os.path.exists(feats)
    main([*args, "--skip-bad-images"])
    data = load_features(feats, require_teacher=False)
    assert data["paths"] == ["happy/b.png", "happy/sub/a.png", "z.PNG"]
    assert data["skipped"] == ["happy/broken.png"] and data["clip_features"].shape == (3, D)
    assert "skipping 1 unreadable image(s) of 4" in capsys.readouterr().out


def test_cache_options_read_like_the_other_commands(tmp_path):
    args = ["cache", "--clip", "x.pt", "--images", "faces", "--out", "f.pt"]
    parsed = parse_args(args)
    assert parsed.workers == min(4, os.cpu_count() or 1)
    assert parse_args([*args, "--cache-dir", "somewhere"]).cache_dir == "somewhere"
    with pytest.raises(SystemExit):
        parse_args([*args, "--download-root", "weights"])


def test_a_batch_larger_than_the_feature_file_shrinks_with_a_note(tmp_path, capsys):
    """The recipe's batch of 512 on a file of 84 images trains on batches of 84, with a note;
    the head's metadata records the batch that ran."""
    feats = str(tmp_path / "feats.pt")
    f, t = planted(84, seed=1)
    torch.save({"clip_features": f, "paths": [f"{i}.png" for i in range(84)],
                "teacher_features": t}, feats)
    metadata = train_head_from_file(feats, str(tmp_path / "head.pth"), batch_size=512, epochs=1)
    assert metadata["hparams"]["batch_size"] == 84
    printed = capsys.readouterr().out
    assert "fewer than --batch-size 512; training with batches of 84" in printed
