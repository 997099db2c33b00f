r"""Label the faces in your own photos with an MPA-FER checkpoint.

    python -m mpafer.predict --checkpoint runs/rafdb/<run>/best.pt photo.jpg holiday/
    python -m mpafer.predict --checkpoint best.pt photos/ --json faces.json --annotated out/
    python -m mpafer.predict --checkpoint best.pt crops/ --align none   # already aligned crops

Every face in every image (files, or folders searched for images) is found by MTCNN, cut out
the way the checkpoint's training faces were cut (--align auto: the checkpoint's recorded crop
convention, else its dataset's: RAF-DB aligned 100x100, FERPlus 48x48 grey, AffectNet's face
box, folder 224x224), and labelled. A short table per image goes to the output; --json writes

    {"checkpoint", "classes", "images": [{"path", "width", "height", "error",
     "faces": [{"box": [x0, y0, x1, y1], "score", "landmarks": [[x, y] x 5], "label",
                "probabilities": {class: p}}]}]}

with coordinates in the image's pixels after its EXIF orientation; landmarks are the left eye,
right eye, nose, left and right mouth corner ("left" = the image's left). With --align none the
whole picture is one face (centre-cropped to a square when far from one, with a note), and its
score and landmarks are null.

An image without faces gets an empty list and "no face found"; an unreadable file gets one
error line (and its "error" in the JSON) and the others go on. Exit status: 0 when every image
was read, 1 when some could not be, 2 for a bad command line.
"""
import argparse
import os
import sys
from typing import Dict, List, Optional

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from .. import clip
from ..checkpoint import face_convention_of, load_checkpoint, model_from_checkpoint
from ..data import eval_transform, load_image
from ..data.photo import face_input
from ..faces import CONVENTIONS, MTCNN, AlignedFace, detect_and_align
from ..files import atomic_write_json
from ..precision import resolve_device
from ..progress import progress_bar
from .cli import ArgumentParser
from .figures import attention_grid, draw_text, save_png, text_size
from .runs import load_checkpoint_clip

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MAX_SIDE = 1600  # photos larger than this are searched for faces in a copy of this size
ANNOTATED_MAX_SIDE = 1600  # annotated pictures are drawn at most this large


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m mpafer.predict", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="images, or folders of images")
    p.add_argument("--checkpoint", required=True, help="an MPA-FER checkpoint (best.pt)")
    p.add_argument("--json", metavar="FILE", help="write every image's faces as JSON")
    p.add_argument("--annotated", metavar="DIR",
                   help="write each image with its faces' boxes, labels and probabilities")
    p.add_argument("--attention", metavar="DIR",
                   help="write each image's faces under the global-local attention of their "
                        "predicted class")
    p.add_argument("--align", choices=("auto", "none"), default="auto",
                   help="auto: detect every face and cut it as the checkpoint's training faces "
                        "were cut; none: the whole image is one face (already aligned crops)")
    p.add_argument("--convention", choices=tuple(CONVENTIONS),
                   help="--align auto: the crop convention (default: the checkpoint's)")
    p.add_argument("--min-face", type=float, default=20,
                   help="smallest face to find, in pixels of the image (default 20)")
    p.add_argument("--max-side", type=int, default=MAX_SIDE,
                   help=f"images larger than this are searched in a copy scaled down to it "
                        f"(default {MAX_SIDE}); boxes are still in the image's pixels")
    p.add_argument("--detector-weights", metavar="DIR",
                   help="a folder holding MTCNN's pnet.pt, rnet.pt and onet.pt (default: "
                        "downloaded once into --cache-dir)")
    p.add_argument("--clip", help="CLIP name or path (default: the checkpoint's)")
    p.add_argument("--clip-activation", choices=tuple(clip.ACTIVATIONS),
                   help="the CLIP's MLP activation (default: the checkpoint's)")
    p.add_argument("--allow-other-clip", action="store_true",
                   help="use a CLIP other than the one the checkpoint was trained on")
    p.add_argument("--cache-dir", default=clip.default_weights_dir(),
                   help="CLIP and face detector downloads (default: $MPAFER_WEIGHTS, else the "
                        "repository's weights/)")
    p.add_argument("--device", default="", help="default: cuda if available, else cpu")
    args = p.parse_args(argv)
    if args.min_face < 1:
        p.error(f"--min-face must be at least 1 pixel, got {args.min_face}")
    if args.max_side < 32:
        p.error(f"--max-side must be at least 32, got {args.max_side}")
    if args.convention and args.align == "none":
        p.error("--convention is for --align auto")
    return args


def image_paths(paths: List[str]) -> List[str]:
    """Files as given; folders searched (recursively, sorted) for image files."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            for folder, subfolders, files in os.walk(path):
                subfolders.sort()
                found += [os.path.join(folder, name) for name in sorted(files)
                          if name.lower().endswith(IMAGE_EXTENSIONS)]
        elif os.path.exists(path):
            found.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist (give image files or folders)")
    if not found:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in "
                                f"{', '.join(paths)}")
    return found


def face_convention(checkpoint: Dict) -> tuple:
    """(convention name, where it came from): the checkpoint's record, else its dataset's."""
    if checkpoint.get("face_convention") in CONVENTIONS:
        return checkpoint["face_convention"], "recorded in the checkpoint"
    trained = checkpoint.get("train_config", {})
    return face_convention_of(trained), f"trained on {trained.get('dataset', 'folder')}"


def describe(convention) -> str:
    if convention.template is None:
        return f"a square about the face box with a {100 * convention.margin:.0f}% margin"
    width, height = convention.size
    return f"aligned on 5 landmarks, {width}x{height}{' grey' if convention.grey else ''}"


class Predictor:
    """A checkpoint's model, its input transform and (with --align auto) the face detector."""

    def __init__(self, args, checkpoint, device):
        clip_model, _ = load_checkpoint_clip(checkpoint, args.checkpoint, args.clip,
                                             args.clip_activation, args.cache_dir, device,
                                             allow_other_clip=args.allow_other_clip)
        self.model = model_from_checkpoint(checkpoint, clip_model).to(device).eval()
        self.resolution = clip_model.visual.input_resolution
        self.transform = eval_transform(self.resolution)
        self.classes = list(checkpoint["classnames"])
        self.device, self.args = device, args
        self.detector = None
        if args.align == "auto":
            self.detector = MTCNN(weights_dir=args.detector_weights, min_face=args.min_face,
                                  download_root=args.cache_dir).to(device)

    def faces(self, image: Image.Image, path: str, convention: str) -> List[AlignedFace]:
        if self.detector is None:  # the whole picture is the face, as eval.py --image had it
            crop, note = face_input(image, self.resolution)
            if note:
                print(f"note: {path}: {note}")
            width, height = image.size
            left, top = (width - crop.width) // 2, (height - crop.height) // 2
            return [AlignedFace(crop, (left, top, left + crop.width, top + crop.height), None,
                                None)]
        return detect_and_align(image, self.detector, convention, max_side=self.args.max_side,
                                min_face=self.args.min_face)

    @torch.no_grad()
    def classify(self, crops: List[Image.Image]):
        """-> (probabilities [N, C], attention of the predicted class [N, g, g] or None)."""
        x = torch.stack([self.transform(c) for c in crops]).to(self.device)  # [N, 3, R, R]
        out = self.model(x)
        probabilities = out.logits.float().softmax(dim=-1)
        attention = None
        if out.attention is not None:
            grid = self.resolution // self.model.clip.visual.patch_size
            predicted = probabilities.argmax(dim=-1)
            attention = out.attention[torch.arange(len(crops)), predicted].float()
            attention = attention.reshape(len(crops), grid, grid).cpu()  # [N, g, g]
        return probabilities.cpu(), attention


def face_record(face: AlignedFace, probabilities: torch.Tensor, classes: List[str]) -> Dict:
    label = classes[int(probabilities.argmax())]
    return {"box": [round(float(v), 2) for v in face.box],
            "score": None if face.score is None else round(face.score, 6),
            "landmarks": (None if face.landmarks is None
                          else [[round(x, 2), round(y, 2)] for x, y in face.landmarks]),
            "label": label,
            "probabilities": {c: round(float(p), 6) for c, p in zip(classes, probabilities)}}


def print_table(record: Dict):
    name = f"{record['path']} ({record['width']}x{record['height']})"
    if not record["faces"]:
        print(f"{name}: no face found")
        return
    faces = record["faces"]
    print(f"{name}: {len(faces)} face{'s' if len(faces) > 1 else ''}")
    print(f"  {'#':>2}  {'box x0,y0,x1,y1':<22} {'score':>6}  {'label':<12} {'p':>6}")
    for k, face in enumerate(faces, 1):
        box = ",".join(str(round(v)) for v in face["box"])
        score = "-" if face["score"] is None else f"{face['score']:.3f}"
        p = face["probabilities"][face["label"]]
        print(f"  {k:>2}  {box:<22} {score:>6}  {face['label']:<12} {100 * p:5.1f}%")


def output_name(path: str, used: set) -> str:
    """A file name for an image's figure: its stem, made unique among the images given."""
    stem = os.path.splitext(os.path.basename(path))[0]
    name, k = stem, 2
    while name in used:
        name, k = f"{stem}-{k}", k + 1
    used.add(name)
    return name + ".png"


def annotate(image: Image.Image, faces: List[Dict], classes: List[str]) -> Image.Image:
    """The picture (at most ANNOTATED_MAX_SIDE) with each face's box, label and a small bar
    per class under it."""
    scale = min(1.0, ANNOTATED_MAX_SIDE / max(image.size))
    canvas = image.convert("RGB").resize((max(1, round(image.width * scale)),
                                          max(1, round(image.height * scale))))
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(max(canvas.size) / 400))
    size = max(12, round(max(canvas.size) / 60))  # label text, readable at any picture size
    small = max(10, round(size * 0.7))
    for k, face in enumerate(faces, 1):
        x0, y0, x1, y1 = (v * scale for v in face["box"])
        draw.rectangle((x0, y0, x1, y1), outline=(255, 210, 0), width=line)
        if face["landmarks"]:
            r = max(1.0, min(line, (x1 - x0) / 30))  # small dots on small faces
            for x, y in face["landmarks"]:
                draw.ellipse((x * scale - r, y * scale - r, x * scale + r, y * scale + r),
                             fill=(0, 220, 255))
        label = f"{k}: {face['label']} {100 * face['probabilities'][face['label']]:.0f}%"
        w, h = text_size(label, size)
        above = y0 - h - 2 * line >= 0  # the label above the box, else below it
        top = y0 - h - 2 * line if above else y1 + line
        left = max(0, min(x0, canvas.width - w - 2 * line))  # inside the picture
        draw.rectangle((left, top, left + w + 2 * line, top + h + 2 * line), fill=(255, 210, 0))
        draw_text(draw, (left + line, top + line), label, size)
        below = y1 + line if above else top + h + 3 * line
        probability_bars(draw, canvas.size, face, classes, (left, below), small)
    return canvas


def probability_bars(draw, canvas_size, face, classes, origin, size):
    """A small panel under the face: its 4 likeliest classes, each with a bar and its
    percentage (moved up when the picture's bottom edge is too close)."""
    ranked = sorted(classes, key=lambda c: -face["probabilities"][c])[:4]
    row = text_size("Hg", size)[1] + 4
    name_width = max(text_size(c, size)[0] for c in ranked)
    bar, number = 4 * size, text_size("100%", size)[0]
    width, height = name_width + bar + number + 16, row * len(ranked) + 4
    x = min(max(0, origin[0]), max(0, canvas_size[0] - width))
    y = min(origin[1], max(0, canvas_size[1] - height))
    draw.rectangle((x, y, x + width, y + height), fill=(255, 255, 255))
    for i, name in enumerate(ranked):
        top, p = y + 2 + i * row, face["probabilities"][name]
        draw_text(draw, (x + 4, top + 2), name, size)
        left = x + name_width + 8
        draw.rectangle((left, top + 3, left + bar, top + row - 3), outline=(200, 200, 200))
        draw.rectangle((left, top + 3, left + bar * p, top + row - 3), fill=(31, 119, 180))
        draw_text(draw, (x + width - 4, top + 2), f"{100 * p:.0f}%", size, align="right")


def predict(args) -> Dict:
    device = resolve_device(args.device)
    paths = image_paths(args.paths)
    checkpoint = load_checkpoint(args.checkpoint)
    convention, why = face_convention(checkpoint)
    convention = args.convention or convention
    predictor = Predictor(args, checkpoint, device)
    if args.align == "auto":
        print(f"faces cut as {convention} ({describe(CONVENTIONS[convention])}; "
              f"{'--convention' if args.convention else why})")
    report = {"checkpoint": args.checkpoint, "classes": predictor.classes, "align": args.align,
              "convention": convention if args.align == "auto" else None, "images": []}
    names, failed = set(), []
    for path in paths:
        try:
            image = load_image(path)
        except OSError as error:  # one line, and the other images go on
            print(f"error: {error}", file=sys.stderr)
            report["images"].append({"path": path, "width": None, "height": None,
                                     "error": str(error), "faces": []})
            failed.append(path)
            continue
        record = {"path": path, "width": image.width, "height": image.height, "error": None,
                  "faces": []}
        faces = predictor.faces(image, path, convention)
        attention = None
        if faces:
            probabilities, attention = predictor.classify([f.crop for f in faces])
            record["faces"] = [face_record(f, p, predictor.classes)
                               for f, p in zip(faces, probabilities)]
        report["images"].append(record)
        print_table(record)
        name = output_name(path, names)
        if args.annotated:
            save_png(annotate(image, record["faces"], predictor.classes),
                     os.path.join(args.annotated, name))
        if args.attention and faces:
            write_attention(args, faces, record, attention, os.path.join(args.attention, name))
    if args.json:
        atomic_write_json(report, args.json)
        print(f"wrote {args.json}")
    if failed:
        print(f"error: {len(failed)} of {len(paths)} image(s) could not be read: "
              f"{', '.join(failed)}", file=sys.stderr)
    return report


def write_attention(args, faces, record, attention: Optional[torch.Tensor], path):
    if attention is None:
        raise ValueError(f"{args.checkpoint} has no global-local alignment (global_local = "
                         "False): no attention to draw; leave out --attention")
    tiles = []
    for k, (face, out) in enumerate(zip(faces, record["faces"]), 1):
        p = out["probabilities"][out["label"]]
        tiles.append((face.crop, attention[k - 1].numpy(),
                      [f"{k}: {out['label']} {100 * p:.1f}%", os.path.basename(record["path"])]))
    save_png(attention_grid(tiles), path)


def main(argv=None):
    args = parse_args(argv)
    for folder in (args.annotated, args.attention):
        if folder:
            os.makedirs(folder, exist_ok=True)
    report = predict(args)
    if any(image["error"] for image in report["images"]):
        sys.exit(1)
    return report


class DetectedFaces(Dataset):
    """`dataset` with each image replaced by its best face (highest detector score), found and
    aligned as `python -m mpafer.predict` does (`eval.py --detect-faces`), so that photos can be
    scored the way aligned crops are; an image without a face stays whole (`missed` counts
    them). Faces are found once, up front."""

    def __init__(self, dataset, detector: MTCNN, convention: str, transform=None):
        self.classnames, self.targets, self.transform = dataset.classnames, dataset.targets, None
        self.crops, self.missed = [], 0
        for index in progress_bar(range(len(dataset)), desc="finding faces", leave=False):
            image = dataset.load(index)
            faces = detect_and_align(image, detector, convention, max_side=MAX_SIDE)
            self.missed += not faces
            self.crops.append(faces[0].crop if faces else image)
        self.transform = transform

    def __len__(self):
        return len(self.crops)

    def load(self, index):
        return self.crops[index]

    def __getitem__(self, index):
        image = self.crops[index]
        return (self.transform(image) if self.transform else image), self.targets[index]
