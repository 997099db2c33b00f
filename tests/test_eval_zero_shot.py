"""Zero-shot side by side: plain CLIP and the Exp-CLIP head see the same images through the same
transform, and prompt sets can come from a JSON file; eval.py reports both. The expected
probabilities are computed here by hand (PIL resizing, the CLIP towers, the head's matrix), not
with mpafer's transforms or classifier."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mpafer import clip
from mpafer.checkpoint import make_checkpoint
from mpafer.files import atomic_save
from mpafer.model import MPAFER, MPAFERConfig
from tests.helpers import load_script, tiny_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["happiness", "sadness", "anger"]
PROMPTS = {"happiness": ["a photo of a {c} face.", "a smiling person."],
           "sadness": "a sad {} face.",
           "anger": ["an angry face.", "a photo of {c}.", "a furious person."],
           "fear": ["not evaluated here."]}
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]


def load_eval_script():
    return load_script("eval.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero_shot")
    clip_path = str(root / "tiny-clip.pt")
    torch.save(tiny_state_dict(seed=4), clip_path)
    weight = torch.randn(48, 32, generator=torch.Generator().manual_seed(1))
    head_path = str(root / "head.pth")
    torch.save({"mlp.weight": weight}, head_path)  # the released heads' format
    prompts_path = str(root / "prompts.json")
    with open(prompts_path, "w", encoding="utf-8") as f:
        json.dump(PROMPTS, f)
    rng = np.random.default_rng(0)
    images = []
    # Width, height: not square, but within the aspect ratio (1.3) that --image takes as a face
    # crop as it is (beyond it, eval.py centre-crops to a square first).
    for i, size in enumerate([(40, 32), (30, 38), (50, 50)]):
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        path = str(root / "images" / f"{i}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(pixels).save(path)
        images.append(path)
    for i, name in enumerate(CLASSES):  # a folder dataset for the split mode
        folder = root / "faces" / "test" / name
        folder.mkdir(parents=True)
        Image.open(images[i]).save(folder / "0.png")
    return dict(root=root, clip=clip_path, head=head_path, weight=weight, prompts=prompts_path,
                images=images)


def to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def released_input(path, r):
    """Resize((r, r)) squash (bilinear) + ToTensor, no normalisation."""
    return to_tensor(Image.open(path).convert("RGB").resize((r, r), Image.BILINEAR))


def clip_input(path, r):
    """Bicubic resize of the short side to r, centre crop, ToTensor, CLIP mean/std."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    size = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
    image = image.resize(size, Image.BICUBIC)
    left, top = int(round((size[0] - r) / 2)), int(round((size[1] - r) / 2))
    image = image.crop((left, top, left + r, top + r))
    return (to_tensor(image) - CLIP_MEAN) / CLIP_STD


def hand_probabilities(setup, make_input, use_head):
    model = clip.load(setup["clip"])[0]
    W = setup["weight"] if use_head else torch.eye(32)
    prompts = {c: [p.replace("{c}", c).replace("{}", c) for p in
                   ([PROMPTS[c]] if isinstance(PROMPTS[c], str) else PROMPTS[c])]
               for c in CLASSES}
    out = {}
    with torch.no_grad():
        for path in setup["images"]:
            x = make_input(path, model.visual.input_resolution)[None]
            z = F.normalize(model.encode_image(x) @ W.t(), dim=-1)  # [1, E]
            logits = []
            for c in CLASSES:
                t = F.normalize(model.encode_text(clip.tokenize(prompts[c])) @ W.t(), dim=-1)
                logits.append((100 * z @ t.t()).mean())  # mean of the prompts' logits
            out[path] = dict(zip(CLASSES, torch.stack(logits).softmax(dim=0).tolist()))
    return out


def run_images(tmp_path, setup, *extra):
    """{path: {classifier: {class: probability}}} of the library's two zero-shot classifiers
    (eval.py --method expclip builds the same two), on `--expclip-transform` (extra)."""
    from mpafer.expclip import expclip_classifier, input_transform, load_head
    model = clip.load(setup["clip"])[0]
    name = extra[1] if extra else "released"
    transform, _ = input_transform(name, model.visual.input_resolution)
    label = f"({os.path.basename(setup['prompts'])})"
    out = {}
    for title, head in ((f"zero-shot CLIP {label}", None),
                        (f"Exp-CLIP {label}", load_head(setup["head"], model))):
        classifier = expclip_classifier(model, CLASSES, setup["prompts"], head=head).eval()
        for path in setup["images"]:
            with torch.no_grad():
                logits = classifier(transform(Image.open(path).convert("RGB"))[None])
            out.setdefault(path, {})[title] = dict(zip(CLASSES, logits.softmax(-1)[0].tolist()))
    return out


def assert_close(got, expected):
    for path in expected:
        for c in CLASSES:
            assert got[path][c] == pytest.approx(expected[path][c], abs=1e-5), (path, c)


@pytest.mark.parametrize("transform", ["released", "clip"])
def test_plain_clip_and_expclip_see_the_same_input(tmp_path, setup, transform, capsys):
    extra = [] if transform == "released" else ["--expclip-transform", "clip"]
    got = run_images(tmp_path, setup, *extra)
    make_input = released_input if transform == "released" else clip_input
    label = f"({os.path.basename(setup['prompts'])})"
    assert_close({p: got[p][f"zero-shot CLIP {label}"] for p in got},
                 hand_probabilities(setup, make_input, use_head=False))
    assert_close({p: got[p][f"Exp-CLIP {label}"] for p in got},
                 hand_probabilities(setup, make_input, use_head=True))


def test_the_two_transforms_give_different_answers(tmp_path, setup):
    # Otherwise the test above could not tell which transform was used.
    released = run_images(tmp_path, setup)
    other = run_images(tmp_path, setup, "--expclip-transform", "clip")
    path, label = setup["images"][0], "zero-shot CLIP (prompts.json)"
    assert max(abs(released[path][label][c] - other[path][label][c]) for c in CLASSES) > 1e-3


def test_split_report_names_the_shared_transform(tmp_path, setup, capsys):
    report = tmp_path / "side.json"
    load_eval_script().main([
        "--method", "expclip", "--head", setup["head"], "--clip", setup["clip"],
        "--prompts", "ensemble5", "--dataset", "folder", "--data-root",
        str(setup["root"] / "faces"), "--workers", "0", "--json", str(report)])
    results = json.loads(report.read_text())["all"]
    assert set(results) == {"zero-shot CLIP (ensemble5)", "Exp-CLIP (ensemble5)"}
    transforms = {r["transform"] for r in results.values()}
    assert len(transforms) == 1 and transforms.pop().startswith("released: Resize((32, 32))")
    printed = capsys.readouterr().out
    assert "all on the same input transform: released: Resize((32, 32)) squash" in printed
    assert "no normalisation" in printed


def test_bad_prompts_argument_is_a_clear_error(setup, capsys):
    with pytest.raises(SystemExit):
        load_eval_script().main(["--zero-shot", "--prompts", "no_such_set", "--demo"])
    assert "--prompts must be one of" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_eval_script().main(["--zero-shot", "--prompts", str(setup["root"] / "missing.json"),
                                 "--clip", setup["clip"], "--dataset", "folder", "--data-root",
                                 str(setup["root"] / "faces"), "--workers", "0"])


def test_a_checkpoint_is_the_main_result_beside_zero_shot(tmp_path, setup):
    """`--checkpoint X --zero-shot`: the JSON's top level and the confusion figure are the
    checkpoint's, zero-shot CLIP's numbers sit beside them under "all"."""
    clip_model, _ = clip.load(setup["clip"], device="cpu")
    config = MPAFERConfig(soft_hard_alignment=False, prototype_alignment=False, top_k=4)
    torch.manual_seed(0)
    model = MPAFER(clip_model, CLASSES, None, config)
    checkpoint = str(tmp_path / "best.pt")
    atomic_save(make_checkpoint(model, None, 1, {}), checkpoint)
    script, drawn = load_eval_script(), []
    script.confusion_figure = lambda metrics, **kw: drawn.append(metrics) or Image.new("RGB", (8, 8))
    out = tmp_path / "eval.json"
    script.main(["--checkpoint", checkpoint, "--zero-shot", "--dataset", "folder", "--data-root",
                 str(setup["root"] / "faces"), "--workers", "0", "--json", str(out),
                 "--confusion-png", str(tmp_path / "cm.png")])
    payload = json.loads(out.read_text())
    assert payload["classifier"] == "MPA-FER" and payload["checkpoint"] == checkpoint
    mine, zero_shot = payload["all"]["MPA-FER"], payload["all"]["zero-shot CLIP (photo)"]
    for key in ("war", "uar", "confusion", "per_class_recall"):
        assert payload[key] == mine[key], key
    assert drawn[0]["confusion"] == mine["confusion"] and zero_shot["num_samples"] == 3


def test_expclip_evaluation_loads_the_clip_its_head_records(tmp_path, setup, capsys):
    """A head saved with the CLIP it was trained on (name, SHA-256, activation) is evaluated on
    that CLIP without --clip: nothing is downloaded, no activation note."""
    from mpafer.expclip import ProjectionHead, save_head
    loaded, _ = clip.load(setup["clip"], device="cpu", activation="quick_gelu")
    head = ProjectionHead(32, 48)
    path = str(tmp_path / "expclip_head.pth")
    save_head(head, path, {"clip_name": setup["clip"], "clip_sha256": loaded.checkpoint_sha256,
                           "clip_activation": "quick_gelu"})
    report = tmp_path / "recorded.json"
    load_eval_script().main([
        "--method", "expclip", "--head", path, "--prompts", "photo", "--dataset", "folder",
        "--data-root", str(setup["root"] / "faces"), "--workers", "0",
        "--cache-dir", str(tmp_path / "empty-cache"), "--json", str(report)])
    result = json.loads(report.read_text())
    assert result["clip"] == setup["clip"] and result["clip_activation"] == "quick_gelu"
    assert "does not say which activation" not in capsys.readouterr().out
    cache = tmp_path / "empty-cache"  # nothing downloaded: only the mark that the images decoded
    assert [p.name for p in cache.iterdir()] == ["checked-images"]
