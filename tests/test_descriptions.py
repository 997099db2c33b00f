"""Shipped class descriptions (mpafer/descriptions/) and their regeneration script.

No test here touches the real network: the generator's HTTP function is replaced by a
fake, and the one test of the real urllib path talks to a server on 127.0.0.1.
"""

import datetime
import http.server
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mpafer.descriptions import generate as gen
from mpafer.labels import CANONICAL_CLASSES

REPO = Path(__file__).resolve().parents[1]
DESC_DIR = REPO / "mpafer" / "descriptions"
JSON_FILE = DESC_DIR / "fer_descriptions.json"
PROMPT_FILE = DESC_DIR / "prompt.txt"
CLASSES = list(CANONICAL_CLASSES)
GRANS = ["face", "regions", "muscles"]
TEMPLATE = "a photo of a person making a facial expression of {}, {}"
REAL_POST_JSON = gen.post_json

# Key action units per class (Ekman & Friesen FACS / EMFACS prototypes).
KEY_AUS = {
    "happiness": {6, 12},
    "surprise": {1, 2, 5, 26},
    "sadness": {1, 4, 15},
    "fear": {1, 2, 4, 5, 7, 20, 26},
    "anger": {4, 5, 7, 23},
    "disgust": {9, 15, 16},
    "contempt": {12, 14},
}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any accidental use of the real HTTP function fails loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError("tests must not call the real post_json")
    monkeypatch.setattr(gen, "post_json", refuse)


@pytest.fixture(scope="module")
def doc():
    with open(JSON_FILE, encoding="utf-8") as fh:
        return json.load(fh)


def _aus(text):
    return {int(n) for n in re.findall(r"\bau\s?(\d+)\b", text, flags=re.IGNORECASE)}


def _all_descriptions(doc):
    for name, grans in doc["classes"].items():
        for gran, items in grans.items():
            for text in items:
                yield name, gran, text


# --------------------------------------------------------------------- shipped file

def test_file_structure(doc):
    assert doc["format"] == "mpafer-descriptions/1"
    assert doc["granularities"] == GRANS
    assert list(doc["classes"]) == CLASSES
    for name in CLASSES:
        grans = doc["classes"][name]
        assert set(grans) == set(GRANS), name
        for gran in GRANS:
            items = grans[gran]
            assert isinstance(items, list) and items, (name, gran)
            assert all(isinstance(s, str) and s.strip() for s in items), (name, gran)
        assert 1 <= len(grans["face"]) <= 2, name
        assert 3 <= len(grans["regions"]) <= 4, name
        assert 1 <= len(grans["muscles"]) <= 2, name


def test_provenance(doc):
    prov = doc["provenance"]
    for key in ("model", "prompt_file", "prompt", "date", "notes"):
        assert isinstance(prov.get(key), str) and prov[key].strip(), key
    assert prov["prompt_file"] == "prompt.txt"
    assert prov["prompt"] == PROMPT_FILE.read_text(encoding="utf-8")
    datetime.date.fromisoformat(prov["date"])
    assert "not" in prov["notes"].lower() and "paper" in prov["notes"].lower()
    assert "python -m mpafer.descriptions.generate" in prov["notes"]


def test_prompt_text():
    text = PROMPT_FILE.read_text(encoding="utf-8")
    assert ("What are the most useful visual features to distinguish the facial "
            "expression of {class}?") in text
    assert "a photo of a person making a facial expression of {class}, ..." in text
    for gran in GRANS:
        assert f'"{gran}"' in text
    assert "35 words" in text
    assert gen.load_prompt() == text
    rendered = gen.render_prompt(text, "fear")
    assert "{class}" not in rendered and "expression of fear?" in rendered


@pytest.mark.parametrize("name", sorted(KEY_AUS))
def test_facs_key_action_units(doc, name):
    muscles = " ".join(doc["classes"][name]["muscles"])
    missing = KEY_AUS[name] - _aus(muscles)
    assert not missing, f"{name} muscles lack AU {sorted(missing)}: {muscles}"


def test_contempt_is_one_sided(doc):
    muscles = " ".join(doc["classes"]["contempt"]["muscles"]).lower()
    assert re.search(r"unilateral|one side|one-sided|single", muscles)


def test_neutral_has_no_action_units(doc):
    muscles = " ".join(doc["classes"]["neutral"]["muscles"]).lower()
    assert not _aus(muscles)
    assert "no action unit" in muscles or "at rest" in muscles


def test_description_length_and_style(doc):
    for name, gran, text in _all_descriptions(doc):
        where = f"{name}/{gran}: {text!r}"
        assert len(text.split()) <= 35, where
        assert text == text.lower(), where
        assert text == " ".join(text.split()), where
        assert name not in text, where          # the template already names the class
        assert not text.endswith("."), where
        # generous character bound, so the full hard prompt stays far from 77 tokens
        assert len(TEMPLATE.format(name, text)) <= 260, where


def test_descriptions_are_unique(doc):
    texts = [text for _, _, text in _all_descriptions(doc)]
    assert len(texts) == len(set(texts))


# --------------------------------------------------------------------- generator

GOOD = {
    "face": ["a Wide-Eyed  face"],
    "regions": ["brows up", "nose still", "mouth open"],
    "muscles": ["au1 inner brow raiser and au26 jaw drop"],
}


def _reply(content, model="fake-model-2026-01"):
    return {"id": "x", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}]}


def _fenced(obj):
    return "Here you go:\n```json\n" + json.dumps(obj, indent=1) + "\n```\n"


class FakePost:
    def __init__(self, answers=None):
        self.calls = []
        self.answers = answers or {}

    def __call__(self, url, payload, key):
        self.calls.append((url, payload, key))
        content = payload["messages"][-1]["content"]
        name = next(c for c in CLASSES if f"expression of {c}?" in content)
        return _reply(self.answers.get(name, _fenced(GOOD)))


@pytest.fixture
def api_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://llm.invalid/v1/")
    monkeypatch.delenv("OPENAI_MODEL", raising=False)


def test_generate_writes_file(tmp_path, api_env):
    out = tmp_path / "sub" / "desc.json"
    fake = FakePost()
    rc = gen.main(["--classes", "surprise", "fear", "--out", str(out),
                   "--model", "my-model"], post=fake)
    assert rc == 0
    prompt = PROMPT_FILE.read_text(encoding="utf-8")
    assert len(fake.calls) == 2
    for (url, payload, key), name in zip(fake.calls, ["surprise", "fear"]):
        assert url == "http://llm.invalid/v1/chat/completions"
        assert key == "sk-test"
        assert payload["model"] == "my-model"
        assert payload["temperature"] == 0
        assert payload["messages"] == [{"role": "user",
                                        "content": prompt.replace("{class}", name)}]
    written = json.loads(out.read_text(encoding="utf-8"))
    assert written["format"] == "mpafer-descriptions/1"
    assert written["granularities"] == GRANS
    assert list(written["classes"]) == ["surprise", "fear"]
    assert written["classes"]["fear"] == {
        "face": ["a wide-eyed face"],           # whitespace-normalised, lower-cased
        "regions": GOOD["regions"],
        "muscles": GOOD["muscles"],
    }
    prov = written["provenance"]
    assert prov["model"] == "fake-model-2026-01"    # as reported by the endpoint
    assert prov["prompt"] == prompt
    assert prov["prompt_file"] == "prompt.txt"
    assert prov["date"] == datetime.date.today().isoformat()
    assert "my-model" in prov["notes"]
    assert [p.name for p in out.parent.iterdir()] == ["desc.json"]   # no temp file left


def test_generated_file_has_shipped_shape(tmp_path, api_env, doc):
    out = tmp_path / "all.json"
    assert gen.main(["--out", str(out)], post=FakePost()) == 0
    written = json.loads(out.read_text(encoding="utf-8"))
    assert list(written["classes"]) == list(doc["classes"])
    assert set(written) == set(doc)
    assert set(written["provenance"]) == set(doc["provenance"])


@pytest.mark.parametrize("answer", [
    "I cannot help with that.",
    _fenced({"face": ["x"], "regions": ["y"]}),
    _fenced({"face": ["x"], "regions": [], "muscles": ["z"]}),
    _fenced({"face": "x", "regions": ["y"], "muscles": ["z"]}),
    _fenced({"face": ["x"], "regions": ["y", 3], "muscles": ["z"]}),
    _fenced(["x", "y"]),
    "",
])
def test_malformed_answer_names_class(tmp_path, api_env, capsys, answer):
    out = tmp_path / "desc.json"
    fake = FakePost({"fear": answer})
    rc = gen.main(["--classes", "surprise", "fear", "--out", str(out)], post=fake)
    assert rc == 1
    err = capsys.readouterr().err
    assert "error:" in err and "'fear'" in err
    assert not out.exists()
    with pytest.raises(gen.GenerationError, match="'fear'"):
        gen.generate(["fear"], model="m", base_url="http://x", key="k",
                     prompt=gen.load_prompt(), post=fake)


def test_not_a_chat_completion_names_class(api_env):
    with pytest.raises(gen.GenerationError, match="'anger'"):
        gen.generate(["anger"], model="m", base_url="http://x", key="k",
                     prompt=gen.load_prompt(), post=lambda u, p, k: {"error": "quota"})


def test_missing_api_key(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    fake = FakePost()
    rc = gen.main(["--out", str(tmp_path / "d.json")], post=fake)
    assert rc == 1
    assert "OPENAI_API_KEY" in capsys.readouterr().err
    assert fake.calls == []
    assert not (tmp_path / "d.json").exists()


def test_duplicate_classes_rejected(tmp_path, api_env, capsys):
    rc = gen.main(["--classes", "fear", "fear", "--out", str(tmp_path / "d.json")],
                  post=FakePost())
    assert rc == 1 and "duplicate" in capsys.readouterr().err


def test_plain_unfenced_answer(api_env):
    classes, model = gen.generate(["happiness"], model="m", base_url="http://x", key="k",
                                  prompt=gen.load_prompt(),
                                  post=lambda u, p, k: _reply(json.dumps(GOOD), model="r"))
    assert classes["happiness"]["regions"] == GOOD["regions"] and model == "r"


def test_module_help_runs():
    res = subprocess.run([sys.executable, "-m", "mpafer.descriptions.generate", "--help"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "--classes" in res.stdout and "OPENAI_API_KEY" in res.stdout


# --------------------------------------------------------------------- real urllib path (loopback only)

class _Handler(http.server.BaseHTTPRequestHandler):
    requests = []
    status = 200

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, self.headers.get("Authorization"), body))
        if type(self).status != 200:
            data = b'{"error": {"message": "bad key"}}'
            self.send_response(type(self).status)
        else:
            data = json.dumps(_reply(_fenced(GOOD), model="loopback-llm")).encode()
            self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def loopback(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    _Handler.requests = []
    _Handler.status = 200
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_real_urllib_path_on_loopback(tmp_path, monkeypatch, loopback):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-loop")
    monkeypatch.setenv("OPENAI_BASE_URL", loopback)
    out = tmp_path / "d.json"
    assert gen.main(["--classes", "disgust", "--out", str(out)], post=REAL_POST_JSON) == 0
    path, auth, body = _Handler.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-loop"
    assert body["temperature"] == 0 and "expression of disgust?" in body["messages"][0]["content"]
    written = json.loads(out.read_text(encoding="utf-8"))
    assert written["provenance"]["model"] == "loopback-llm"
    assert written["classes"]["disgust"]["muscles"] == GOOD["muscles"]


def test_http_error_is_clear(loopback):
    _Handler.status = 401
    with pytest.raises(gen.GenerationError, match="HTTP 401.*bad key"):
        REAL_POST_JSON(loopback + "/chat/completions", {"model": "m"}, "k")
