"""Prompts: learnable text soft prompts, deep visual prompts, hard prompts from descriptions."""
import hashlib
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .clip.model import CLIP
from .clip.tokenizer import get_tokenizer, tokenize

DESCRIPTIONS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "descriptions",
                                 "fer_descriptions.json")

# Hard-prompt templates, exactly the paper's wording. 3 is MPA-FER's (one prompt per LLM
# description); 1 and 2 are the paper's ablation (one prompt per class).
HARD_TEMPLATES = {
    1: "a photo of {c}",
    2: "a photo of a person making a facial expression of {c}",
    3: "a photo of a person making a facial expression of {c}, {d}",
}


def load_descriptions(classnames: Sequence[str], path: Optional[str] = None,
                      aliases: Optional[Dict[str, str]] = None) -> Dict[str, List[str]]:
    """LLM descriptions per class, all granularities in file order -> {class: [description]};
    `aliases` maps a class name to the file's. Errors name the file, class and description."""
    aliases = aliases or {}
    path = path or DESCRIPTIONS_PATH
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"descriptions file {path} not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    classes = data.get("classes") if isinstance(data, dict) else None
    if not isinstance(classes, dict):
        raise ValueError(f"{path}: expected a JSON object with a 'classes' mapping")
    missing = [c for c in classnames if aliases.get(c, c) not in classes]
    if missing:
        raise ValueError(f"{path} has no descriptions for {missing}; it covers {sorted(classes)}")
    granularities = data.get("granularities") or []
    result = {}
    for name in classnames:
        entry = classes[aliases.get(name, name)]
        levels = granularities or list(entry)
        found = ([d for level in levels for d in entry.get(level, [])]
                 if isinstance(entry, dict) else entry)
        if not found or not all(isinstance(d, str) and d.strip() for d in found):
            raise ValueError(f"{path}: class {name!r} needs a non-empty list of "
                             "description strings")
        for d in found:
            n = len(get_tokenizer().encode(HARD_TEMPLATES[3].format(c=name, d=d))) + 2
            if n > 77:
                raise ValueError(f"{path}: the hard prompt for {name!r} with description {d!r} is "
                                 f"{n} tokens long, more than CLIP's 77; shorten the description")
        result[name] = found
    return result


def descriptions_hash(descriptions: Optional[Dict[str, List[str]]]) -> Optional[str]:
    """SHA-256 of the descriptions actually used (stored in checkpoints)."""
    if descriptions is None:
        return None
    blob = json.dumps(descriptions, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def build_hard_prompts(classnames: Sequence[str], descriptions: Optional[Dict[str, List[str]]],
                       template: int = 3) -> Tuple[List[str], List[int]]:
    """Hard-prompt texts and the class index of each (several per class with template 3)."""
    if template not in HARD_TEMPLATES:
        raise ValueError(f"hard_prompt_template must be one of {sorted(HARD_TEMPLATES)}, "
                         f"got {template}")
    texts, labels = [], []
    for i, name in enumerate(classnames):
        if template == 3:
            if descriptions is None or not descriptions.get(name):
                raise ValueError(f"hard prompt template 3 needs descriptions for class {name!r}")
            for d in descriptions[name]:
                texts.append(HARD_TEMPLATES[3].format(c=name, d=d))
                labels.append(i)
        else:
            texts.append(HARD_TEMPLATES[template].format(c=name))
            labels.append(i)
    return texts, labels


def hard_prompts_by_class(classnames: Sequence[str], descriptions: Optional[Dict[str, List[str]]],
                          template: int = 3) -> Dict[str, List[str]]:
    """The hard prompts grouped by class, `{class: [prompt, ...]}` (e.g. for zero-shot CLIP)."""
    texts, labels = build_hard_prompts(classnames, descriptions, template)
    return {c: [t for t, y in zip(texts, labels) if y == i] for i, c in enumerate(classnames)}


def eot_positions(tokens: torch.Tensor) -> torch.Tensor:
    return tokens.argmax(dim=-1)  # EOT has the largest id


def crop_to_longest(tokens: torch.Tensor) -> torch.Tensor:
    """Drop the padding after the last EOT: exact, since causal attention never looks ahead."""
    return tokens[:, : int(eot_positions(tokens).max()) + 1]


def pooled_word_embeddings(embeddings: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """`[P, L, W]` -> `[P, W]`: each prompt's mean word-token embedding (no SOT/EOT/padding)."""
    positions = torch.arange(embeddings.shape[1], device=embeddings.device)
    mask = ((positions >= 1) & (positions < eot[:, None])).to(embeddings.dtype)  # [P, L]
    return (embeddings * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # [P, W]


def mean_cosine_between_rows(vectors: torch.Tensor) -> float:
    """The mean cosine between different rows of `[C, W]`; 0 for a single row."""
    count = vectors.shape[0]
    if count < 2:
        return 0.0
    unit = torch.nn.functional.normalize(vectors.detach().float(), dim=-1)
    cosine = unit @ unit.t()  # [C, C]
    return float((cosine.sum() - cosine.diagonal().sum()) / (count * (count - 1)))


def soft_prompt_tokens(classnames: Sequence[str], n_ctx: int) -> torch.Tensor:
    """Token ids `[C, L]` of "X X .. X <class>.", the Xs holding the n_ctx context positions."""
    names = [c.replace("_", " ") for c in classnames]
    return crop_to_longest(tokenize([" ".join(["X"] * n_ctx + [name]) + "." for name in names]))


class TextPromptLearner(nn.Module):
    """CoOp soft prompts `[SOS] v_1 .. v_M <class name> . [EOS]`: ctx `[M, W]` (shared) or
    `[C, M, W]` (class-specific), from N(0, std^2) or `ctx_init`'s embeddings. With depth > 1,
    `deep` `[depth - 1, M, W]` replaces the context's hidden states in layers 1 .. depth-1."""

    def __init__(self, clip_model: CLIP, classnames: Sequence[str], n_ctx: int = 10,
                 ctx_init: str = "", class_specific: bool = False, depth: int = 1,
                 init_std: float = 0.02):
        super().__init__()
        width = clip_model.token_embedding.embedding_dim
        if not 1 <= depth <= clip_model.transformer.layers:
            raise ValueError(f"text_prompt_depth must be in 1..{clip_model.transformer.layers}, "
                             f"got {depth}")
        init_ids = get_tokenizer().encode(ctx_init) if ctx_init else []
        if not init_ids and n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1 (or give ctx_init), got {n_ctx}")
        n_ctx = len(init_ids) or n_ctx
        tokens = soft_prompt_tokens(classnames, n_ctx).to(clip_model.token_embedding.weight.device)
        with torch.no_grad():
            embedding = clip_model.token_embedding(tokens)  # [C, L, W]
        self.n_ctx, self.class_specific = n_ctx, class_specific
        self.register_buffer("token_prefix", embedding[:, :1].clone(),  # [C, 1, W] SOS
                             persistent=False)
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx:].clone(),  # [C, L-1-M, W]
                             persistent=False)
        self.register_buffer("eot", eot_positions(tokens), persistent=False)  # [C]
        shape = (len(classnames), n_ctx, width) if class_specific else (n_ctx, width)
        if init_ids:
            with torch.no_grad():
                init = clip_model.token_embedding(tokens.new_tensor(init_ids))  # [M, W]
            ctx = init.expand(shape).clone()
        else:
            ctx = torch.randn(shape, device=tokens.device) * init_std
        self.ctx = nn.Parameter(ctx)
        self.deep = (nn.Parameter(torch.randn(depth - 1, n_ctx, width) * init_std)
                     if depth > 1 else None)

    def embeddings(self) -> torch.Tensor:
        """The prompts' input token embeddings `[C, L, W]`."""
        ctx = (self.ctx if self.class_specific
               else self.ctx.expand(self.token_prefix.shape[0], -1, -1))
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)  # [C, 1 + M + rest, W]

    def pooled(self, embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The pooled word-token embeddings `[C, W]` that L_ta contrasts (of `embeddings()`)."""
        x = self.embeddings() if embeddings is None else embeddings
        return pooled_word_embeddings(x, self.eot)

    def deep_prompts(self) -> Optional[List[Optional[torch.Tensor]]]:
        return None if self.deep is None else [None, *self.deep.unbind(0)]

    def forward(self, clip_model: CLIP) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (text features `[C, D]` unnormalised, pooled word embeddings `[C, W]`)."""
        x = self.embeddings()
        features = clip_model.encode_text_embeddings(x, self.eot, deep_prompts=self.deep_prompts())
        return features, self.pooled(x)


class VisualPromptLearner(nn.Module):
    """VPT-deep: N_p tokens `[depth, N_p, W]` joined to the sequence before each of the first
    `depth` layers of the image tower and dropped after it (init N(0, std^2))."""

    def __init__(self, width: int, num_tokens: int = 8, depth: int = 12, init_std: float = 0.02):
        super().__init__()
        self.prompts = nn.Parameter(torch.randn(depth, num_tokens, width) * init_std)

    def forward(self) -> List[torch.Tensor]:
        return list(self.prompts.unbind(0))
