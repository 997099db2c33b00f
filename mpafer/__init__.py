"""mpafer: CLIP prompt learning for facial expression recognition (MPA-FER, Exp-CLIP).

    import mpafer
    clip_model, preprocess = mpafer.clip.load("ViT-B/16")
    classnames = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear"]
    model = mpafer.MPAFER(clip_model, classnames, mpafer.load_descriptions(classnames))
    model.set_prototypes(mpafer.compute_prototypes(model, train_loader_with_eval_transform))
    output = model(images)                      # output.logits [B, C]
    total, parts = model.loss(output, labels)   # parts: cls, ta, pa, v
"""
from . import clip
from .model import MPAFER, MPAFERConfig, MPAFEROutput
from .prompts import load_descriptions
from .prototypes import compute_prototypes

__version__ = "0.1.0"
__all__ = ["clip", "MPAFER", "MPAFERConfig", "MPAFEROutput", "load_descriptions",
           "compute_prototypes"]
