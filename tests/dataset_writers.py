"""Writers for tiny datasets in each official on-disk layout (real image files, real headers).

Plain functions the tests call (not pytest fixtures); nothing here is part of mpafer."""
import csv
import io
import os

import numpy as np
from PIL import Image

from mpafer.app.synthetic import SyntheticFaces

AFFECTNET_HEADER = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                    "facial_landmarks", "expression", "valence", "arousal"]
# RAF-DB's labels 1..7, written out here (not read from mpafer) so the reader is checked against
# the format itself.
RAFDB_LABELS = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")
FER2013_HEADER = ["emotion", "pixels", "Usage"]
FER2013NEW_HEADER = ["Usage", "Image name", "neutral", "happiness", "surprise", "sadness", "anger",
                     "disgust", "fear", "contempt", "unknown", "NF"]


def save_image(path, colour, size=(40, 40), mode="RGB"):
    """A solid-colour image; JPEGs without chroma subsampling so colours survive."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.new(mode, size, colour)
    if path.lower().endswith((".jpg", ".jpeg")):
        image.save(path, quality=100, subsampling=0)
    else:
        image.save(path)
    return path


def jpeg_bytes(size=(64, 64)):
    buffer = io.BytesIO()
    # Noise makes a long entropy-coded stream, so cutting it in half really truncates it.
    pixels = np.random.default_rng(0).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_corrupt_jpeg(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"this is not a jpeg at all" * 10)
    return path


def write_truncated_jpeg(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = jpeg_bytes()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return path


def rafdb_colour(index, label):
    return (20 + 9 * index, 30 * label, 100)


def write_rafdb(root, entries, grey=()):
    """RAF-DB layout; entries: (name like 'train_00001.jpg', label 1..7). Each image has a
    distinct colour rafdb_colour(i, label); names in `grey` are written as greyscale."""
    os.makedirs(os.path.join(root, "EmoLabel"), exist_ok=True)
    with open(os.path.join(root, "EmoLabel", "list_patition_label.txt"), "w") as f:
        for i, (name, label) in enumerate(entries):
            f.write(f"{name} {label}\n")
            path = os.path.join(root, "Image", "aligned", name[:-4] + "_aligned.jpg")
            if name in grey:
                save_image(path, 128, mode="L")
            else:
                save_image(path, rafdb_colour(i, label))
    return root


def write_affectnet_csv(root, csv_name, rows, image_size=(120, 100)):
    """Official CSV release. rows: (relative path, box (x, y, w, h), expression code,
    inside colour); the image is grey outside the box and `inside colour` within it."""
    with open(os.path.join(root, csv_name), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(AFFECTNET_HEADER)
        for rel, (x, y, w, h), code, colour in rows:
            image = Image.new("RGB", image_size, (128, 128, 128))
            image.paste(Image.new("RGB", (w, h), colour), (x, y))
            path = os.path.join(root, "Manually_Annotated_Images", rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            image.save(path, quality=100, subsampling=0)
            landmarks = ";".join(f"{v:.2f}" for v in np.linspace(x, x + w, 136))
            writer.writerow([rel, x, y, w, h, landmarks, code, 0.25, -0.5])
    return root


def write_affectnet_per_image(root, folder, items):
    """Per-image release. items: (id, code, as_string) -> <folder>/images/<id>.jpg and
    <folder>/annotations/<id>_exp.npy holding the code as a numpy string or int scalar."""
    for image_id, code, as_string in items:
        save_image(os.path.join(root, folder, "images", f"{image_id}.jpg"), (10 * code, 50, 50))
        os.makedirs(os.path.join(root, folder, "annotations"), exist_ok=True)
        value = np.array(str(code)) if as_string else np.array(code, dtype=np.int64)
        np.save(os.path.join(root, folder, "annotations", f"{image_id}_exp.npy"), value)
        np.save(os.path.join(root, folder, "annotations", f"{image_id}_val.npy"), np.array("0.1"))
    return root


def write_ferplus_csvs(root, rows):
    """fer2013.csv + fer2013new.csv. rows: (usage, image name, 10 votes); the 48x48 grey
    image of row i is filled with the value i."""
    with open(os.path.join(root, "fer2013.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FER2013_HEADER)
        for i, (usage, _, _) in enumerate(rows):
            writer.writerow([0, " ".join([str(i)] * (48 * 48)), usage])
    with open(os.path.join(root, "fer2013new.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FER2013NEW_HEADER)
        for usage, name, votes in rows:
            writer.writerow([usage, name, *votes])
    return root


def write_ferplus_folder(root, folder, rows, with_box=True):
    """Exported layout: <folder>/label.csv rows '<name>,"(0, 0, 48, 48)",<10 votes>' (as in the
    microsoft/FERPlus repo; with_box=False: as written by generate_training_data.py)."""
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    with open(os.path.join(root, folder, "label.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        for i, (name, votes) in enumerate(rows):
            writer.writerow([name, "(0, 0, 48, 48)", *votes] if with_box else [name, *votes])
            save_image(os.path.join(root, folder, name), 10 * i, size=(48, 48), mode="L")
    return root


def write_synthetic_rafdb(root, num_per_class_train, num_per_class_test, seed=0, image_size=100):
    """Write SyntheticFaces to disk in the RAF-DB layout, so the RAF-DB reader reads real faces.

    Writes root/EmoLabel/list_patition_label.txt (RAF-DB label numbering) and
    root/Image/aligned/<stem>_aligned.jpg (image_size pixels, like RAF-DB's 100x100).
    Returns root.
    """
    root = os.fspath(root)
    os.makedirs(os.path.join(root, "EmoLabel"), exist_ok=True)
    os.makedirs(os.path.join(root, "Image", "aligned"), exist_ok=True)
    lines = []
    for split, num_per_class in (("train", num_per_class_train), ("test", num_per_class_test)):
        faces = SyntheticFaces(split, num_per_class, image_size=image_size, seed=seed)
        for index in range(len(faces)):
            image, label = faces[index]
            stem = f"{split}_{index + 1:05d}"
            image.save(os.path.join(root, "Image", "aligned", f"{stem}_aligned.jpg"), quality=95)
            raf_label = RAFDB_LABELS.index(faces.classnames[label]) + 1
            lines.append(f"{stem}.jpg {raf_label}\n")
    with open(os.path.join(root, "EmoLabel", "list_patition_label.txt"), "w", encoding="utf-8") as f:
        f.writelines(lines)
    return root
