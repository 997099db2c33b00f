"""Vendored OpenAI CLIP (ViT): a drop-in for OpenAI's `clip` package with prompt hooks."""
from .loading import available_models, load, read_checkpoint
from .model import CLIP, build_model, model_config
from .tokenizer import SimpleTokenizer, get_tokenizer, tokenize
from .transform import CLIP_MEAN, CLIP_STD, clip_preprocess

__all__ = ["available_models", "load", "read_checkpoint", "CLIP", "build_model", "model_config",
           "SimpleTokenizer", "get_tokenizer", "tokenize", "CLIP_MEAN", "CLIP_STD", "clip_preprocess"]
