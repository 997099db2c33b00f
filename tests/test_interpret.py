"""Inside the prompts: nearest vocabulary tokens of the context vectors, soft vs hard prompt
cosines (checked against an independent CLIP), and eval.py's flags for both; real photos."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mpafer import MPAFER, MPAFERConfig, clip, load_descriptions
from mpafer.app.interpret import nearest_tokens, prompt_tokens, soft_hard_similarity, token_text
from mpafer.checkpoint import make_checkpoint
from mpafer.clip.tokenizer import get_tokenizer, tokenize
from mpafer.data.photo import face_input
from mpafer.files import atomic_save
from tests import reference_clip
from tests.helpers import load_script, tiny_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear"]


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny.pt"
    torch.save(tiny_state_dict(seed=0), path)
    return str(path)


def phrase_model(clip_file, **config):
    clip_model, _ = clip.load(clip_file, device="cpu")
    config = MPAFERConfig(ctx_init="a photo of a", top_k=4, **config)
    return MPAFER(clip_model, CLASSES, load_descriptions(CLASSES), config).eval()


def test_a_context_initialised_from_a_phrase_reads_back_as_that_phrase(clip_file):
    tokens = prompt_tokens(phrase_model(clip_file))["shared"]
    assert [t[0]["token"] for t in tokens] == ["a", "photo", "of", "a"]
    assert all(t[0]["similarity"] == pytest.approx(1.0, abs=1e-5) for t in tokens)
    assert [t[0]["id"] for t in tokens] == get_tokenizer().encode("a photo of a")
    per_class = prompt_tokens(phrase_model(clip_file, class_specific_ctx=True))
    assert set(per_class) == set(CLASSES)
    assert [t[0]["token"] for t in per_class["fear"]] == ["a", "photo", "of", "a"]


def test_nearest_tokens_are_real_vocabulary_entries_ranked_by_cosine():
    torch.manual_seed(0)
    table = torch.randn(49408, 16)
    context = torch.randn(3, 16)
    found = nearest_tokens(context, table, k=5)
    # By hand: cosine of every vector with every row of the table.
    cosine = (context / context.norm(dim=1, keepdim=True)) @ (table / table.norm(dim=1, keepdim=True)).t()
    tokenizer = get_tokenizer()
    for m, nearest in enumerate(found):
        assert [t["id"] for t in nearest] == cosine[m].argsort(descending=True)[:5].tolist()
        for t in nearest:
            assert t["similarity"] == pytest.approx(cosine[m, t["id"]].item(), abs=1e-5)
            assert t["token"].rstrip("-") == tokenizer.decode([t["id"]]).strip()
    assert token_text(tokenizer.encode("photo")[0]) == "photo"
    assert token_text(tokenizer.encoder["happ"]) == "happ-"  # a word piece that continues


def test_soft_hard_cosines_match_an_independent_clip(clip_file):
    model = phrase_model(clip_file)
    reference = reference_clip.build_model(tiny_state_dict(seed=0)).eval()

    def features(texts):
        with torch.no_grad():
            return F.normalize(reference.encode_text(tokenize(texts)), dim=-1)

    # The untrained soft prompt is the text "a photo of a <class>." itself.
    soft = features([f"a photo of a {c}." for c in CLASSES])
    descriptions = load_descriptions(CLASSES)
    result = soft_hard_similarity(model, descriptions, template=3)
    for c, name in enumerate(CLASSES):
        hard = features([f"a photo of a person making a facial expression of {name}, {d}"
                         for d in descriptions[name]])
        cosine = soft[c] @ hard.t()
        assert result[name]["mean"] == pytest.approx(cosine.mean().item(), abs=1e-4)
        assert result[name]["max"] == pytest.approx(cosine.max().item(), abs=1e-4)
        assert result[name]["hard_prompts"] == len(descriptions[name])
    one = soft_hard_similarity(model, None, template=1)
    hard = features([f"a photo of {c}" for c in CLASSES])
    for c, name in enumerate(CLASSES):
        assert one[name]["mean"] == one[name]["max"] == pytest.approx((soft[c] @ hard[c]).item(), abs=1e-4)
    closest = (soft @ hard.t()).argmax(dim=1)
    assert [one[n]["closest_class"] for n in CLASSES] == [CLASSES[i] for i in closest]


@pytest.fixture(scope="module")
def eval_script():
    return load_script("eval.py")


@pytest.fixture(scope="module")
def checkpoint(clip_file, tmp_path_factory):
    model = phrase_model(clip_file)
    path = str(tmp_path_factory.mktemp("ckpt") / "best.pt")
    atomic_save(make_checkpoint(model, load_descriptions(CLASSES), 1, {}), path)
    return path


def test_the_command_interprets_the_prompts_without_data(clip_file, checkpoint, tmp_path, capsys):
    from mpafer.app.interpret import main
    out = str(tmp_path / "inside.json")
    report = main(["--checkpoint", checkpoint, "--clip", clip_file, "--soft-hard", "--tokens", "3",
                   "--json", out])
    printed = capsys.readouterr().out
    assert [t[0]["token"] for t in report["prompt_tokens"]["shared"]] == ["a", "photo", "of", "a"]
    assert all(len(t) == 3 for t in report["prompt_tokens"]["shared"])
    assert "'photo' 1.000" in printed and "closest class" in printed
    assert set(report["soft_hard"]) == set(CLASSES)
    assert json.load(open(out))["soft_hard"]["fear"]["mean"] == pytest.approx(report["soft_hard"]["fear"]["mean"])


def test_face_input_leaves_face_crops_alone_and_squares_the_rest():
    face = Image.new("RGB", (100, 120))  # aspect 1.2: a face crop
    assert face_input(face, 224) == (face, None)
    cropped, note = face_input(Image.new("RGB", (400, 200)), 224)
    assert cropped.size == (200, 200) and "aspect ratio 2.00" in note
    cropped, note = face_input(Image.new("RGB", (1000, 1000)), 224)
    assert cropped.size == (1000, 1000) and "larger than 4x" in note
    assert face_input(Image.new("RGB", (896, 896)), 224)[1] is None  # exactly 4x is fine
    # The centre, not a corner: a marked centre pixel stays the centre.
    wide = Image.new("RGB", (300, 100))
    wide.putpixel((150, 50), (255, 0, 0))
    assert face_input(wide, 64)[0].getpixel((50, 50)) == (255, 0, 0)
