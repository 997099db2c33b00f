"""Hugging Face transformers' CLIPs through `mpafer.clip.load`, checked against transformers
itself: `save_pretrained` folders (safetensors, `.bin`, shards), a weight file with its
config.json beside it, model ids in a Hugging Face cache, the whole train / resume / evaluate
path, and the refusal of CLIP's relatives. Tiny models built from configs, nothing downloaded."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mpafer import clip
from mpafer.checkpoint import load_checkpoint
from tests.helpers import REPO, quick_demo, run

transformers = pytest.importorskip("transformers")

TEXTS = ["a photo of a cat", "a close-up photo of a sad face.", "anger"]
# (width, heads, patch): one head of 64 in both towers, or two of 64 with smaller patches.
SIZES = {"quick_gelu": (64, 1, 16), "gelu": (128, 2, 8)}


def clip_config(activation="quick_gelu", vocab_size=49408, heads=None, eos_token_id=49407):
    width, default_heads, patch = SIZES[activation]
    tower = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
                 num_attention_heads=heads or default_heads, hidden_act=activation)
    text = dict(tower, vocab_size=vocab_size, max_position_embeddings=77,
                eos_token_id=eos_token_id)
    return transformers.CLIPConfig(text_config=text, projection_dim=32,
                                   vision_config=dict(tower, image_size=32, patch_size=patch))


def randomised(model, seed=0):
    """`model` in eval mode with every parameter moved off its initial value (LayerNorms,
    biases and logit_scale included), so that a wrongly mapped tensor shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def hf_clip(activation="quick_gelu", seed=0, **options):
    torch.manual_seed(seed)
    return randomised(transformers.CLIPModel(clip_config(activation, **options)), seed)


def save(model, folder, weights="model.safetensors", **options):
    """`save_pretrained` into `folder`. For `pytorch_model.bin`: torch.save of the state dict
    as transformers 4 writes it (`safe_serialization=False`; transformers 5 writes safetensors
    only), with the `position_ids` buffers older versions saved."""
    model.save_pretrained(folder, **options)
    if weights == "pytorch_model.bin":
        os.remove(os.path.join(folder, "model.safetensors"))
        state_dict = model.state_dict()
        for tower in ("text_model", "vision_model"):
            n = state_dict[f"{tower}.embeddings.position_embedding.weight"].shape[0]
            state_dict[f"{tower}.embeddings.position_ids"] = torch.arange(n)[None]
        torch.save(state_dict, os.path.join(folder, weights))
    return str(folder)


def features(output):
    """get_*_features: a tensor in transformers 4, an output with `pooler_output` in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def images(n=3, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def assert_matches(ours, theirs, tol=1e-5):
    x, tokens = images(), clip.tokenize(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(x),
                                   features(theirs.get_image_features(pixel_values=x)),
                                   rtol=tol, atol=tol)
        torch.testing.assert_close(ours.encode_text(tokens),
                                   features(theirs.get_text_features(input_ids=tokens)),
                                   rtol=tol, atol=tol)
        assert torch.equal(ours.logit_scale, theirs.logit_scale)
        output = theirs(input_ids=tokens, pixel_values=x)
        logits_per_image, logits_per_text = ours(x, tokens)
        torch.testing.assert_close(logits_per_image, output.logits_per_image, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(logits_per_text, output.logits_per_text, rtol=1e-5, atol=1e-4)


def sha256(*paths):
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


# OpenAI's own transformers configs say eos_token_id 2, for which transformers pools the text at
# the argmax of the ids, as OpenAI does; newer configs say 49407 (pool at the first EOT): for
# clip.tokenize's ids both are the EOT.
@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("activation,eos_token_id", [("quick_gelu", 2), ("gelu", 49407)],
                         ids=["quick_gelu", "gelu"])
def test_transformers_folders_match_transformers(tmp_path, capsys, weights, activation,
                                                 eos_token_id):
    theirs = hf_clip(activation, eos_token_id=eos_token_id)
    folder = save(theirs, tmp_path / "clip", weights)
    ours, preprocess = clip.load(folder, device="cpu")
    assert ours.activation == activation and capsys.readouterr().out == ""  # stated: no note
    assert ours.checkpoint_name == folder
    assert ours.checkpoint_sha256 == sha256(os.path.join(folder, weights))
    assert preprocess.transforms[1].size == (32, 32)
    assert_matches(ours, theirs)
    # The weight file alone finds its config.json beside it: the same CLIP.
    alone, _ = clip.load(os.path.join(folder, weights), device="cpu")
    assert (alone.activation, alone.checkpoint_sha256) == (activation, ours.checkpoint_sha256)
    assert_matches(alone, theirs)
    # The activation is the config's: asking for the other one is refused.
    other = ({"gelu", "quick_gelu"} - {activation}).pop()
    with pytest.raises(ValueError, match=f"hidden_act in {folder}/config.json.*--clip-activation"):
        clip.load(folder, device="cpu", activation=other)
    assert clip.load(folder, device="cpu", activation=activation)[0].activation == activation


def test_sharded_weights_load_as_one(tmp_path):
    theirs = hf_clip("quick_gelu", seed=3)
    folder = save(theirs, tmp_path / "sharded", max_shard_size="2MB")
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    shards = list(dict.fromkeys(index["weight_map"].values()))
    assert len(shards) > 1 and not os.path.exists(os.path.join(folder, "model.safetensors"))
    ours, _ = clip.load(folder, device="cpu")
    assert_matches(ours, theirs)
    # Its identity: the SHA-256 of the shards read one after the other.
    assert ours.checkpoint_sha256 == sha256(*(os.path.join(folder, s) for s in shards))


def cache_model(cache, model_id, folder, revision):
    """`folder`'s files as huggingface_hub caches them: blobs named by their SHA-256, the
    snapshot of `revision` made of links to them."""
    repo = cache / ("models--" + model_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name in os.listdir(folder):
        blob = repo / "blobs" / sha256(os.path.join(folder, name))
        shutil.copyfile(os.path.join(folder, name), blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    return repo


def test_a_model_id_loads_from_the_hugging_face_cache(tmp_path, monkeypatch):
    main, old = hf_clip("gelu", seed=4), hf_clip("gelu", seed=5)
    home = tmp_path / "hf-home"
    for model, revision in ((old, "0ld"), (main, "9a1b")):
        repo = cache_model(home / "hub", "tiny-org/tiny-clip", save(model, tmp_path / revision),
                           revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("9a1b")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    ours, _ = clip.load("tiny-org/tiny-clip", device="cpu")
    assert ours.checkpoint_name == "tiny-org/tiny-clip" and ours.activation == "gelu"
    assert ours.checkpoint_sha256 == sha256(tmp_path / "9a1b" / "model.safetensors")
    assert_matches(ours, main)  # the revision refs/main names, not the other snapshot

    # HF_HUB_CACHE comes first; a model that is not there is one line naming where it looked.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "other-cache"))
    with pytest.raises(RuntimeError) as e:
        clip.load("tiny-org/tiny-clip", device="cpu")
    message = str(e.value)
    assert "\n" not in message and "hf download tiny-org/tiny-clip" in message
    assert str(tmp_path / "other-cache" / "models--tiny-org--tiny-clip") in message
    # Without refs/main, the only snapshot there is.
    cache_model(tmp_path / "other-cache", "tiny-org/tiny-clip", tmp_path / "0ld", "0ld")
    assert_matches(clip.load("tiny-org/tiny-clip", device="cpu")[0], old)


def test_the_cache_is_read_without_transformers_or_huggingface_hub(tmp_path):
    home = tmp_path / "hf-home"
    cache_model(home / "hub", "tiny-org/tiny-clip", save(hf_clip(), tmp_path / "clip"), "abc")
    code = ("import sys; from mpafer import clip; m, _ = clip.load('tiny-org/tiny-clip', "
            "device='cpu'); print(m.activation, sorted({'transformers', 'huggingface_hub'} & "
            "set(sys.modules)))")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_CACHE"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, env={**env, "HF_HOME": str(home)}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "quick_gelu []"


def test_a_transformers_clip_trains_resumes_and_evaluates(tmp_path, monkeypatch):
    """The whole path with a model id: train.py for one of two epochs, --resume, eval.py."""
    from mpafer.app.synthetic import SyntheticFaces
    home = tmp_path / "hf-home"
    cache_model(home / "hub", "tiny-org/gelu-clip", save(hf_clip("gelu", seed=6),
                                                         tmp_path / "clip"), "abc")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))  # the scripts run with os.environ
    out, note = tmp_path / "run", "does not say which activation"
    result = run(*quick_demo(out, "tiny-org/gelu-clip", "--epochs", "2", "--stop-after", "1"))
    assert note not in result.stdout
    recorded = load_checkpoint(str(out / "last.pt"))["clip"]
    assert recorded == {"name": "tiny-org/gelu-clip", "activation": "gelu",
                        "sha256": sha256(tmp_path / "clip" / "model.safetensors")}
    run("train.py", "--resume", str(out / "last.pt"))
    checkpoint = load_checkpoint(str(out / "last.pt"))
    assert checkpoint["epoch"] == 2 and checkpoint["clip"] == recorded

    result = run("eval.py", "--checkpoint", str(out / "last.pt"), "--cache-dir",
                 str(out) + "-cache", "--json", str(tmp_path / "eval.json"))
    assert note not in result.stdout
    evaluated = json.load(open(tmp_path / "eval.json"))
    assert evaluated["clip"] == "tiny-org/gelu-clip" and evaluated["clip_activation"] == "gelu"
    SyntheticFaces("test", 1, image_size=100, seed=5).load(1).save(tmp_path / "face.png")
    result = run("-m", "mpafer.predict", "--checkpoint", str(out / "last.pt"), "--align", "none",
                 str(tmp_path / "face.png"), "--cache-dir", str(out) + "-cache",
                 "--json", str(tmp_path / "face.json"))
    assert note not in result.stdout
    face = json.load(open(tmp_path / "face.json"))["images"][0]["faces"][0]
    assert set(face["probabilities"]) == set(checkpoint["classnames"])
    assert abs(sum(face["probabilities"].values()) - 1) < 1e-4


# --- refusals ---------------------------------------------------------------------------------

def assert_refused(path, *named, error=NotImplementedError):
    with pytest.raises(error) as e:
        clip.load(str(path), device="cpu")
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(path)), message
    for words in named:
        assert words in message, message
    return message


def test_siglip_is_refused(tmp_path):
    tower = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1,
                 num_attention_heads=1)
    config = transformers.SiglipConfig(text_config=dict(tower, vocab_size=1000),
                                       vision_config=dict(tower, image_size=32, patch_size=16))
    folder = save(transformers.SiglipModel(config), tmp_path / "siglip")
    assert_refused(folder, "SigLIP", "sigmoid loss", "attention-pooling head",
                   f"model_type 'siglip' in {folder}/config.json")


@pytest.mark.parametrize("config_class,named", [
    ("AltCLIPConfig", "AltCLIP: an XLM-RoBERTa text tower"),
    ("ChineseCLIPConfig", "Chinese-CLIP: a BERT text tower"),
    ("CLIPSegConfig", "CLIPSeg: CLIP with a segmentation decoder"),
    ("OwlViTConfig", "model_type 'owlvit'"),
])
def test_clips_relatives_are_refused_by_their_config(tmp_path, config_class, named):
    # The config is read first: these are refused before their weights are looked for.
    getattr(transformers, config_class)().save_pretrained(tmp_path / "model")
    assert_refused(tmp_path / "model", named)


@pytest.mark.parametrize("model_class,named", [
    ("CLIPTextModel", "a text tower alone (CLIPTextModel in"),
    ("CLIPTextModelWithProjection", "a text tower alone (CLIPTextModelWithProjection in"),
    ("CLIPVisionModel", "an image tower alone (CLIPVisionModel in"),
    ("CLIPVisionModelWithProjection", "an image tower alone (CLIPVisionModelWithProjection in"),
])
def test_a_single_tower_is_refused(tmp_path, model_class, named):
    config = clip_config()
    tower = config.vision_config if "Vision" in model_class else config.text_config
    folder = save(getattr(transformers, model_class)(tower), tmp_path / "tower")
    assert_refused(folder, named, "where CLIP needs both")


def test_weights_of_one_tower_under_a_whole_clips_config_are_refused(tmp_path):
    model = hf_clip()
    folder = save(model, tmp_path / "clip")
    text_only = {k: v for k, v in model.state_dict().items()
                 if not k.startswith(("vision_model.", "visual_projection."))}
    os.remove(os.path.join(folder, "model.safetensors"))
    torch.save(text_only, os.path.join(folder, "pytorch_model.bin"))
    assert_refused(folder, f"{folder} holds no image tower (no vision_model.* weights)")


def test_another_vocabulary_is_refused(tmp_path):
    folder = save(hf_clip(vocab_size=1000), tmp_path / "clip")
    assert_refused(folder, f"{folder}/config.json says a tokenizer vocabulary of 1000 tokens "
                   "(vocab_size), not CLIP's 49408")


def edited(tmp_path, tower, **values):
    """A whole tiny CLIP's folder whose config.json says otherwise in one tower."""
    folder = save(hf_clip(), tmp_path / "clip")
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    config[f"{tower}_config"].update(values)
    json.dump(config, open(path, "w"))
    return folder


@pytest.mark.parametrize("tower,values,named", [
    ("text", dict(max_position_embeddings=64), "a context length of 64 tokens"),
    ("vision", dict(hidden_act="gelu_new"), "'quick_gelu' in the text tower and 'gelu_new' in"),
    ("text", dict(hidden_act="relu"), "'relu' in the text tower"),
    ("vision", dict(layer_norm_eps=1e-6), "LayerNorm eps 1e-06"),
])
def test_other_settings_in_the_config_are_refused(tmp_path, tower, values, named):
    assert_refused(edited(tmp_path, tower, **values), named)


def test_heads_other_than_the_models_are_refused(tmp_path):
    # Width 128 in 4 heads of 32: the vendored model, reading the widths, would run 2 of 64.
    folder = save(hf_clip("gelu", heads=4), tmp_path / "clip")
    assert_refused(folder, f"{folder}/config.json says 4 attention heads in the text tower "
                   "(num_attention_heads), where mpafer's CLIP of width 128 has 2",
                   "4 attention heads in the image tower")


def test_old_configs_text_config_dict_wins_as_in_transformers(tmp_path):
    # Older files hold the settings in text_config_dict, which transformers reads over
    # text_config (and for what it leaves out, its defaults: here quick_gelu).
    folder = edited(tmp_path, "text", hidden_act="gelu")
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    config["text_config_dict"] = {k: v for k, v in config["text_config"].items()
                                  if k != "hidden_act"}
    json.dump(config, open(path, "w"))
    assert transformers.CLIPConfig.from_pretrained(folder).text_config.hidden_act == "quick_gelu"
    assert clip.load(folder, device="cpu")[0].activation == "quick_gelu"


def test_missing_config_or_weights_are_one_line(tmp_path):
    folder = save(hf_clip(), tmp_path / "clip")
    shutil.move(os.path.join(folder, "model.safetensors"), tmp_path / "model.safetensors")
    assert_refused(folder, "holds a config.json but no model.safetensors or pytorch_model.bin",
                   error=FileNotFoundError)
    assert_refused(tmp_path / "model.safetensors", "need the config.json saved with them",
                   str(tmp_path / "config.json"), error=FileNotFoundError)
    os.remove(os.path.join(folder, "config.json"))
    assert_refused(folder, "has no config.json", error=FileNotFoundError)


def test_open_clip_files_beside_another_config_are_read(tmp_path):
    # A timm / open_clip repository: timm's config.json (no model_type) and open_clip's file:
    # the folder is read as open_clip's (here an empty file, named in the refusal).
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_clip_224"}))
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"")
    assert_refused(tmp_path, f"{tmp_path / 'open_clip_pytorch_model.bin'}", "the file is empty",
                   error=ValueError)
