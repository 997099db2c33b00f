"""Exp-CLIP's teacher, BLIP-2 (Flan-T5-XXL) facial-action embeddings: image -> ViT-g -> Q-Former
-> 32 query tokens -> `language_projection` to the T5 width, joined by the embedded
`INSTRUCTION`, through the frozen T5 **encoder only**, mean-pooled over all non-padding
positions, L2-normalised -> `[N, 4096]`. Needs `transformers` (imported lazily).

Unlike the released code (BLIP-2 through LAVIS in the training loop), the teacher runs once, in
eval mode (the release left dropout on); the T5 activation is the model's `dense_act_fn` (LAVIS
forces exact "gelu"; the feature file records it); one dtype throughout (fp16 overflows in T5);
the encoder is called directly, not hooked in `generate`. Both feed BLIP-2 CLIP's input tensor.
"""
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..data.transforms import describe_expclip_transform, expclip_transform
from ..progress import progress_bar
from .features import ImageFiles

INSTRUCTION = ("Please play the role of a facial action describer. Objectively describe the "
               "detailed facial actions of the person in the image.")
DEFAULT_TEACHER = "Salesforce/blip2-flan-t5-xxl"


def require_transformers():
    """Import `transformers`, or fail saying how to get it and that mpafer does not need it."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            "the Exp-CLIP teacher (BLIP-2) needs Hugging Face transformers: pip install "
            "transformers. It is only needed to extract teacher features, not a run-time "
            "requirement of mpafer (training a head on cached features and zero-shot "
            "evaluation do not use it).") from e
    return transformers


def teacher_features_from_model(model, pixel_values: torch.Tensor, instruction_ids: torch.Tensor,
                                instruction_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """BLIP-2 (with a T5 language model) teacher embeddings -> `[B, H]` (fp32, unit norm).
    pixel_values `[B, 3, S, S]`; instruction_ids `[L]` or `[B, L]` (T5 ids, with the final
    `</s>`); instruction_mask `[B, L]` (1 = token, 0 = padding) when the ids are padded."""
    B = pixel_values.shape[0]
    if instruction_ids.dim() == 1:
        instruction_ids = instruction_ids.unsqueeze(0)  # [1, L]
    instruction_ids = instruction_ids.expand(B, -1).to(pixel_values.device)  # [B, L]
    if instruction_mask is None:
        instruction_mask = torch.ones_like(instruction_ids)
    instruction_mask = instruction_mask.expand(B, -1).to(pixel_values.device)  # [B, L]

    image_embeds = model.vision_model(pixel_values=pixel_values,
                                      return_dict=True).last_hidden_state  # [B, N, Wv]
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long,
                            device=image_embeds.device)  # [B, N]
    queries = model.query_tokens.expand(B, -1, -1)  # [B, Q, Wq]
    query_output = model.qformer(query_embeds=queries, encoder_hidden_states=image_embeds,
                                 encoder_attention_mask=image_mask,
                                 return_dict=True).last_hidden_state  # [B, Q, Wq]
    projection = model.language_projection
    query_embeds = projection(query_output.to(projection.weight.dtype))  # [B, Q, H]

    language_model = model.language_model
    text_embeds = language_model.get_input_embeddings()(instruction_ids)  # [B, L, H]
    inputs = torch.cat([query_embeds.to(text_embeds.dtype), text_embeds], dim=1)  # [B, Q + L, H]
    query_mask = torch.ones(query_embeds.shape[:2], dtype=instruction_mask.dtype,
                            device=inputs.device)  # [B, Q]
    mask = torch.cat([query_mask, instruction_mask], dim=1)  # [B, Q + L]
    hidden = language_model.get_encoder()(inputs_embeds=inputs, attention_mask=mask,
                                          return_dict=True).last_hidden_state  # [B, Q + L, H]
    weights = mask.to(torch.float32).unsqueeze(-1)  # [B, Q + L, 1]
    pooled = (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1)  # [B, H]
    return F.normalize(pooled, dim=-1)


@torch.no_grad()
def extract_teacher_features(image_paths: Sequence[str], model_name: str = DEFAULT_TEACHER,
                             instruction: str = INSTRUCTION, batch_size: int = 32,
                             device: Optional[Union[str, torch.device]] = None,
                             dtype: Optional[torch.dtype] = None, normalize: bool = False,
                             num_workers: int = 4, model=None, tokenizer=None,
                             progress: bool = True, return_preprocess: bool = False):
    """Teacher embeddings `[N, 4096]` (fp32, CPU, unit norm) of the images, in order (and with
    `return_preprocess`, a description of the preprocessing)."""
    transformers = require_transformers()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if model is None:
        major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
        dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        model = transformers.Blip2ForConditionalGeneration.from_pretrained(
            model_name, **{dtype_kw: dtype})
    if tokenizer is None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_name)
    model = model.to(device).eval()
    ids = tokenizer(instruction, return_tensors="pt").input_ids[0]  # [L], ends with </s>

    resolution = model.config.vision_config.image_size
    loader = DataLoader(ImageFiles(image_paths, expclip_transform(resolution, normalize)),
                        batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    features = []
    for batch in progress_bar(loader, desc="BLIP-2 teacher features", unit="batch",
                              disable=not progress):
        pixels = batch.to(device, dtype=dtype, non_blocking=True)
        features.append(teacher_features_from_model(model, pixels, ids).cpu())
    features = torch.cat(features)  # [N, H]
    if not return_preprocess:
        return features
    activation = getattr(getattr(model.config, "text_config", None), "dense_act_fn", "unknown")
    preprocess = (f"{describe_expclip_transform(resolution, normalize)}; {model_name} in "
                  f"{str(dtype).replace('torch.', '')}, eval mode, T5 feed-forward activation "
                  f"{activation}")
    return features, preprocess
