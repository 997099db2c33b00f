r"""Evaluate an MPA-FER checkpoint, zero-shot CLIP, or an Exp-CLIP head on a dataset split.

    python eval.py --checkpoint runs/rafdb/<run>/best.pt    # on the data the run was trained on
    python eval.py --checkpoint runs/rafdb/<run>/best.pt --dataset rafdb --data-root data/RAF-DB
    python eval.py --checkpoint runs/demo/<run>/best.pt --json eval.json --confusion-png cm.png
    python eval.py --zero-shot --prompts photo --dataset rafdb --data-root data/RAF-DB
    python eval.py --method expclip --head ExpCLIP_B16_model.pth --prompts ensemble10 \
                   --dataset rafdb --data-root data/RAF-DB
    python eval.py --method expclip --head ExpCLIP_B16_model.pth --prompts my_prompts.json ...

A checkpoint is evaluated by default on the data and evaluation split of the run that trained
it. Reports WAR (accuracy), UAR (mean per-class recall), per-class recall and the confusion
matrix. Photos: `python -m mpafer.predict`; inside the prompts: `python -m mpafer.interpret`.
"""
import dataclasses
import os
from typing import Callable, List, NamedTuple

from mpafer.app.cli import run_cli
from mpafer.app.config import parse_eval_flags
from mpafer.app.demo import demo_datasets
from mpafer.app.engine import evaluate
from mpafer.app.figures import confusion_figure, save_png
from mpafer.app.predict import DetectedFaces, face_convention
from mpafer.app.protocol import (
    class_set_data,
    dataset_options,
    evaluation_data,
    format_seen_and_unseen,
    require_readable_once,
    seen_and_unseen,
)
from mpafer.app.runs import load_checkpoint_clip
from mpafer.checkpoint import load_checkpoint, model_from_checkpoint
from mpafer.data import build_dataset
from mpafer.expclip import expclip_classifier, input_transform, load_head, read_head_metadata
from mpafer.faces import MTCNN
from mpafer.files import atomic_write_json
from mpafer.metrics import format_report
from mpafer.precision import resolve_amp, resolve_device
from mpafer.prompts import hard_prompts_by_class, load_descriptions


class Classifier(NamedTuple):
    """One thing to evaluate: a name, its logits, its input transform (and its name), classes."""
    label: str
    logits: Callable
    transform: Callable
    transform_name: str
    classnames: List[str]


def evaluate_all(cfg, classifiers, dataset, classnames, device, amp, checkpoint):
    """Metrics of every classifier on the split (each through its own transform), printed."""
    results = {}
    for c in classifiers:
        # A checkpoint's class order may differ from the dataset's: predictions match by name.
        order = [c.classnames.index(name) for name in classnames]
        dataset.transform = c.transform
        metrics = evaluate(lambda x, c=c: c.logits(x)[:, order], dataset, classnames, device,
                           amp, batch_size=cfg.batch_size, workers=cfg.workers, desc=c.label)
        results[c.label] = {**metrics, "transform": c.transform_name}
        print(f"\n{c.label} on {'synthetic demo' if cfg.demo else cfg.dataset} {cfg.split} "
              f"(transform: {c.transform_name}):")
        print(format_report(metrics))
        if cfg.class_set == "open" and checkpoint:
            results[c.label].update(seen_and_unseen(metrics, checkpoint["classnames"]))
            print(format_seen_and_unseen(results[c.label]))
    if len(results) > 1:
        print("\nside by side:  " + "   ".join(f"{k}: WAR {100 * v['war']:.2f}% UAR "
                                            f"{100 * v['uar']:.2f}%" for k, v in results.items()))
        transforms = {v["transform"] for v in results.values()}
        if len(transforms) == 1:
            print(f"(all on the same input transform: {transforms.pop()})")
    return results


def main(argv=None):
    cfg = parse_eval_flags(argv, __doc__)
    device = resolve_device(cfg.device)
    amp = resolve_amp(cfg.amp, device)
    checkpoint = load_checkpoint(cfg.checkpoint) if cfg.checkpoint else None  # tensors only
    given = {k: getattr(cfg, k) for k in ("demo", "dataset", "data_root", "split", "classnames")}
    data = evaluation_data(given, checkpoint)
    cfg = dataclasses.replace(cfg, **{k: data[k] for k in given},
                              workers=0 if data["demo"] else cfg.workers)
    # The split, checked before CLIP is loaded: its files, classes and that every image decodes.
    if cfg.demo:
        dataset = demo_datasets(1, data["demo_test_per_class"], words=data["demo_class_words"])[1]
    else:
        if cfg.classnames and cfg.dataset != "folder":
            raise ValueError(f"--classnames is for --dataset folder, not {cfg.dataset}")
        dataset = build_dataset(cfg.dataset, cfg.data_root, cfg.split, **dataset_options(cfg))
    if checkpoint:
        dataset = class_set_data(dataset, checkpoint["classnames"], cfg.class_set,
                                 cfg.checkpoint)
    if not (cfg.demo or cfg.skip_bad_images):
        require_readable_once(dataset, cfg.split, cfg.workers, cfg.cache_dir)
    if cfg.detect_faces:
        convention = face_convention(checkpoint)[0] if checkpoint else "folder"
        dataset = DetectedFaces(dataset, MTCNN(cfg.detector_weights, download_root=cfg.cache_dir)
                                .to(device), convention)
        print(f"--detect-faces: {len(dataset) - dataset.missed} of {len(dataset)} images had a "
              f"face, aligned by the {convention} convention; the others stay whole")
    head = read_head_metadata(cfg.head) if cfg.head and not checkpoint else {}
    clip_model, clip_name = load_checkpoint_clip(  # a head's CLIP is the one its sidecar names
        checkpoint, cfg.checkpoint, cfg.clip, cfg.clip_activation, cfg.cache_dir, device,
        cfg.allow_other_clip, demo=cfg.demo, recorded={k: head.get(f"clip_{k}") for k in (
            "name", "sha256", "activation")} if head else None)

    classifiers, classnames = [], list(dataset.classnames)
    if checkpoint:
        model = model_from_checkpoint(checkpoint, clip_model).eval()
        if cfg.class_set == "open":  # the unseen classes through the learned context
            model = model.with_classes(classnames)
        classifiers.append(Classifier(
            "MPA-FER", lambda x: model(x).logits,
            *input_transform("clip", clip_model.visual.input_resolution), model.classnames))
    if cfg.zero_shot or cfg.method == "expclip":
        # --method expclip: plain CLIP and the Exp-CLIP head on the same transform, so the
        # comparison measures the head, not the preprocessing.
        prompts, name = cfg.prompts, os.path.basename(cfg.prompts)
        if prompts == "descriptions":  # MPA-FER's hard prompts
            prompts = hard_prompts_by_class(classnames, load_descriptions(classnames), 3)
        transform = input_transform("clip" if cfg.method != "expclip" else cfg.expclip_transform,
                                    clip_model.visual.input_resolution)
        plain = expclip_classifier(clip_model, classnames, prompts).eval()
        classifiers.append(Classifier(f"zero-shot CLIP ({name})", plain, *transform, classnames))
        if cfg.method == "expclip":
            head = load_head(cfg.head, clip_model, check_clip=not cfg.allow_other_clip)
            expclip = expclip_classifier(clip_model, classnames, prompts, head=head).eval()
            classifiers.append(Classifier(f"Exp-CLIP ({name})", expclip, *transform, classnames))

    results = evaluate_all(cfg, classifiers, dataset, classnames, device, amp, checkpoint)
    main_label = classifiers[0].label if checkpoint else list(results)[-1]  # the checkpoint
    if cfg.json:
        payload = {"dataset": "synthetic-demo" if cfg.demo else cfg.dataset, "split": cfg.split,
                   "checkpoint": cfg.checkpoint, "clip": clip_name, "classifier": main_label,
                   "clip_activation": clip_model.activation, **results[main_label]}
        if len(results) > 1:
            payload["all"] = results
        atomic_write_json(payload, cfg.json)
        print(f"wrote {cfg.json}")
    if cfg.confusion_png:
        save_png(confusion_figure(results[main_label], counts=cfg.confusion_counts),
                 cfg.confusion_png)
        print(f"wrote {cfg.confusion_png}")
    return results


if __name__ == "__main__":
    run_cli(main)
