"""MPA-FER: a frozen CLIP with learnable prompts and global-local alignment."""
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import losses
from .alignment import LEARNABLE_NEEDS_TEMPERATURE, GlobalLocalAlignment
from .clip.model import CLIP
from .clip.tokenizer import tokenize
from .prompts import (
    TextPromptLearner,
    VisualPromptLearner,
    build_hard_prompts,
    crop_to_longest,
    eot_positions,
    mean_cosine_between_rows,
    pooled_word_embeddings,
)


def _field(default, text: str):
    """A config field whose `metadata["help"]` is its command-line help text."""
    return field(default=default, metadata={"help": text})


@dataclass
class MPAFERConfig:
    """Every MPA-FER setting, each a command-line flag; "(choice)" marks a value of ours where
    the paper is silent. `validate()` checks the ranges, naming the field and its flag."""
    # Text soft prompts (CoOp).
    n_ctx: int = _field(10, "M, learnable text context vectors (ignored with --ctx-init)")
    ctx_init: str = _field("", "initialise the context from this phrase (M = its token count) "
                               "instead of N(0, std^2)")
    class_specific_ctx: bool = _field(False, "one context per class instead of one shared by "
                                             "all (no base-to-novel: novel classes get none)")
    text_prompt_depth: int = _field(1, "(choice) text layers with prompts: 1 = input only, as the "
                                       "paper describes; L > 1 adds deep text prompts that replace "
                                       "the context's hidden states in layers 1..L-1")
    # Visual deep prompts (VPT-deep).
    visual_prompt_tokens: int = _field(8, "N_p, visual prompt tokens per layer (0 = none)")
    visual_prompt_depth: int = _field(-1, "image layers with visual prompts: -1 = every layer, "
                                          "0 = none")
    prompt_init_std: float = _field(0.02, "std of the N(0, std^2) prompt initialisation")
    # Hard prompts.
    hard_prompt_template: int = _field(3, "1 'a photo of {c}', 2 'a photo of a person making a "
                                          "facial expression of {c}', 3 the same followed by ', "
                                          "{description}' (one hard prompt per LLM description); "
                                          "the paper's wording, no trailing period")
    # Cross-modal global-local alignment.
    global_local: bool = _field(True, "add the local score S_l (top-k cross-attention over "
                                      "patches)")
    top_k: int = _field(16, "k, patches each class attends to")
    local_weight: float = _field(1.0, "lambda_l in S = S_g + lambda_l * S_l")
    attention_temperature: Optional[float] = _field(None, "(choice) softmax temperature over the "
                                                          "top-k; unset = uniform 1/k weights, "
                                                          "the mean of the top-k cosines")
    learnable_alignment: bool = _field(False, "(choice) identity-initialised q/k/v projections, "
                                              "off so the trainable size stays the prompts'; needs "
                                              "--attention-temperature (with uniform weights the q "
                                              "and k projections get no gradient)")
    # Losses: L = L_cls + beta * (ta_weight * L_ta + L_pa) + gamma * L_v.
    soft_hard_alignment: bool = _field(True, "soft-hard prompt alignment L_t = L_ta + L_pa")
    prototype_alignment: bool = _field(True, "prototype-guided visual alignment L_v")
    tau: float = _field(0.07, "(choice) temperature of L_ta (and of the contrastive L_pa), "
                              "CLIP's own initial temperature")
    pa_distance: str = _field("l1-mean", "L_pa distance: l1-mean (choice: the mean over D of "
                                         "|soft - hard|, an L1 loss as in PromptSRC; measured to "
                                         "regularise) | l1-sum (the L1 norm summed over D, the "
                                         "literal notation: D times stronger, it outweighs L_cls "
                                         "and costs accuracy on the demo) | contrastive (choice)")
    v_distance: str = _field("cosine", "L_v distance: cosine (1 - cos) | l1-mean (mean over D) | "
                                       "l1-sum (L1 norm, summed over D)")
    beta: float = _field(1.0, "weight beta of L_t")
    ta_weight: float = _field(1.0, "weight of L_ta inside L_t = ta_weight * L_ta + L_pa (1 = "
                                   "the paper's). With a context shared by all classes, L_ta "
                                   "sees only the mean of the context vectors and its gradient "
                                   "can outweigh L_cls's under the gradient clip; 0.1 keeps the "
                                   "alignment at a tenth of the force (see the README)")
    gamma: float = _field(1.0, "weight gamma of L_v")

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raise ValueError naming the first field whose value is out of range."""
        checks = [
            ("n_ctx", self.n_ctx >= 1, ">= 1"),
            ("text_prompt_depth", self.text_prompt_depth >= 1, ">= 1"),
            ("visual_prompt_tokens", self.visual_prompt_tokens >= 0, ">= 0"),
            ("visual_prompt_depth", self.visual_prompt_depth >= -1, ">= -1 (-1 = every layer)"),
            ("prompt_init_std", self.prompt_init_std >= 0, ">= 0"),
            ("hard_prompt_template", self.hard_prompt_template in (1, 2, 3), "1, 2 or 3"),
            ("top_k", self.top_k >= 1, ">= 1"),
            ("local_weight", self.local_weight >= 0, ">= 0"),
            ("attention_temperature",
             self.attention_temperature is None or self.attention_temperature > 0,
             "> 0 (or unset for uniform weights)"),
            ("tau", self.tau > 0, "> 0"),
            ("pa_distance", self.pa_distance in losses.PA_DISTANCES,
             f"one of {list(losses.PA_DISTANCES)}"),
            ("v_distance", self.v_distance in losses.V_DISTANCES,
             f"one of {list(losses.V_DISTANCES)}"),
            ("beta", self.beta >= 0, ">= 0"),
            ("ta_weight", self.ta_weight >= 0, ">= 0"),
            ("gamma", self.gamma >= 0, ">= 0"),
        ]
        for name, ok, expected in checks:
            if not ok:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"MPAFERConfig.{name} ({flag}) must be {expected}, got "
                                 f"{getattr(self, name)!r}")
        if self.learnable_alignment and self.attention_temperature is None:
            raise ValueError(LEARNABLE_NEEDS_TEMPERATURE)

    @classmethod
    def from_dict(cls, values: Dict) -> "MPAFERConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown MPAFERConfig fields {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> Dict:
        return asdict(self)


@dataclass
class MPAFEROutput:
    logits: torch.Tensor                  # [B, C] = s * (S_g + lambda_l * S_l), fp32 (autocast too)
    global_features: torch.Tensor         # [B, D] z_g, L2-normalised
    text_features: torch.Tensor           # [C, D] theta(t_c), L2-normalised
    local_features: Optional[torch.Tensor] = None   # [B, N, D] z_l, L2-normalised
    attention: Optional[torch.Tensor] = None        # [B, C, N] a_{c,n} (fp32): patches behind c
    soft_pooled: Optional[torch.Tensor] = None      # [C, W] pooled soft-prompt word embeddings


class MPAFER(nn.Module):
    """Frozen CLIP + text soft prompts + deep visual prompts + global-local alignment. Only the
    prompts (and alignment projections, if enabled) train; L_v needs `set_prototypes` first."""

    def __init__(self, clip_model: CLIP, classnames: Sequence[str],
                 descriptions: Optional[Dict[str, List[str]]] = None,
                 config: Optional[MPAFERConfig] = None):
        super().__init__()
        self.config = config = config or MPAFERConfig()
        config.validate()  # again: fields may have been changed after construction
        self.classnames = list(classnames)
        self.clip = clip_model.requires_grad_(False).eval()
        self.text_prompts = TextPromptLearner(
            clip_model, classnames, n_ctx=config.n_ctx, ctx_init=config.ctx_init,
            class_specific=config.class_specific_ctx, depth=config.text_prompt_depth,
            init_std=config.prompt_init_std)
        layers = clip_model.visual.transformer.layers
        depth = layers if config.visual_prompt_depth < 0 else config.visual_prompt_depth
        if depth > layers:
            raise ValueError(f"visual_prompt_depth {depth} exceeds the image tower's {layers} "
                             "layers")
        self.visual_prompts = (VisualPromptLearner(
            clip_model.visual.transformer.width, num_tokens=config.visual_prompt_tokens,
            depth=depth, init_std=config.prompt_init_std)
            if depth > 0 and config.visual_prompt_tokens > 0 else None)
        self.alignment = (GlobalLocalAlignment(
            clip_model.embed_dim, top_k=config.top_k, temperature=config.attention_temperature,
            learnable=config.learnable_alignment) if config.global_local else None)
        self.register_buffer("prototypes", None, persistent=False)  # [C, D], see set_prototypes
        if config.soft_hard_alignment:
            self._init_hard_prompts(descriptions)
        self._text_cache = None
        self.to(clip_model.logit_scale.device)  # prompts live where the CLIP does

    @torch.no_grad()
    def _init_hard_prompts(self, descriptions):
        """Frozen hard-prompt features theta(t*) `[H, D]` and pooled word embeddings `[H, W]`."""
        texts, labels = build_hard_prompts(self.classnames, descriptions,
                                           self.config.hard_prompt_template)
        device = self.clip.token_embedding.weight.device
        tokens = crop_to_longest(tokenize(texts)).to(device)  # [H, L]
        embeddings = self.clip.token_embedding(tokens)  # [H, L, W]
        eot = eot_positions(tokens)
        self.hard_texts = texts
        self.register_buffer("hard_labels", torch.tensor(labels, device=device), persistent=False)
        self.register_buffer("hard_features", F.normalize(
            self.clip.encode_text_embeddings(embeddings, eot), dim=-1), persistent=False)
        self.register_buffer("hard_pooled", pooled_word_embeddings(embeddings, eot),
                             persistent=False)

    # -- state ------------------------------------------------------------------------------

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # frozen: CLIP has no dropout or batch norm, but keep it honest
        self._text_cache = None
        return self

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state_dict: Dict[str, torch.Tensor]):
        params = {k: p for k, p in self.named_parameters() if p.requires_grad}
        missing = sorted(set(params) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(params))
        wrong = [f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(p.shape)}"
                 for k, p in params.items() if k in state_dict and state_dict[k].shape != p.shape]
        if missing or unexpected or wrong:
            raise ValueError("trainable state does not match this MPA-FER configuration: "
                             f"missing {missing}, unexpected {unexpected}, shape mismatches "
                             f"{wrong}")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state_dict[k])
        self._text_cache = None

    def parameter_groups(self) -> Dict[str, List[nn.Parameter]]:
        """The trainable parameters by component (text prompts, visual prompts, alignment)."""
        groups: Dict[str, List[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups.setdefault(name.split(".")[0], []).append(p)
        return groups

    def with_classes(self, classnames: Sequence[str]) -> "MPAFER":
        """This model for other classes (base-to-novel), sharing the learned prompts and
        alignment; for evaluation only (no hard prompts, no prototypes)."""
        if list(classnames) == self.classnames:
            return self
        if self.config.class_specific_ctx:
            raise ValueError("a class-specific context (--class-specific-ctx) has no context "
                             "for classes it was not trained on; use the shared context")
        config = replace(self.config, soft_hard_alignment=False, prototype_alignment=False)
        device = self.text_prompts.ctx.device
        # Building draws random initial prompts: keep the caller's random streams as they were.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            view = MPAFER(self.clip, classnames, None, config)
        view.text_prompts.ctx = self.text_prompts.ctx
        view.text_prompts.deep = self.text_prompts.deep
        view.visual_prompts, view.alignment = self.visual_prompts, self.alignment
        return view.train(self.training)

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def set_prototypes(self, prototypes: torch.Tensor):
        """Class prototypes `[C, D]` for L_v (see `mpafer.compute_prototypes`)."""
        expected = (len(self.classnames), self.clip.embed_dim)
        if tuple(prototypes.shape) != expected:
            raise ValueError(f"prototypes must have shape {expected}, got "
                             f"{tuple(prototypes.shape)}")
        self.prototypes = F.normalize(prototypes.float(), dim=-1).to(self.clip.logit_scale.device)

    # -- forward ----------------------------------------------------------------------------

    def text_features(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Soft-prompt text features `[C, D]` (normalised, fp32), pooled word embeddings `[C, W]`;
        cached in eval mode without autograd."""
        cacheable = not self.training and not torch.is_grad_enabled()
        device = self.text_prompts.ctx.device
        if cacheable and self._text_cache is not None and self._text_cache[0].device == device:
            return self._text_cache
        features, pooled = self.text_prompts(self.clip)
        with torch.autocast(device.type, enabled=False):
            result = (F.normalize(features.float(), dim=-1), pooled)
        if cacheable:
            self._text_cache = result
        return result

    @torch.no_grad()
    def prompt_diagnostics(self) -> Dict[str, float]:
        """For metrics.jsonl: the mean cosine between classes' pooled soft prompts (near 1, L_ta
        can only move the shared context) and the context vectors' mean L2 norm."""
        return {"soft_pooled_cos": mean_cosine_between_rows(self.text_prompts.pooled()),
                "ctx_norm": float(self.text_prompts.ctx.detach().float().norm(dim=-1).mean())}

    def forward(self, images: torch.Tensor) -> MPAFEROutput:
        """The towers run in whatever autocast the caller set; the scores after them in fp32."""
        text, pooled = self.text_features()
        prompts = self.visual_prompts() if self.visual_prompts is not None else None
        if self.alignment is None:
            z_g, z_l = self.clip.encode_image(images, prompts=prompts), None
        else:
            z_g, z_l = self.clip.encode_image(images, prompts=prompts, return_tokens=True)
        # bf16 logits of magnitude ~50 are quantised to 0.25, turning near-ties into exact ties.
        with torch.autocast(images.device.type, enabled=False):
            z_g = F.normalize(z_g.float(), dim=-1)  # [B, D]
            scores = z_g @ text.t()  # [B, C] S_g
            attention = None
            if self.alignment is not None:
                z_l = F.normalize(z_l.float(), dim=-1)  # [B, N, D]
                local, attention = self.alignment(z_l, text)  # [B, C] S_l, [B, C, N]
                scores = scores + self.config.local_weight * local
            logits = self.clip.logit_scale.exp().float() * scores
        return MPAFEROutput(logits, z_g, text, z_l, attention, pooled if self.training else None)

    def loss_parts(self, output: MPAFEROutput, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The unweighted terms of L, one per `LOSS_TERMS` entry (zero when switched off)."""
        zero = output.logits.new_zeros((), dtype=torch.float32)
        return {term.name: term.compute(self, output, labels) if term.enabled(self.config) else zero
                for term in LOSS_TERMS}

    def weighted_parts(self, parts: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The terms as they enter the total (cls, beta * ta_weight * L_ta, ...)."""
        return {term.name: term.weight(self.config) * parts[term.name] for term in LOSS_TERMS}

    def loss(self, output: MPAFEROutput,
             labels: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """-> (total, parts): L = L_cls + beta * (ta_weight * L_ta + L_pa) + gamma * L_v, and the
        unweighted parts (zero when switched off), detached, for logging."""
        parts = self.loss_parts(output, labels)
        total = sum(self.weighted_parts(parts).values())
        return total, {k: v.detach() for k, v in parts.items()}

    def term_gradient_norms(self, images: torch.Tensor, labels: torch.Tensor,
                            scale: float = 1.0) -> Dict[str, float]:
        """L2 norm of each weighted loss term's gradient on the trainable parameters (one
        backward per term; call on the bare model; under fp16 pass the GradScaler's scale)."""
        terms = self.weighted_parts(self.loss_parts(self(images), labels))
        trainable = [p for p in self.parameters() if p.requires_grad]
        return losses.gradient_norms(terms, trainable, scale)

    # -- the alignment terms, as LOSS_TERMS computes them ------------------------------------

    def token_alignment(self, output: MPAFEROutput, labels: torch.Tensor) -> torch.Tensor:
        pooled = output.soft_pooled if output.soft_pooled is not None else self.text_features()[1]
        return losses.token_alignment_loss(pooled, self.hard_pooled, self.hard_labels,
                                           self.config.tau)

    def prompt_alignment(self, output: MPAFEROutput, labels: torch.Tensor) -> torch.Tensor:
        return losses.prompt_alignment_loss(output.text_features, self.hard_features,
                                            self.hard_labels, self.config.pa_distance,
                                            self.config.tau)

    def prototype_alignment(self, output: MPAFEROutput, labels: torch.Tensor) -> torch.Tensor:
        if self.prototypes is None:
            raise RuntimeError("prototype alignment (L_v) needs class prototypes: call "
                               "model.set_prototypes(mpafer.compute_prototypes(model, loader)) "
                               "first, or set config.prototype_alignment = False")
        return losses.prototype_alignment_loss(output.global_features, self.prototypes, labels,
                                               self.config.v_distance)


@dataclass(frozen=True)
class LossTerm:
    """One term of the training loss; everything that logs or sums the loss loops over
    `LOSS_TERMS`, so a new term is a function and one entry there."""
    name: str  # its key in the loss parts, the logs, metrics.jsonl and the curves
    compute: Callable[[MPAFER, MPAFEROutput, torch.Tensor], torch.Tensor]  # (model, output, labels)
    weight_field: Optional[str] = None  # the MPAFERConfig field weighting it (None: weight 1)
    switch_field: Optional[str] = None  # the MPAFERConfig field switching it on (None: always on)

    inner_weight_field: Optional[str] = None  # a second MPAFERConfig weight, inside weight_field's

    def weight(self, config: MPAFERConfig) -> float:
        outer = 1.0 if self.weight_field is None else getattr(config, self.weight_field)
        inner = 1.0 if self.inner_weight_field is None else getattr(config, self.inner_weight_field)
        return outer * inner

    def enabled(self, config: MPAFERConfig) -> bool:
        return self.switch_field is None or bool(getattr(config, self.switch_field))


# L = L_cls + beta * (ta_weight * L_ta + L_pa) + gamma * L_v, in this order.
LOSS_TERMS: List[LossTerm] = [
    LossTerm("cls", lambda model, out, labels: losses.classification_loss(out.logits, labels)),
    LossTerm("ta", MPAFER.token_alignment, "beta", "soft_hard_alignment", "ta_weight"),
    LossTerm("pa", MPAFER.prompt_alignment, "beta", "soft_hard_alignment"),
    LossTerm("v", MPAFER.prototype_alignment, "gamma", "prototype_alignment"),
]


def loss_names() -> Tuple[str, ...]:
    """The logged loss values: the total ("loss"), then each term of `LOSS_TERMS`."""
    return ("loss", *(term.name for term in LOSS_TERMS))
