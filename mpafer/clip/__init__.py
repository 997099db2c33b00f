"""Vendored OpenAI CLIP (ViT): a drop-in for OpenAI's `clip` package with prompt hooks.

`import mpafer.clip as clip` in code written for OpenAI's package: `clip.load`,
`clip.available_models`, `clip.tokenize`, `clip.build_model` and the model's attributes keep
OpenAI's names and meaning (see the README for the deliberate differences). `clip.load` also
reads open_clip's ViTs of the same architecture (`.bin`, `.pt`, `.safetensors`), given their
activation (`activation="gelu"` for those trained with GELU), and Hugging Face transformers' CLIPs
(a `save_pretrained` folder, or a model id in the local Hugging Face cache).
"""
from .loading import available_models, default_weights_dir, load, read_checkpoint
from .model import (
    ACTIVATIONS,
    CLIP,
    build_model,
    check_same_clip,
    model_config,
    same_clip,
)
from .safetensors_reader import read_safetensors
from .tokenizer import SimpleTokenizer, get_tokenizer, tokenize
from .transform import CLIP_MEAN, CLIP_STD, clip_preprocess

__all__ = ["available_models", "default_weights_dir", "load", "read_checkpoint", "ACTIVATIONS",
           "CLIP", "build_model", "model_config", "same_clip", "check_same_clip",
           "read_safetensors", "SimpleTokenizer", "get_tokenizer", "tokenize", "CLIP_MEAN",
           "CLIP_STD", "clip_preprocess"]
