"""Looking inside learned prompts: `python -m mpafer.interpret --checkpoint best.pt`.

- `nearest_tokens`: for each learned text context vector, the vocabulary tokens whose input
  embeddings are nearest by cosine (CoOp's way of reading soft prompts). The nearest words
  are a hint, not a translation: a context vector need not be close to any word.
- `soft_hard_similarity`: for each class, the cosine between its soft-prompt text feature and
  the text features of its hard prompts (mean and max over that class's hard prompts), and
  which class's hard prompts are closest on average: what the soft-hard alignment L_t did.
"""
import argparse
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from .. import clip
from ..checkpoint import load_checkpoint, model_from_checkpoint
from ..clip.tokenizer import get_tokenizer, tokenize
from ..files import atomic_write_json
from ..model import MPAFER
from ..precision import resolve_device
from ..prompts import build_hard_prompts, crop_to_longest, eot_positions, load_descriptions
from .cli import ArgumentParser
from .runs import load_checkpoint_clip


def token_text(token_id: int) -> str:
    """One vocabulary entry as text; a word ending is a trailing "</w>" in the vocabulary, so
    sub-word pieces (no ending) are shown with a trailing "-"."""
    tokenizer = get_tokenizer()
    raw = tokenizer.decoder[int(token_id)]
    text = tokenizer.decode([int(token_id)])
    return text.strip() if raw.endswith("</w>") or raw.startswith("<|") else text + "-"


@torch.no_grad()
def nearest_tokens(context: torch.Tensor, token_embedding: torch.Tensor,
                   k: int = 5) -> List[List[Dict]]:
    """`[M, W]` vectors, `[V, W]` table -> each vector's k nearest tokens by cosine, best first."""
    similarity = F.normalize(context.float(), dim=-1) @ F.normalize(
        token_embedding.float(), dim=-1).t()  # [M, V]
    values, ids = similarity.topk(k, dim=-1)  # [M, k]
    return [[{"token": token_text(i), "id": int(i), "similarity": float(v)}
             for v, i in zip(row_values, row_ids)] for row_values, row_ids in zip(values, ids)]


def prompt_tokens(model: MPAFER, k: int = 5) -> Dict[str, List[List[Dict]]]:
    """Nearest tokens of the model's text context: {"shared": ...} or one entry per class. (Deep
    text prompts are hidden states, not word embeddings, so they are not read this way.)"""
    ctx = model.text_prompts.ctx.detach()
    table = model.clip.token_embedding.weight
    if ctx.dim() == 2:  # [M, W], one context shared by every class
        return {"shared": nearest_tokens(ctx, table, k)}
    return {name: nearest_tokens(ctx[c], table, k) for c, name in enumerate(model.classnames)}


@torch.no_grad()
def soft_hard_similarity(model: MPAFER, descriptions: Optional[Dict[str, List[str]]],
                         template: int) -> Dict[str, Dict]:
    """Per class: cosines of its soft-prompt feature with its hard prompts'; the closest class."""
    texts, labels = build_hard_prompts(model.classnames, descriptions, template)
    tokens = crop_to_longest(tokenize(list(texts))).to(model.clip.token_embedding.weight.device)
    hard = F.normalize(model.clip.encode_text_embeddings(
        model.clip.token_embedding(tokens), eot_positions(tokens)).float(), dim=-1)  # [H, D]
    was_training = model.training
    soft = model.eval().text_features()[0]  # [C, D], normalised
    model.train(was_training)
    cosine = soft @ hard.t()  # [C, H]
    labels = torch.tensor(labels, device=cosine.device)
    per_class_mean = torch.stack([cosine[:, labels == c].mean(dim=1)
                                  for c in range(len(model.classnames))], dim=1)  # [C, C]
    result = {}
    for c, name in enumerate(model.classnames):
        own = cosine[c, labels == c]
        result[name] = {"mean": float(own.mean()), "max": float(own.max()),
                        "hard_prompts": int(own.numel()),
                        "closest_class": model.classnames[int(per_class_mean[c].argmax())]}
    return result


def main(argv=None):
    """python -m mpafer.interpret --checkpoint best.pt [--soft-hard] [--tokens K] [--json F]"""
    parser = ArgumentParser(prog="python -m mpafer.interpret", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="an MPA-FER checkpoint")
    parser.add_argument("--tokens", type=int, default=5,
                        help="nearest vocabulary tokens (cosine) per text context vector")
    parser.add_argument("--soft-hard", action="store_true",
                        help="also each class's cosine between its soft-prompt feature and its "
                             "hard prompts' features (mean, max)")
    parser.add_argument("--json", help="write what is printed as JSON")
    parser.add_argument("--clip", help="CLIP name or path (default: the checkpoint's)")
    parser.add_argument("--cache-dir", default=clip.default_weights_dir(),
                        help="CLIP downloads (default: $MPAFER_WEIGHTS, else weights/)")
    parser.add_argument("--device", default="", help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    if args.tokens < 1:
        parser.error(f"--tokens must be >= 1, got {args.tokens}")
    checkpoint = load_checkpoint(args.checkpoint)
    clip_model, _ = load_checkpoint_clip(checkpoint, args.checkpoint, args.clip,
                                         cache_dir=args.cache_dir,
                                         device=resolve_device(args.device))
    model = model_from_checkpoint(checkpoint, clip_model).eval()
    report = {"prompt_tokens": prompt_tokens(model, args.tokens)}
    for owner, vectors in report["prompt_tokens"].items():  # a line per context vector
        print(f"text context ({owner}), nearest vocabulary tokens by cosine "
              "(a trailing '-' marks a word piece that continues):")
        for m, nearest in enumerate(vectors, 1):
            print(f"  v{m:<3}" + "  ".join(f"{t['token']!r} {t['similarity']:.3f}"
                                           for t in nearest))
    if args.soft_hard:
        template = model.config.hard_prompt_template
        descriptions = checkpoint.get("descriptions")
        if template == 3 and not descriptions:
            print("note: the checkpoint has no descriptions; using the shipped ones")
            descriptions = load_descriptions(model.classnames)
        report["soft_hard"] = similarity = soft_hard_similarity(model, descriptions, template)
        width = max(len(name) for name in similarity) + 2
        print("cosine of each class's soft-prompt feature with its hard prompts' features:")
        print(f"  {'class':<{width}}{'mean':>8}{'max':>8}{'hard':>6}  closest class (mean)")
        for name, s in similarity.items():
            print(f"  {name:<{width}}{s['mean']:8.3f}{s['max']:8.3f}{s['hard_prompts']:6d}"
                  f"  {s['closest_class']}")
    if args.json:
        atomic_write_json(report, args.json, ensure_ascii=False)
    return report
