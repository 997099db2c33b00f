"""Regenerate the multi-granularity class descriptions with an OpenAI-compatible LLM, sent
`prompt.txt` per class; `main` and `generate` take the network call (`post_json`) as a parameter."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ..files import atomic_write_json
from ..labels import CANONICAL_CLASSES

FORMAT = "mpafer-descriptions/1"
GRANULARITIES = ("face", "regions", "muscles")
PROMPT_FILE = Path(__file__).with_name("prompt.txt")
DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o"
MAX_WORDS = 35
PLACEHOLDER = "{class}"

PostFn = Callable[[str, dict, str], dict]


class GenerationError(RuntimeError):
    """Any failure while generating descriptions (network, bad answer, bad arguments)."""


def load_prompt(path: Optional[os.PathLike] = None) -> str:
    """Return the exact prompt text (with the ``{class}`` placeholder)."""
    path = Path(path) if path is not None else PROMPT_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise GenerationError(f"cannot read prompt file {path}: {exc}") from exc
    if PLACEHOLDER not in text:
        raise GenerationError(f"prompt file {path} has no {PLACEHOLDER} placeholder")
    return text


def render_prompt(prompt: str, class_name: str) -> str:
    """Substitute the class name (plain replacement: the prompt contains JSON braces)."""
    return prompt.replace(PLACEHOLDER, class_name)


def post_json(url: str, payload: dict, key: str, timeout: float = 120.0) -> dict:
    """POST ``payload`` as JSON with a bearer key and return the decoded JSON reply."""
    data = json.dumps(payload).encode("utf-8")
    request = urllib.request.Request(
        url, data=data, method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")[:500]
        raise GenerationError(f"HTTP {exc.code} from {url}: {detail}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise GenerationError(f"cannot reach {url}: {reason}") from exc
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GenerationError(f"reply from {url} is not JSON: {body[:200]!r}") from exc


_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n(.*?)```", re.DOTALL)


def parse_answer(text: str, class_name: str) -> Dict[str, List[str]]:
    """One class's answer -> `{granularity: [phrases]}`, whitespace-normalised, lower case."""
    where = f"answer for class {class_name!r}"
    if not isinstance(text, str) or not text.strip():
        raise GenerationError(f"{where} is empty")
    fence = _FENCE.search(text)  # the body of the first ``` fence, if any
    try:
        obj = json.loads((fence.group(1) if fence else text).strip())
    except json.JSONDecodeError as exc:
        raise GenerationError(f"{where} is not valid JSON ({exc}): {text[:200]!r}") from exc
    if not isinstance(obj, dict):
        raise GenerationError(f"{where} must be a JSON object with keys "
                              f"{list(GRANULARITIES)}, got {type(obj).__name__}")
    result: Dict[str, List[str]] = {}
    for gran in GRANULARITIES:
        if gran not in obj:
            raise GenerationError(f"{where} lacks the {gran!r} granularity "
                                  f"(keys: {sorted(obj)})")
        items = obj[gran]
        if (not isinstance(items, list) or not items
                or not all(isinstance(s, str) and s.strip() for s in items)):
            raise GenerationError(f"{where}: {gran!r} must be a non-empty list of "
                                  f"non-empty strings, got {items!r}")
        result[gran] = [" ".join(s.split()).lower() for s in items]
    return result


def generate(class_names: Sequence[str], *, model: str, base_url: str, key: str,
             prompt: str, post: Optional[PostFn] = None, log=None) -> tuple:
    """Query the endpoint once per class; returns ``(classes_dict, reported_model)``."""
    post = post if post is not None else post_json
    url = base_url.rstrip("/") + "/chat/completions"
    classes: Dict[str, Dict[str, List[str]]] = {}
    reported = []
    for name in class_names:
        payload = {
            "model": model,
            "messages": [{"role": "user", "content": render_prompt(prompt, name)}],
            "temperature": 0,
        }
        reply = post(url, payload, key)
        if not isinstance(reply, dict):
            raise GenerationError(f"reply for class {name!r} is not a JSON object")
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise GenerationError(f"reply for class {name!r} is not a chat completion: "
                                  f"{str(reply)[:200]}") from exc
        if not isinstance(content, str):
            raise GenerationError(f"reply for class {name!r} has no text content")
        classes[name] = parse_answer(content, name)
        got = reply.get("model") or model
        if got not in reported:
            reported.append(got)
        if log is not None:
            counts = ", ".join(f"{g} {len(classes[name][g])}" for g in GRANULARITIES)
            print(f"{name}: {counts}", file=log)
    return classes, ", ".join(reported) if reported else model


def main(argv: Optional[Sequence[str]] = None, post: Optional[PostFn] = None) -> int:
    """Command-line entry point; ``post`` replaces :func:`post_json` (for tests)."""
    p = argparse.ArgumentParser(
        prog="python -m mpafer.descriptions.generate",
        description="Regenerate multi-granularity class descriptions with an "
                    "OpenAI-compatible chat-completions endpoint "
                    "($OPENAI_BASE_URL, key in $OPENAI_API_KEY).")
    p.add_argument("--classes", nargs="+", default=list(CANONICAL_CLASSES),
                   help="class names (default: the 8 canonical FER classes)")
    p.add_argument("--out", required=True, help="output JSON file")
    p.add_argument("--model", default=os.environ.get("OPENAI_MODEL", DEFAULT_MODEL),
                   help="model name sent to the endpoint (default: $OPENAI_MODEL or "
                        f"{DEFAULT_MODEL})")
    p.add_argument("--base-url", default=None,
                   help=f"endpoint base URL (default: $OPENAI_BASE_URL or {DEFAULT_BASE_URL})")
    p.add_argument("--prompt-file", default=None,
                   help="prompt template with a {class} placeholder (default: the shipped "
                        "prompt.txt)")
    p.add_argument("--notes", default=None, help="free-text provenance note")
    args = p.parse_args(argv)
    try:
        names = [c.strip() for c in args.classes]
        if any(not c for c in names):
            raise GenerationError("class names must be non-empty")
        dupes = sorted({c for c in names if names.count(c) > 1})
        if dupes:
            raise GenerationError(f"duplicate class names: {dupes}")
        key = os.environ.get("OPENAI_API_KEY", "").strip()
        if not key:
            raise GenerationError(
                "OPENAI_API_KEY is not set: export the API key of your OpenAI-compatible "
                "endpoint (and OPENAI_BASE_URL if it is not api.openai.com); local servers "
                "that ignore keys accept any value")
        base_url = args.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        prompt = load_prompt(args.prompt_file)
        prompt_file = (PROMPT_FILE.name if args.prompt_file is None
                       else str(args.prompt_file))
        classes, reported = generate(names, model=args.model, base_url=base_url, key=key,
                                     prompt=prompt, post=post, log=sys.stderr)
        notes = args.notes if args.notes is not None else (
            f"generated by python -m mpafer.descriptions.generate via {base_url} "
            f"(requested model {args.model!r}, temperature 0)")
        doc = {"format": FORMAT,
               "provenance": {"model": reported, "prompt_file": prompt_file, "prompt": prompt,
                              "date": datetime.date.today().isoformat(), "notes": notes},
               "granularities": list(GRANULARITIES), "classes": classes}
        for name, grans in classes.items():
            for gran, items in grans.items():
                for s in items:
                    if len(s.split()) > MAX_WORDS:
                        print(f"warning: longer than {MAX_WORDS} words (may not fit CLIP's 77 "
                              f"tokens): {name}/{gran}: {len(s.split())} words: {s[:60]}...",
                              file=sys.stderr)
        atomic_write_json(doc, args.out, ensure_ascii=False)
        out = Path(args.out)
    except GenerationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({len(classes)} classes, model {reported})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
