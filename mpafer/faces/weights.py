"""MTCNN's weights: three small state dicts (`pnet.pt`, `rnet.pt`, `onet.pt`), the MIT-licensed
conversion that the facenet-pytorch package ships in its `data/` folder.

They download on first use from a URL pinned to one commit of that repository and are checked
with SHA-256 (the same download rule as CLIP's weights). Offline, pass a folder holding the
three files under those names (`weights_dir`; `--detector-weights DIR` on the command line):
they are read with `torch.load(weights_only=True)` and checked against the networks' shapes.
"""
import os
from typing import Dict, Optional

import torch

_REPOSITORY = "https://github.com/timesler/facenet-pytorch"
_COMMIT = "787da06156087cd6b616fe6608213722bddc30cd"
_RAW_URL = f"https://raw.githubusercontent.com/timesler/facenet-pytorch/{_COMMIT}/data/"

WEIGHT_FILES = {  # file name -> SHA-256 (identical in the repository and the package's wheel)
    "pnet.pt": "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f",
    "rnet.pt": "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86",
    "onet.pt": "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d",
}


def where_to_get(name: str) -> str:
    return (f"{_RAW_URL}{name} (or the data/ folder of the facenet-pytorch package, "
            f"{_REPOSITORY})")


def weight_paths(weights_dir: Optional[str] = None,
                 download_root: Optional[str] = None) -> Dict[str, str]:
    """{file name: path} of the three weight files.

    With `weights_dir`, the files must already be there (nothing is downloaded). Without it they
    are downloaded, once, into `download_root`, by default the weights folder the CLIP weights
    go to ($MPAFER_WEIGHTS, else the repository's weights/).
    """
    if weights_dir is not None:
        paths = {name: os.path.join(weights_dir, name) for name in WEIGHT_FILES}
        for name, path in paths.items():
            if not os.path.isfile(path):
                raise FileNotFoundError(f"face detector weights: {path} is missing; get "
                                        f"{where_to_get(name)}")
        return paths
    # The shared download helper (temporary file, SHA-256 check, rename). Imported here so that
    # a copy of this package without mpafer still works when given a weights folder.
    from ..clip.loading import default_weights_dir, download
    root = download_root or default_weights_dir()
    return {name: download(_RAW_URL + name, root, sha256) for name, sha256 in WEIGHT_FILES.items()}


def load_state_dict_into(module: torch.nn.Module, path: str):
    """Load one weight file into its network; a file that is not that network's weights is one
    clear error naming it."""
    name = os.path.basename(path)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        module.load_state_dict(state_dict)
    except Exception as error:  # unpickling, format and shape errors all mean "wrong file"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"face detector weights: {path} is not MTCNN's {name} ({reason}); get "
                         f"{where_to_get(name)}") from error
