"""Prompt sets for zero-shot FER: the paper's five prompt types, or your own from a JSON file.

The first three types are the paper's templates; the two ensembles are the released code's lists
(`released_ensembles`), with their common pattern for other class names. A prompt file
(`eval.py --prompts FILE.json`) is either `{"happiness": ["an expression of happiness.", ...]}`,
prompts per class (every evaluated class must be there), or `["an expression of {c}.", ...]`,
templates for every class. "{c}" or "{}" in a prompt is replaced by the class name.
"""
import json
import os
from typing import Dict, List, Mapping, Sequence, Union

from ..clip.tokenizer import tokenize
from ..labels import CANONICAL_CLASSES
from .released_ensembles import GENERIC_ENSEMBLES, RELEASED_ENSEMBLES

# Prompt-type name -> templates; for the ensembles, the pattern for classes the release lacks.
PROMPT_TEMPLATES: Dict[str, tuple] = {
    "class": ("{c}.",),
    "expression": ("an expression of {c}.",),
    "photo": ("a photo of a face with an expression of {c}.",),
    **GENERIC_ENSEMBLES,
}


def named_prompts(name: str, classname: str) -> List[str]:
    """Prompt type `name`'s prompts for one class: the released list, else its templates."""
    released = RELEASED_ENSEMBLES.get(name, {})
    if classname in released:
        return list(released[classname])
    return [t.format(c=classname) for t in PROMPT_TEMPLATES[name]]


# Prompt-type name -> {canonical class name: [prompts]}.
PROMPT_SETS: Dict[str, Dict[str, List[str]]] = {
    name: {c: named_prompts(name, c) for c in CANONICAL_CLASSES} for name in PROMPT_TEMPLATES
}

# A prompt-type name, a prompt file (.json), or {class: [prompts]}.
PromptSet = Union[str, Mapping[str, Sequence[str]]]
PLACEHOLDERS = ("{c}", "{}")


def fill(template: str, classname: str) -> str:
    """Plain replacement of "{c}" / "{}": other braces in the text stay as they are."""
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
    """{class: [prompts]} for `classnames` from a prompt file (errors name the file)."""
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
    """{class: [prompts]} for `classnames` from a `PROMPT_SETS` name, a file or a mapping."""
    if not classnames:
        raise ValueError("build_prompts needs at least one class name")
    if isinstance(prompt_set, (str, os.PathLike)):
        if prompt_set in PROMPT_TEMPLATES:
            return {c: named_prompts(prompt_set, c) for c in classnames}
        if is_prompt_file(prompt_set):
            return load_prompt_file(prompt_set, classnames)
        raise ValueError(f"unknown Exp-CLIP prompt set {prompt_set!r}; available: "
                         f"{', '.join(PROMPT_TEMPLATES)}, or a prompt file (.json)")
    missing = [c for c in classnames if not prompt_set.get(c)]
    if missing:
        raise ValueError(f"the prompt set has no prompts for class(es) {missing} "
                         f"(it covers {sorted(prompt_set)})")
    return {c: [str(p) for p in prompt_set[c]] for c in classnames}
