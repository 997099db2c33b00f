"""`python -m mpafer.expclip cache | teacher | train`: Exp-CLIP's feature file, then its head.

    python -m mpafer.expclip cache   --clip ViT-B/16 --images CAER-S/ --out feats.pt
    python -m mpafer.expclip teacher --features feats.pt             # needs `transformers`
    python -m mpafer.expclip train   --features feats.pt             # runs/expclip/<time>/

`train` writes expclip_head.pth (the released format), config.json, log.txt and metrics.jsonl
into its run folder.
"""
import json
import os

import torch

from .. import clip
from ..expclip.features import add_teacher_features, cache_image_features, load_features
from ..expclip.teacher import (
    DEFAULT_TEACHER,
    INSTRUCTION,
    extract_teacher_features,
    require_transformers,
)
from ..expclip.train import train_head_from_file
from ..files import atomic_write, atomic_write_json
from ..progress import counted
from .cli import ArgumentParser, run_cli
from .runs import Logger, clear_run_files, folder_conflict, new_run_folder

# The paper's recipe: SGD, 5 epochs, batch 512, lr 1e-3, momentum 0.9, weight decay 1e-4.
RECIPE = dict(epochs=5, batch_size=512, lr=1e-3, momentum=0.9, weight_decay=1e-4, seed=1)


def cache(args):
    model, _ = clip.load(args.clip, device=args.device, download_root=args.cache_dir,
                         activation=args.clip_activation)
    data = cache_image_features(model, args.images, args.out, normalize=args.normalize,
                                batch_size=args.batch_size, num_workers=args.workers,
                                skip_bad_images=args.skip_bad_images)
    print(f"wrote {args.out}: {counted(len(data['paths']), 'image')}, clip_features "
          f"{tuple(data['clip_features'].shape)} ({data['clip_name']}; {data['preprocess']})")


def teacher(args):
    try:  # the one thing this step needs beyond mpafer: say so before reading anything
        require_transformers()
    except ImportError as error:
        raise RuntimeError(str(error)) from None  # one line (run_cli), not a traceback
    data = load_features(args.features, require_teacher=False)
    root = args.images if args.images is not None else data.get("root", "")
    paths = [os.path.join(root, p) for p in data["paths"]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in {args.features} not found, "
                                f"first: {missing[0]} (pass the image folder with --images)")
    features, preprocess = extract_teacher_features(
        paths, model_name=args.model, instruction=args.instruction,
        batch_size=args.batch_size, device=args.device, normalize=args.normalize,
        num_workers=args.workers, return_preprocess=True)
    add_teacher_features(args.features, features, args.model, args.instruction, preprocess)
    print(f"added teacher_features {tuple(features.shape)} to {args.features}")


def train(args):
    if not os.path.isfile(args.features):
        raise FileNotFoundError(f"--features: {args.features} not found (make it with `python -m "
                                "mpafer.expclip cache` and `python -m mpafer.expclip teacher`)")
    out = args.out or new_run_folder("expclip", args.name)
    conflict = folder_conflict(out)
    if conflict and not args.overwrite:
        raise ValueError(conflict)
    clear_run_files(out)
    os.makedirs(out, exist_ok=True)
    log = Logger(True)
    log.open(os.path.join(out, "log.txt"))
    hparams = {k: getattr(args, k) for k in RECIPE}
    metadata = train_head_from_file(args.features, os.path.join(out, "expclip_head.pth"),
                                    device=args.device, log=log, **hparams)
    # (the batch that ran: a batch larger than the file shrinks to it)
    atomic_write_json({"train": {"features": args.features, **metadata["hparams"]}},
                      os.path.join(out, "config.json"))
    lines = "".join(json.dumps(h) + "\n" for h in metadata["history"])
    atomic_write(os.path.join(out, "metrics.jsonl"), lambda f: f.write(lines.encode()))
    return metadata


def parse_args(argv=None):
    """The command and its options, checked (nothing runs)."""
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    default_workers = min(4, os.cpu_count() or 1)  # more readers than cores only compete
    parser = ArgumentParser(prog="python -m mpafer.expclip",
                                     description=__doc__.split("\n")[0],
                                     epilog="Evaluate a head with: python eval.py --method "
                                            "expclip --head FILE ...")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("cache", help="cache the CLIP image features of an image folder")
    p.add_argument("--clip", required=True, help="CLIP name (e.g. ViT-B/16) or checkpoint path")
    p.add_argument("--clip-activation", choices=tuple(clip.ACTIVATIONS),
                   help="the CLIP's MLP activation (default QuickGELU; gelu for open_clip models "
                        "without -quickgelu in their name)")
    p.add_argument("--images", required=True, help="image folder (recursive; labels ignored)")
    p.add_argument("--out", required=True, help="feature file to write (.pt)")
    p.add_argument("--normalize", action="store_true",
                   help="CLIP mean/std normalisation (off by default, as for the released heads)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=default_workers,
                   help="image reading processes (default: min(4, CPU cores))")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave unreadable images out, with a note (default: they are an error)")
    p.add_argument("--device", default=default_device)
    p.add_argument("--cache-dir", default=clip.default_weights_dir(),
                   help="CLIP downloads (default: $MPAFER_WEIGHTS, else the repository's "
                        "weights/)")
    p.set_defaults(run=cache)

    p = sub.add_parser("teacher", help="add BLIP-2 teacher features to a feature file "
                                       "(needs `pip install transformers`)")
    p.add_argument("--features", required=True, help="feature file made by `cache`")
    p.add_argument("--images", default=None, help="image folder (default: the one cached)")
    p.add_argument("--model", default=DEFAULT_TEACHER,
                   help="BLIP-2 model (Hugging Face name or path)")
    p.add_argument("--instruction", default=INSTRUCTION)
    p.add_argument("--normalize", action="store_true",
                   help="normalise the teacher's input (the official code fed it un-normalised)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=default_workers,
                   help="image reading processes (default: min(4, CPU cores))")
    p.add_argument("--device", default=default_device)
    p.set_defaults(run=teacher)

    p = sub.add_parser("train", help="train the head on a feature file (the paper's recipe)")
    p.add_argument("--features", required=True, help="feature file with teacher features")
    p.add_argument("--out", default="", help="the run folder (default runs/expclip/<time>)")
    p.add_argument("--name", default="", help="the run folder is runs/expclip/NAME")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the head in an existing run folder (default: refuse)")
    for name, value in RECIPE.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                       help=f"(the paper's recipe: {value})")
    p.add_argument("--device", default=default_device)
    p.set_defaults(run=train)

    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    run_cli(main)
