"""Vendored OpenAI CLIP (ViT): a drop-in for OpenAI's `clip` package with prompt hooks.

`import mpafer.clip as clip` in code written for OpenAI's package: `clip.load`,
`clip.available_models`, `clip.tokenize`, `clip.build_model` and the model's attributes keep
OpenAI's names and meaning (see the README for the deliberate differences).
"""
from .loading import available_models, default_weights_dir, load, read_checkpoint
from .model import CLIP, build_model, check_same_clip, model_config, same_clip
from .tokenizer import SimpleTokenizer, get_tokenizer, tokenize
from .transform import CLIP_MEAN, CLIP_STD, clip_preprocess

__all__ = ["available_models", "default_weights_dir", "load", "read_checkpoint", "CLIP", "build_model",
           "model_config", "same_clip", "check_same_clip", "SimpleTokenizer", "get_tokenizer", "tokenize", "CLIP_MEAN",
           "CLIP_STD", "clip_preprocess"]
