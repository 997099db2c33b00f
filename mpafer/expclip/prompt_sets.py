"""Prompt sets for zero-shot FER: the paper's five prompt types, or your own from a JSON file.

A prompt set gives every class a list of prompts; a class's logit is the mean of its prompts'
logits. The paper's first three types are its exact templates. The two ensembles are *our
choice* of wording, since the paper gives only their sizes: 5 and 10 FER templates, each with
the class word once, the first two of each being the paper's "expression" and "photo"
templates. The released Exp-CLIP code ships its own hand-varied ensembles, so ensemble results
can differ slightly from the paper's; whoever holds that wording can run it through a prompt
file (`load_prompt_file`, `eval.py --prompts FILE.json`).

Prompt file format (UTF-8 JSON), one of:

    {"happiness": ["an expression of happiness.", "a photo of a person embodying {c}."],
     "sadness": ["an expression of sadness.", "..."], ...}
        per class, its prompts (a list, or one string). "{c}" or "{}" in a prompt is replaced
        by the class name. Every evaluated class must be there; other classes are ignored.

    ["an expression of {c}.", "a photo of a face with an expression of {}."]
        templates used for every class; each must hold the placeholder "{c}" or "{}".
"""
import json
import os
from typing import Dict, List, Mapping, Sequence, Union

from ..clip.tokenizer import tokenize
from ..labels import CANONICAL_CLASSES

PROMPT_TEMPLATES: Dict[str, tuple] = {
    "class": ("{c}.",),
    "expression": ("an expression of {c}.",),
    "photo": ("a photo of a face with an expression of {c}.",),
    "ensemble5": (
        "an expression of {c}.",
        "a photo of a face with an expression of {c}.",
        "a photo of a person showing {c}.",
        "a close-up photo of a face expressing {c}.",
        "a cropped photo of a face displaying {c}.",
    ),
}
PROMPT_TEMPLATES["ensemble10"] = PROMPT_TEMPLATES["ensemble5"] + (
    "a facial expression of {c}.",
    "a photo of someone whose face shows {c}.",
    "a portrait of a person with a look of {c}.",
    "a good photo of a face conveying {c}.",
    "a low-resolution photo of a face showing {c}.",
)

# Prompt-type name -> {canonical class name: [prompts]}.
PROMPT_SETS: Dict[str, Dict[str, List[str]]] = {
    name: {c: [t.format(c=c) for t in templates] for c in CANONICAL_CLASSES}
    for name, templates in PROMPT_TEMPLATES.items()
}

# A prompt-type name, a prompt file (.json), or {class: [prompts]}.
PromptSet = Union[str, Mapping[str, Sequence[str]]]
PLACEHOLDERS = ("{c}", "{}")


def fill(template: str, classname: str) -> str:
    """A prompt file's template with its "{c}" / "{}" placeholders replaced by the class name
    (plain replacement: other braces in the text stay as they are)."""
    return template.replace("{c}", classname).replace("{}", classname)


def is_prompt_file(prompt_set: PromptSet) -> bool:
    return isinstance(prompt_set, (str, os.PathLike)) and (
        str(prompt_set).endswith(".json") or os.path.isfile(prompt_set))


def _string_list(value, path: str, where: str) -> List[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: {where} must be a non-empty list of prompts (or one prompt "
                         f"string), got {json.dumps(value)[:80]}")
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{path}: {where}, prompt {i + 1} must be a non-empty string, "
                             f"got {json.dumps(item)[:80]}")
    return items


def load_prompt_file(path: str, classnames: Sequence[str]) -> Dict[str, List[str]]:
    """{class: [prompts]} for `classnames`, in their order, from a prompt file (format in the
    module docstring). Every problem is a ValueError (FileNotFoundError for a missing file)
    that names the file and what is wrong with it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(data, list):
        templates = _string_list(data, path, "the template list")
        for i, t in enumerate(templates):
            if not any(p in t for p in PLACEHOLDERS):
                raise ValueError(f"{path}: template {i + 1} {t!r} has no {{c}} or {{}} "
                                 "placeholder, so every class would get the same prompt")
        prompts = {c: [fill(t, c) for t in templates] for c in classnames}
    elif isinstance(data, dict):
        missing = [c for c in classnames if c not in data]
        if missing:
            raise ValueError(f"{path}: no prompts for class(es) {missing} (the file has "
                             f"{sorted(data)}; keys must be the class names exactly)")
        prompts = {c: [fill(t, c) for t in _string_list(data[c], path, f"class {c!r}")]
                   for c in classnames}
    else:
        raise ValueError(f"{path}: expected a JSON object {{class: [prompts]}} or a list of "
                         f"templates, got a JSON {type(data).__name__}")
    for c, texts in prompts.items():
        try:
            tokenize(texts)
        except RuntimeError as e:
            raise ValueError(f"{path}: class {c!r}: {e}") from None
    return prompts


def build_prompts(prompt_set: PromptSet, classnames: Sequence[str]) -> Dict[str, List[str]]:
    """{class: [prompts]} for `classnames`, in their order.

    prompt_set: a name from `PROMPT_SETS` (its templates are filled with each class word, so
    non-canonical class names work too), a prompt file (`.json`, see `load_prompt_file`), or a
    mapping {class: [prompts]} (any number of prompts per class) that covers every class.
    """
    if not classnames:
        raise ValueError("build_prompts needs at least one class name")
    if isinstance(prompt_set, (str, os.PathLike)):
        if prompt_set in PROMPT_TEMPLATES:
            return {c: [t.format(c=c) for t in PROMPT_TEMPLATES[prompt_set]] for c in classnames}
        if is_prompt_file(prompt_set):
            return load_prompt_file(prompt_set, classnames)
        raise ValueError(f"unknown Exp-CLIP prompt set {prompt_set!r}; available: "
                         f"{', '.join(PROMPT_TEMPLATES)}, or a prompt file (.json)")
    missing = [c for c in classnames if not prompt_set.get(c)]
    if missing:
        raise ValueError(f"the prompt set has no prompts for class(es) {missing} "
                         f"(it covers {sorted(prompt_set)})")
    return {c: [str(p) for p in prompt_set[c]] for c in classnames}
