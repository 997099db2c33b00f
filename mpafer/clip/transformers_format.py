"""Hugging Face transformers' CLIP checkpoints (`CLIPModel.save_pretrained` folders, and the
Hugging Face cache they are downloaded into), mapped onto OpenAI's key names.

Plain files only: neither transformers nor huggingface_hub is imported, nothing is downloaded.
The tensors are OpenAI's CLIP under other names, except that attention keeps q, k and v apart
(OpenAI joins them into one `in_proj`) and the projections are stored transposed (as
`nn.Linear` weights). What the tensors do not show, the MLP activation, is `hidden_act` in
`config.json`; the config is also what tells CLIP from its relatives, refused here in one line.
"""
import json
import os
import re
from typing import Dict, List, Optional, Tuple

import torch

from .architecture import VOCAB_SIZE, refusal
from .model import ACTIVATIONS

CONTEXT_LENGTH = 77  # OpenAI's tokenizer (clip.tokenize)
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which the vendored model uses

# transformers' names -> OpenAI's: the towers' parts by prefix, then the parts of every block.
PREFIXES = (
    ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
    ("vision_model.embeddings.patch_embedding.", "visual.conv1."),
    ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
    ("vision_model.pre_layrnorm.", "visual.ln_pre."),  # (sic)
    ("vision_model.encoder.layers.", "visual.transformer.resblocks."),
    ("vision_model.post_layernorm.", "visual.ln_post."),
    ("text_model.embeddings.token_embedding.", "token_embedding."),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.encoder.layers.", "transformer.resblocks."),
    ("text_model.final_layer_norm.", "ln_final."),
)
BLOCK_PARTS = (
    (".self_attn.out_proj.", ".attn.out_proj."),
    (".layer_norm1.", ".ln_1."),
    (".layer_norm2.", ".ln_2."),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
)
# nn.Linear weights [embed_dim, width]; OpenAI's are the matrices x @ proj, [width, embed_dim].
PROJECTIONS = {"visual_projection.weight": "visual.proj",
               "text_projection.weight": "text_projection"}
QKV = re.compile(r"^(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$")

# What transformers assumes when config.json leaves a value out (CLIPTextConfig and
# CLIPVisionConfig): MetaCLIP's configs, for one, give no `hidden_act`.
TEXT_DEFAULTS = {"vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                 "layer_norm_eps": 1e-5, "num_attention_heads": 8}
VISION_DEFAULTS = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "num_attention_heads": 12}

# CLIP's relatives in transformers, by `model_type`: what makes each another model.
OTHER_MODELS = {
    "siglip": "SigLIP: trained with a sigmoid loss, an attention-pooling head instead of the "
              "class token",
    "siglip2": "SigLIP 2: trained with a sigmoid loss, an attention-pooling head instead of the "
               "class token",
    "altclip": "AltCLIP: an XLM-RoBERTa text tower instead of CLIP's",
    "chinese_clip": "Chinese-CLIP: a BERT text tower (Chinese vocabulary) instead of CLIP's",
    "clipseg": "CLIPSeg: CLIP with a segmentation decoder, made for masks",
}
# One tower alone, by class name (`architectures`) or `model_type`.
SINGLE_TOWERS = {
    **dict.fromkeys(("CLIPTextModel", "CLIPTextModelWithProjection", "clip_text_model"),
                    "a text tower alone"),
    **dict.fromkeys(("CLIPVisionModel", "CLIPVisionModelWithProjection", "clip_vision_model"),
                    "an image tower alone"),
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # either may come in shards
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # ORG/NAME
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


# --- the Hugging Face cache -------------------------------------------------------------------

def hub_cache() -> str:
    """Where huggingface_hub keeps its downloads: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    `~/.cache/huggingface/hub` (`$XDG_CACHE_HOME/huggingface/hub` when that is set)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return os.path.join(os.path.expanduser(cache), "huggingface", "hub")


def is_model_id(name: str) -> bool:
    """`ORG/NAME` that is no path on disk and does not end like a checkpoint file."""
    return (bool(MODEL_ID.match(name)) and not name.lower().endswith(CHECKPOINT_SUFFIXES)
            and not os.path.exists(name))


def cached_repo(model_id: str) -> str:
    return os.path.join(hub_cache(), "models--" + model_id.replace("/", "--"))


def cached_snapshot(model_id: str) -> Optional[str]:
    """The folder of `model_id`'s main revision in the cache (`models--ORG--NAME/refs/main`
    names a folder of `snapshots/`), or its only snapshot; None when there is none."""
    repo = cached_repo(model_id)
    snapshots = os.path.join(repo, "snapshots")
    ref = os.path.join(repo, "refs", "main")
    if os.path.isfile(ref):
        with open(ref) as f:
            folder = os.path.join(snapshots, f.read().strip())
        return folder if os.path.isdir(folder) else None
    found = os.listdir(snapshots) if os.path.isdir(snapshots) else []
    return os.path.join(snapshots, found[0]) if len(found) == 1 else None


def not_cached(model_id: str, available: List[str]) -> RuntimeError:
    return RuntimeError(
        f"CLIP model {model_id!r} not found: not one of the available models {available}, no "
        f"file or folder of that name, and not in the Hugging Face cache (no snapshot in "
        f"{cached_repo(model_id)}); "
        f"to use that Hugging Face model, fetch it once where there is internet with `hf "
        f"download {model_id}` (older huggingface_hub: `huggingface-cli download {model_id}`), "
        "or point HF_HUB_CACHE or HF_HOME at the cache that holds it")


# --- a model's files --------------------------------------------------------------------------

def weight_files(folder: str) -> List[str]:
    """The weights of a transformers model folder: `model.safetensors`, else `pytorch_model.bin`,
    whole or in shards (listed by their `.index.json`)."""
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return [path]
        if os.path.isfile(path + ".index.json"):
            with open(path + ".index.json") as f:
                shards = json.load(f).get("weight_map", {}).values()
            return [os.path.join(folder, shard) for shard in dict.fromkeys(shards)]
    raise FileNotFoundError(f"{folder} holds a config.json but no {' or '.join(WEIGHT_FILES)} "
                            "(whole or in shards): copy the model's weights there"
                            + open_clip_hint(folder))


def config_of_folder(folder: str) -> str:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no config.json, so it is no Hugging Face "
                                "transformers model folder; for another CLIP give the path of its "
                                "checkpoint file")
    return path


def config_beside(weights: str) -> str:
    path = os.path.join(os.path.dirname(os.path.abspath(weights)), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{weights} holds Hugging Face transformers weights, which need "
                                f"the config.json saved with them beside them (no {path})")
    return path


def open_clip_hint(folder: str) -> str:
    found = [name for name in OPEN_CLIP_FILES if os.path.isfile(os.path.join(folder, name))]
    return (f"; for the open_clip weights there, give the file: --clip "
            f"{os.path.join(folder, found[0])}" if found else "")


# --- config.json ------------------------------------------------------------------------------

def tower_config(config: Dict, tower: str, defaults: Dict) -> Dict:
    """One tower's settings as transformers reads them: `<tower>_config_dict` (older files) wins
    over `<tower>_config`, and what neither gives is transformers' default."""
    given = config.get(f"{tower}_config_dict") or config.get(f"{tower}_config") or {}
    return {**defaults, **given}


def read_config(path: str) -> Dict:
    """The `config.json` of a transformers CLIP, checked: {"activation", "heads": {"text",
    "image"}}. CLIP's relatives, single towers and another tokenizer are refused in one line."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is a JSON {type(config).__name__}, not a model config")
    kind = config.get("model_type")
    if kind is None:  # e.g. timm's config, beside open_clip's files in the same repository
        raise ValueError(f"{path} names no model_type: not the config of a transformers model"
                         + open_clip_hint(os.path.dirname(path)))
    if kind in OTHER_MODELS:
        raise refusal([f"{OTHER_MODELS[kind]} (model_type {kind!r} in {path})"])
    for what in [*(config.get("architectures") or []), kind]:
        if what in SINGLE_TOWERS:
            raise refusal([f"{SINGLE_TOWERS[what]} ({what} in {path}), where CLIP needs both "
                           "(CLIPModel)"])
    if kind != "clip":
        raise refusal([f"model_type {kind!r} in {path}, not 'clip' (CLIPModel)"])
    text = tower_config(config, "text", TEXT_DEFAULTS)
    vision = tower_config(config, "vision", VISION_DEFAULTS)
    reasons = []
    if text["vocab_size"] != VOCAB_SIZE:
        reasons.append(f"a tokenizer vocabulary of {text['vocab_size']} tokens (vocab_size), "
                       f"not CLIP's {VOCAB_SIZE}")
    if text["max_position_embeddings"] != CONTEXT_LENGTH:
        reasons.append(f"a context length of {text['max_position_embeddings']} tokens "
                       f"(max_position_embeddings), not CLIP's {CONTEXT_LENGTH}")
    activation = vision["hidden_act"]
    if text["hidden_act"] != activation:
        reasons.append(f"the activation {text['hidden_act']!r} in the text tower and "
                       f"{activation!r} in the image tower (hidden_act), where CLIP has one")
    elif activation not in ACTIVATIONS:
        reasons.append(f"the activation {activation!r} (hidden_act), not "
                       f"{' or '.join(ACTIVATIONS)}")
    eps = {text["layer_norm_eps"], vision["layer_norm_eps"]} - {LAYER_NORM_EPS}
    if eps:
        reasons.append(f"LayerNorm eps {eps.pop()} (layer_norm_eps), not CLIP's {LAYER_NORM_EPS}")
    if reasons:
        raise refusal([f"{path} says {'; '.join(reasons)}"])
    return {"activation": activation, "heads": {"text": text["num_attention_heads"],
                                                "image": vision["num_attention_heads"]}}


def check_heads(model, config: Dict, path: str):
    """The heads config.json gives against those the vendored model reads off the widths."""
    ours = {"text": model.transformer, "image": model.visual.transformer}
    reasons = [f"{heads} attention heads in the {tower} tower (num_attention_heads), where "
               f"mpafer's CLIP of width {ours[tower].width} has "
               f"{ours[tower].resblocks[0].attn.heads}"
               for tower, heads in config["heads"].items()
               if heads != ours[tower].resblocks[0].attn.heads]
    if reasons:
        raise refusal([f"{path} says {'; '.join(reasons)}"])


# --- the tensors ------------------------------------------------------------------------------

def is_transformers_state_dict(state_dict: Dict) -> bool:
    return any(k.startswith(("text_model.", "vision_model.")) for k in state_dict)


def openai_name(key: str) -> str:
    for theirs, ours in PREFIXES:
        if key.startswith(theirs):
            key = ours + key[len(theirs):]
            break
    for theirs, ours in BLOCK_PARTS:
        key = key.replace(theirs, ours)
    return key


def to_openai_state_dict(state_dict: Dict[str, torch.Tensor], where: str
                         ) -> Dict[str, torch.Tensor]:
    """OpenAI's state dict from transformers' `CLIPModel` one. Keys it does not know keep their
    names, for the architecture checks to name them; a tower that is missing is refused."""
    for prefix, tower in (("vision_model.", "image"), ("text_model.", "text")):
        if not any(k.startswith(prefix) for k in state_dict):
            raise refusal([f"{where} holds no {tower} tower (no {prefix}* weights), where CLIP "
                           "needs both"])
    out, qkv = {}, {}
    for key, value in state_dict.items():
        if key.endswith(".position_ids"):
            continue  # torch.arange buffers that older versions saved, not weights
        if key in PROJECTIONS:
            out[PROJECTIONS[key]] = value.t().contiguous()  # [D, W] -> [W, D]
            continue
        match = QKV.match(openai_name(key))
        if match:
            block, part, kind = match.groups()
            qkv.setdefault((block, kind), {})[part] = value
        else:
            out[openai_name(key)] = value
    for (block, kind), parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:  # in_proj is [q; k; v] along the output dim
            out[f"{block}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
        else:  # left as they are: named as unexpected keys
            out.update({f"{block}.self_attn.{p}_proj.{kind}": v for p, v in parts.items()})
    return out


def read_model(path: str, read_file) -> Tuple[Dict[str, torch.Tensor], Optional[Dict], List[str]]:
    """(OpenAI-format state dict, checked transformers config or None, the weight files read) of
    a checkpoint file or a transformers folder.

    A folder's config.json is read and checked before its weights are looked for. A single file
    is a transformers one when its key names say so; its config.json is the one beside it.
    read_file: path -> state dict."""
    if os.path.isdir(path):
        config_path = config_of_folder(path)
        config = read_config(config_path)
        paths = weight_files(path)
        state_dict = {k: v for file in paths for k, v in read_file(file).items()}
    else:
        paths, state_dict = [path], read_file(path)
        if not is_transformers_state_dict(state_dict):
            return state_dict, None, paths
        config_path = config_beside(path)
        config = read_config(config_path)
    config["path"] = config_path
    return to_openai_state_dict(state_dict, path), config, paths
