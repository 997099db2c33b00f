"""Loading CLIP: named downloads with SHA-256 checks, and checkpoint reading that never
unpickles code (weights-only torch.load, a tensors-only TorchScript unpickler, safetensors)."""
import hashlib
import json
import os
import pickle
import tempfile
import urllib.error
import urllib.request
import zipfile
from typing import Dict, Optional, Tuple, Union

import torch
from tqdm import tqdm

from .model import ACTIVATION_NAMES, CLIP, build_model, check_activation
from .safetensors_reader import looks_like_safetensors, read_safetensors
from .transform import clip_preprocess
from .transformers_format import cached_snapshot, check_heads, is_model_id, not_cached, read_model

_MODELS = {
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}


def available_models():
    return list(_MODELS)


def default_weights_dir() -> str:
    """`$MPAFER_WEIGHTS` if set, else the repository's `weights/` folder (beside `mpafer/`)."""
    if os.environ.get("MPAFER_WEIGHTS"):
        return os.path.expanduser(os.environ["MPAFER_WEIGHTS"])
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../mpafer
    return os.path.join(os.path.dirname(package_dir), "weights")


def sha256_of(*paths: str) -> str:
    """The SHA-256 of a file, or of several read one after the other (a model in shards)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def download(url: str, root: str, expected_sha256: str) -> str:
    """Fetch `url` into `root` unless there with the right SHA-256; renamed in once checked."""
    os.makedirs(root, exist_ok=True)
    target = os.path.join(root, os.path.basename(url))
    if os.path.isfile(target):
        if sha256_of(target) == expected_sha256:
            return target
        print(f"{target} exists but its SHA-256 does not match; downloading it again")
    fd, tmp = tempfile.mkstemp(dir=root, prefix=os.path.basename(target) + ".", suffix=".part")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url) as source:
            total = int(source.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(target)) as bar:
                for chunk in iter(lambda: source.read(1 << 20), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != expected_sha256:
            raise RuntimeError(f"SHA-256 mismatch for {url}: expected {expected_sha256}, got "
                               f"{digest.hexdigest()}; the download was discarded")
        umask = os.umask(0)  # reading the umask means setting it; put it straight back
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's files are private (0600)
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(
            f"could not download {url} ({e}). Without internet, fetch that file elsewhere and "
            f"put it at {target} (same file name); it is checked against SHA-256 {expected_sha256}"
        ) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


# -- reading checkpoints ----------------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptObject:
    """Stands in for a pickled TorchScript module: only its attribute dict is kept."""

    def __setstate__(self, state):
        self.attributes = state if isinstance(state, dict) else {}


class _TorchScriptUnpickler(pickle.Unpickler):
    """Rebuilds the tensors of a TorchScript archive's `data.pkl`; refuses any other global."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module, name):
        if module.startswith("__torch__"):
            return _ScriptObject
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"refusing to load '{module}.{name}' "
                                     "from a TorchScript archive")

    def persistent_load(self, pid):
        _, dtype, key, _location, _numel = pid  # ('storage', dtype, key, location, numel)
        if key not in self.storages:
            data = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
            self.storages[key] = (torch.frombuffer(data, dtype=dtype) if data
                                  else torch.empty(0, dtype=dtype))
        return self.storages[key]


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, *_):
    return storage.as_strided(tuple(size), tuple(stride), offset).clone()


def _collect_tensors(obj, prefix: str, out: Dict[str, torch.Tensor]):
    for name, value in getattr(obj, "attributes", {}).items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _collect_tensors(value, f"{prefix}{name}.", out)


def is_torchscript_archive(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def _zip_damage(path: str) -> Optional[str]:
    """Why a file that starts as a zip archive cannot be read as one; None if it reads."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return None
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        reason = str(e) or type(e).__name__
        return ("it is not a complete zip archive, as torch.save writes" if
                "not a zip file" in reason else f"its zip archive is unreadable ({reason})")
    return None


def _describe_start(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(24)
    if not head:
        return "the file is empty"
    text = head.decode("utf-8", errors="replace")
    if text.isprintable() or text.strip().isprintable():
        return f"it starts with {text.strip()!r}"
    return "it starts with binary data"


def safe_load(path: str, what: str = "file"):
    """`torch.load(weights_only=True)` on CPU, with one clear error for a file that needs
    arbitrary unpickling or is no PyTorch file at all."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} not found")
    damage = _zip_damage(path)
    if damage:
        raise ValueError(f"{what} {path} is damaged (truncated or corrupt): {damage}")
    if zipfile.is_zipfile(path):  # what torch.save writes: a zip archive with a data.pkl
        with zipfile.ZipFile(path) as archive:
            torch_file = any(n.endswith("data.pkl") for n in archive.namelist())
    else:  # or, before PyTorch 1.6, a pickle: the PROTO opcode first
        with open(path, "rb") as f:
            torch_file = f.read(1) == b"\x80"
    if not torch_file:
        raise ValueError(f"{path} is not a {what}: not a PyTorch file ({_describe_start(path)})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # The weights-only unpickler's own reason, without PyTorch's advice around it.
        lines = [line.strip() for line in str(e).split("WeightsUnpickler error:", 1)[-1]
                 .splitlines() if line.strip()]
        reason = lines[0].split(". ")[0] if lines else type(e).__name__
        raise RuntimeError(f"refusing to load {what} {path}: it holds more than tensors and plain "
                           f"containers, and reading it would need arbitrary unpickling, which "
                           f"could run code from the file ({reason})") from None
    except (EOFError, RuntimeError, KeyError, ValueError, TypeError, AttributeError,
            ImportError, zipfile.BadZipFile) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path} is not a valid {what}: torch.load failed ({reason})") from None


def load_plain_state_dict(path: str, what: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """A plain state dict file (`safe_load`), unwrapping `{"state_dict": ...}` and `module.`."""
    obj = safe_load(path, what)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{what} {path} holds a {type(obj).__name__}, not a state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def read_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """A CLIP state dict from a TorchScript archive, `.safetensors` or a plain state dict."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CLIP checkpoint {path} not found")
    if is_torchscript_archive(path):  # its tensors, keyed by attribute path
        with zipfile.ZipFile(path) as archive:
            pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            with archive.open(pkl) as f:
                root = _TorchScriptUnpickler(f, archive, pkl[: -len("data.pkl")]).load()
        state_dict = {}
        _collect_tensors(root, "", state_dict)
        return state_dict
    if looks_like_safetensors(path):
        return {k[len("module."):] if k.startswith("module.") else k: v
                for k, v in read_safetensors(path).items()}
    return load_plain_state_dict(path, "CLIP checkpoint")


def activation_record_path(path: str) -> str:
    """Where the activation of a CLIP file is recorded, when it is: `<path>.json`."""
    return path + ".json"


def recorded_activation(path: str) -> Optional[str]:
    """The MLP activation recorded beside a CLIP file (`{"activation": ...}`), or None."""
    record = activation_record_path(path)
    if not os.path.isfile(record):
        return None
    try:
        with open(record, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{record}: not a readable activation record ({error}); fix it or "
                         "remove it") from None
    activation = data.get("activation") if isinstance(data, dict) else None
    if activation is None:
        return None
    try:
        return check_activation(activation)
    except ValueError as error:
        raise ValueError(f"{record}: {error}") from None

# open_clip's weight files in a model folder (as in the hub's cache), safetensors first.
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def open_clip_folder(folder: str) -> Optional[Tuple[str, Optional[str]]]:
    """(weights file, activation) of a downloaded open_clip model folder, or None; the
    activation comes from open_clip_config.json (None without a readable one)."""
    weights = [os.path.join(folder, f) for f in OPEN_CLIP_WEIGHT_FILES
               if os.path.isfile(os.path.join(folder, f))]
    if not weights:
        return None
    try:
        with open(os.path.join(folder, "open_clip_config.json"), encoding="utf-8") as f:
            model_cfg = json.load(f).get("model_cfg")
    except (OSError, ValueError, AttributeError):
        model_cfg = None
    activation = (None if not isinstance(model_cfg, dict)
                  else "quick_gelu" if model_cfg.get("quick_gelu") else "gelu")
    return weights[0], activation


def chosen_activation(name: str, given: Optional[str], required: str, where: str) -> str:
    """`required` (the activation a model's own files state), refusing another one `given`."""
    if given not in (None, required):
        raise ValueError(f"{name} is a {ACTIVATION_NAMES[required]} model ({where}); "
                         f"activation={given!r} (--clip-activation {given}) would compute "
                         "another function")
    return required


def load(name: str, device: Union[str, torch.device, None] = None, jit: bool = False,
         download_root: Optional[str] = None, activation: Optional[str] = None
         ) -> Tuple[CLIP, object]:
    """CLIP by name or by path -> (model, preprocess), as OpenAI's `clip.load`.

    name: one of `available_models()` (downloaded, SHA-256 checked), a checkpoint file
        (TorchScript, plain state dict, `.safetensors`), a transformers CLIP folder, a cached
        Hugging Face model id, or an open_clip model folder; CLIP ViTs of OpenAI's layout only.
    activation: "quick_gelu" or "gelu"; None means what the files say (OpenAI's: QuickGELU;
        transformers: hidden_act; the record beside the file), else QuickGELU with a note.
    The model is fp32, in eval mode, frozen; `checkpoint_name` and `checkpoint_sha256` name it.
    """
    if jit:
        raise ValueError("mpafer.clip.load(jit=True): TorchScript models are not provided; "
                         "jit=False gives the same weights as an ordinary nn.Module")
    if activation is not None:
        check_activation(activation)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if name in _MODELS:
        activation = chosen_activation(name, activation, "quick_gelu", "as all OpenAI's")
        url = _MODELS[name]
        sha256 = url.split("/")[-2]
        path = download(url, download_root or default_weights_dir(), sha256)
    elif os.path.isdir(name) and open_clip_folder(name) is not None:
        path, activation_in_folder = open_clip_folder(name)
        activation = activation or activation_in_folder
    elif os.path.exists(name):
        path = name
    elif is_model_id(name):
        path = cached_snapshot(name)  # the local Hugging Face cache only, never a download
        if path is None:
            raise not_cached(name, available_models())
    else:
        raise RuntimeError(f"CLIP model {name!r} not found; available models: "
                           f"{available_models()}, or give the path of a checkpoint file or a "
                           "transformers folder, or a Hugging Face model id (ORG/NAME)")
    try:
        state_dict, config, paths = read_model(path, read_checkpoint)
        if config is not None:
            activation = chosen_activation(name, activation, config["activation"],
                                           f"hidden_act in {config['path']}")
        openai_format = name in _MODELS or is_torchscript_archive(path)  # QuickGELU
        known = activation or ("quick_gelu" if openai_format else recorded_activation(path))
        model = build_model(state_dict, known or "quick_gelu").to(device)
        if config is not None:
            check_heads(model, config, config["path"])
    except NotImplementedError as e:  # another architecture
        raise NotImplementedError(f"{name}: {e}") from None
    except (ValueError, KeyError) as e:
        # The readers' own messages start with the file they read, and say it all.
        if isinstance(e, ValueError) and str(e).startswith((f"{name} ", path)):
            raise
        raise ValueError(f"{name} is not a CLIP checkpoint ({e})") from None
    if known is None:
        print(f"note: {name} does not say which activation its CLIP was trained with; using "
              f"{ACTIVATION_NAMES['quick_gelu']} (OpenAI's). For an open_clip model trained with "
              "GELU, pass --clip-activation gelu (clip.load(..., activation=\"gelu\"))")
    if name not in _MODELS:
        sha256 = sha256_of(*paths)
    model.checkpoint_name, model.checkpoint_sha256 = name, sha256
    return model, clip_preprocess(model.visual.input_resolution)
