"""Tiny CLIP models in OpenAI's checkpoint format, built in the tests (nothing downloaded), and
the scripts run as a user runs them."""
import json
import os
import struct
import subprocess
import sys

import torch

from mpafer.clip.model import CLIP, SHAPES, build_model

# A few layers, width 64: the same code path as ViT-B/16, at a size the CPU runs in milliseconds.
TINY = SHAPES["tiny"]
# Width 128: two attention heads in both towers (heads = width // 64, as in OpenAI's models),
# so head splitting and merging are checked too.
MULTIHEAD = {**TINY, "vision_width": 128, "transformer_width": 128, "transformer_heads": 2}


def tiny_state_dict(seed: int = 0, **overrides) -> dict:
    """A randomly initialised CLIP's state dict (OpenAI key names), e.g. to write to disk."""
    torch.manual_seed(seed)
    model = CLIP(**{**TINY, **overrides})
    # Randomise what OpenAI's init leaves at constants, so tests see every parameter act.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln" in name or name.startswith("ln"):
                p.add_(0.05 * torch.randn_like(p))
    return model.state_dict()


def tiny_clip(seed: int = 0, **overrides) -> CLIP:
    return build_model(tiny_state_dict(seed, **overrides))


def write_safetensors(tensors: dict, path, metadata=None):
    """A `.safetensors` file written by hand from the format's definition (8-byte little-endian
    header length, JSON header, raw little-endian bytes), independent of any reader."""
    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
             torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
             torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
    header, chunks, offset = ({"__metadata__": metadata} if metadata else {}), [], 0
    for name, t in tensors.items():
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))
    return str(path)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, check=True, timeout=600):
    """`python *args` in the repository, as a user runs it -> CompletedProcess (text)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def quick_demo(out, clip_file, *extra, per_class=10):
    """The demo pipeline on a tiny random CLIP and a few synthetic faces (seconds, not minutes);
    its CLIP downloads and prototypes are cached in `<out>-cache`."""
    return ("train.py", "--demo", "--clip", clip_file, "--out", str(out), "--cache-dir",
            str(out) + "-cache", "--demo-train-per-class", str(per_class),
            "--demo-test-per-class", "4", "--batch-size", "16", *extra)


def load_script(name: str):
    """Import one of the repository's scripts (train.py, eval.py) as a module, for in-process
    calls of its functions and main()."""
    import importlib.util
    import os

    name = name if name.endswith(".py") else name + ".py"
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), name)
    spec = importlib.util.spec_from_file_location(name.replace(".py", "_script"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def untrained_checkpoint(root, classnames, seed: int = 1):
    """A tiny CLIP file and an MPA-FER checkpoint of untrained prompts on `classnames` (what
    eval.py reads as a trained run) in `root` -> (CLIP file, CLIP model, checkpoint path)."""
    from mpafer import clip
    from mpafer.checkpoint import make_checkpoint
    from mpafer.files import atomic_save
    from mpafer.model import MPAFER, MPAFERConfig
    clip_file = str(root / "clip.pt")
    torch.save(tiny_state_dict(seed=seed), clip_file)
    clip_model, _ = clip.load(clip_file, device="cpu", activation="quick_gelu")
    torch.manual_seed(0)
    model = MPAFER(clip_model, list(classnames), None,
                   MPAFERConfig(soft_hard_alignment=False, prototype_alignment=False, top_k=4))
    path = str(root / "best.pt")
    atomic_save(make_checkpoint(model, None, 1, {}), path)
    return clip_file, clip_model, path
