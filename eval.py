r"""Evaluate an MPA-FER checkpoint, zero-shot CLIP, or an Exp-CLIP head; or predict single images.

    python eval.py --checkpoint runs/rafdb/<run>/best.pt    # on the data the run was trained on
    python eval.py --checkpoint runs/rafdb/<run>/best.pt --dataset rafdb --data-root data/RAF-DB
    python eval.py --checkpoint runs/demo/<run>/best.pt --json eval.json --confusion-png cm.png
    python eval.py --zero-shot --prompts photo --dataset rafdb --data-root data/RAF-DB
    python eval.py --method expclip --head ExpCLIP_B16_model.pth --prompts ensemble10 \
                   --dataset rafdb --data-root data/RAF-DB
    python eval.py --method expclip --head ExpCLIP_B16_model.pth --prompts my_prompts.json ...
    python eval.py --checkpoint runs/rafdb/<run>/best.pt --image a.jpg b.jpg \
                   --attention-png grid.png
    python eval.py --checkpoint runs/rafdb/<run>/best.pt --interpret-prompts --soft-hard

A checkpoint is evaluated by default on the dataset, root and evaluation split of the run that
trained it (its train_config); --dataset, --data-root and --split choose others. Reports WAR
(accuracy), UAR (mean per-class recall), per-class recall and the confusion matrix. `--image`
takes cropped face images, like the datasets' aligned faces; `--interpret-prompts` and
`--soft-hard` look inside a checkpoint's prompts and need no data.
`--method expclip` evaluates plain CLIP and the Exp-CLIP head side by side, on the same images
through the same transform (`--expclip-transform`, default the released protocol).
"""
import argparse
import os
import sys
from typing import Callable, Dict, List, NamedTuple

import torch

from mpafer import clip
from mpafer.checkpoint import (
    check_compatible,
    clip_activation,
    load_checkpoint,
    model_from_checkpoint,
)
from mpafer.data import DATASET_NAMES, build_dataset, load_image, require_readable
from mpafer.data.photo import centre_square, face_input
from mpafer.data.subsets import class_subset
from mpafer.demo import DEMO_CLIP_FILE, demo_clip_path, demo_datasets
from mpafer.engine import AMP_CHOICES, autocast, evaluate, resolve_amp, resolve_device
from mpafer.expclip import (
    INPUT_TRANSFORMS,
    PROMPT_SETS,
    ZeroShotClassifier,
    input_transform,
    is_prompt_file,
    load_head,
    recorded_clip,
)
from mpafer.figures import attention_grid, confusion_figure, save_png
from mpafer.interpret import (
    format_prompt_tokens,
    format_soft_hard,
    prompt_tokens,
    soft_hard_similarity,
)
from mpafer.labels import BASIC_CLASSES, same_class
from mpafer.metrics import format_report, over_classes
from mpafer.prompts import hard_prompts_by_class, load_descriptions
from mpafer.protocol import dataset_options
from mpafer.runs import recorded_settings
from mpafer.utils import ArgumentParser, atomic_write_json, counted, run_cli


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to evaluate")
    what.add_argument("--checkpoint", help="an MPA-FER checkpoint (best.pt / last.pt)")
    what.add_argument("--zero-shot", action="store_true", help="plain CLIP with --prompts")
    what.add_argument("--method", choices=("mpafer", "expclip"), default="mpafer",
                      help="mpafer: a --checkpoint (or --zero-shot CLIP); expclip: plain CLIP and "
                           "the Exp-CLIP --head side by side (default: mpafer)")
    what.add_argument("--head", help="Exp-CLIP projection head (.pth, released format)")
    what.add_argument("--prompts", default="photo", metavar="SET",
                      help=f"zero-shot / Exp-CLIP prompt set: {', '.join(PROMPT_SETS)}; "
                           "'descriptions' = MPA-FER's hard prompts; or a prompt file (.json: "
                           "{class: [prompts]} or [templates with {c}], see the README)")
    what.add_argument("--expclip-transform", choices=INPUT_TRANSFORMS, default="released",
                      help="--method expclip: the input transform of both classifiers; "
                           "released = Resize((R, R)) squash + ToTensor, no normalisation (the "
                           "released Exp-CLIP protocol); clip = CLIP's own preprocessing")
    what.add_argument("--clip",
                      help="CLIP name or path (default: the checkpoint's, or the one the Exp-CLIP "
                           "head records; ViT-B/16 otherwise)")
    what.add_argument("--clip-activation", choices=tuple(clip.ACTIVATIONS),
                      help="the CLIP's MLP activation (default: the checkpoint's; else QuickGELU, "
                           "with a note for a file); open_clip models without -quickgelu in "
                           "their name use gelu")
    what.add_argument("--allow-other-clip", action="store_true",
                      help="use a CLIP other than the one the checkpoint or head was trained on")
    data = p.add_argument_group("data")
    data.add_argument("--demo", action="store_true",
                      help="the synthetic demo test split (and demo CLIP); the default for a "
                           "checkpoint trained with --demo")
    data.add_argument("--dataset", choices=DATASET_NAMES,
                      help="default: the checkpoint's, else rafdb")
    data.add_argument("--data-root", help="default: the checkpoint's, else data/RAF-DB")
    data.add_argument("--split", help="default: the checkpoint's evaluation split, else test")
    data.add_argument("--classnames", metavar="A,B,C",
                      help="--dataset folder: the class folder names in label order (default: "
                           "the checkpoint's, else canonical names or their usual synonyms)")
    data.add_argument("--class-set", choices=("shared", "open"),
                      help="a checkpoint on data whose classes differ from its own: shared = "
                           "only the images of the classes both have, scored among those; open "
                           "= the data's classes, those the checkpoint was not trained on "
                           "scored through its learned context (recall marked seen/unseen)")
    data.add_argument("--skip-bad-images", action="store_true",
                      help="leave unreadable images out (default: they are an error)")
    data.add_argument("--classes", nargs="+", help="class names for --image without a checkpoint")
    data.add_argument("--image", nargs="+", metavar="PATH",
                      help="predict these images instead of a split. Each must be a cropped "
                           "face (one face filling the picture, like the datasets' aligned "
                           "faces); a picture far from square (aspect > 1.3) or larger than 4x "
                           "the model's input is centre-cropped to a square, with a note")
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write the metrics as JSON")
    out.add_argument("--confusion-png", metavar="FILE",
                     help="draw the confusion matrix (percent of each true class)")
    out.add_argument("--confusion-counts", action="store_true",
                     help="--confusion-png: write counts in the cells instead of percentages")
    out.add_argument("--attention-png", metavar="FILE",
                     help="with --image: every image in one grid, the global-local attention "
                          "of the predicted class over each face")
    inside = p.add_argument_group("inside the prompts (with --checkpoint; no data needed)")
    inside.add_argument("--interpret-prompts", action="store_true",
                        help="nearest vocabulary tokens (cosine) of each text context vector")
    inside.add_argument("--soft-hard", action="store_true",
                        help="each class's cosine between its soft-prompt feature and its hard "
                             "prompts' features (mean, max)")
    inside.add_argument("--tokens", type=int, default=5,
                        help="--interpret-prompts: tokens per context vector")
    run = p.add_argument_group("runtime")
    run.add_argument("--cache-dir", "--weights", default=clip.default_weights_dir(),
                     help="CLIP downloads (default: $MPAFER_WEIGHTS, else the repository's "
                          "weights/)")
    run.add_argument("--device", default="",
                     help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    run.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                     help="autocast: auto = bf16 on a GPU that has it, else fp16; none on CPU "
                          "(default: auto)")
    run.add_argument("--batch-size", type=int, default=64,
                     help="images per forward pass; only speed and memory (default: 64)")
    run.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                     help="image reading processes (default: min(4, CPU cores))")
    args = p.parse_args(argv)
    if args.method == "expclip" and not args.head:
        p.error("--method expclip needs --head")
    known = (*PROMPT_SETS, "descriptions")
    if args.prompts not in known and not is_prompt_file(args.prompts):
        p.error(f"--prompts must be one of {', '.join(known)} or a prompt file (.json), got "
                f"{args.prompts!r}")
    if args.method == "mpafer" and not (args.checkpoint or args.zero_shot):
        p.error("give --checkpoint (MPA-FER), --zero-shot (plain CLIP) or --method expclip "
                "--head FILE")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    if args.attention_png and not (args.image and args.checkpoint):
        p.error("--attention-png needs --checkpoint and --image")
    if (args.interpret_prompts or args.soft_hard) and not args.checkpoint:
        p.error("--interpret-prompts and --soft-hard need --checkpoint")
    if args.class_set and not args.checkpoint:
        p.error("--class-set compares a checkpoint's classes with the data's: give --checkpoint")
    if args.tokens < 1:
        p.error(f"--tokens must be >= 1, got {args.tokens}")
    return args


def prompt_set(name, classnames):
    """A named Exp-CLIP prompt set or prompt file, or MPA-FER's hard prompts built from the
    shipped descriptions."""
    if name != "descriptions":
        return name
    return hard_prompts_by_class(classnames, load_descriptions(classnames), 3)


class Classifier(NamedTuple):
    """One thing to evaluate: a name, its logits function, its input transform (and that
    transform in words), its class order."""
    label: str
    logits: Callable
    transform: Callable
    transform_name: str
    classnames: List[str]


def zero_shot_classifiers(args, clip_model, classnames) -> List[Classifier]:
    """--zero-shot: plain CLIP on CLIP's preprocessing. --method expclip: plain CLIP and the
    Exp-CLIP head side by side, fed the same images through the same transform
    (--expclip-transform), so the comparison measures the head, not the preprocessing."""
    resolution = clip_model.visual.input_resolution
    prompts = prompt_set(args.prompts, classnames)
    name = os.path.basename(args.prompts)
    plain = ZeroShotClassifier(clip_model, classnames, prompts).eval()
    if args.method != "expclip":
        return [Classifier(f"zero-shot CLIP ({name})", plain, *input_transform("clip", resolution),
                           classnames)]
    transform, transform_name = input_transform(args.expclip_transform, resolution)
    head = load_head(args.head, clip_model, check_clip=not args.allow_other_clip)
    expclip = ZeroShotClassifier(clip_model, classnames, prompts, head=head).eval()
    return [Classifier(f"zero-shot CLIP ({name})", plain, transform, transform_name, classnames),
            Classifier(f"Exp-CLIP ({name})", expclip, transform, transform_name, classnames)]


def fill_data_defaults(args, checkpoint):
    """Data not given on the command line: that of the run that trained the checkpoint (its
    dataset, root, evaluation split, folder class names; the demo's faces), else RAF-DB's
    test split."""
    trained = (checkpoint or {}).get("train_config", {})
    args.demo = args.demo or (args.dataset is None and bool(trained.get("demo")))
    args.demo_test_per_class = (trained.get("demo_test_per_class", 60) if trained.get("demo")
                                else 60)
    args.demo_class_words = trained.get("demo_class_words", "labels")
    same = not args.demo and args.dataset in (None, trained.get("dataset"))
    trained = trained if same and trained.get("dataset") in DATASET_NAMES else {}
    args.dataset = args.dataset or trained.get("dataset", "rafdb")
    args.data_root = args.data_root or trained.get("data_root", "data/RAF-DB")
    # A run that chose best.pt on a part of its training set (--val-fraction) is tested on test.
    recorded = recorded_settings(trained)
    recorded_split = "test" if recorded.get("val_fraction", 0) > 0 else recorded.get("eval_split",
                                                                                      "test")
    args.split = args.split or recorded_split
    args.classnames = args.classnames or trained.get("classnames", "")
    if args.demo:
        args.workers = 0  # the demo faces are already in memory


def read_split(args, checkpoint):
    """The split to evaluate (no transform yet), checked before CLIP is loaded: its files, its
    classes against the checkpoint's, and that every image decodes."""
    if args.classnames and args.dataset != "folder":
        raise ValueError(f"--classnames is for --dataset folder, not {args.dataset}")
    dataset = check_classes(args, checkpoint, build_dataset(args.dataset, args.data_root,
                                                            args.split, **dataset_options(args)))
    if not args.skip_bad_images:
        require_readable(dataset, args.split, args.workers)
    return dataset


def check_classes(args, checkpoint, dataset):
    """The data to evaluate, as far as the checkpoint's classes allow: all of it when the
    checkpoint knows every class (in any order: predictions match by name); with --class-set
    shared, the images of the classes both have; with --class-set open, all of it."""
    if not checkpoint:
        return dataset
    trained = checkpoint["classnames"]
    # A class the checkpoint spells otherwise (Happy, happy: happiness) is the checkpoint's.
    data = [next((t for t in trained if same_class(c, t)), c) for c in dataset.classnames]
    if data != list(dataset.classnames):
        dataset.classnames = tuple(data)
    if set(data) == set(trained):
        if args.class_set:
            print(f"note: --class-set {args.class_set}: the data has the checkpoint's classes; "
                  "nothing to leave out or add")
        return dataset
    if not args.class_set:
        raise ValueError(f"{args.checkpoint} was trained on classes {trained}, but the requested "
                         f"data has classes {data}: --class-set shared evaluates the classes both "
                         "have, --class-set open scores the data's classes (the unseen ones "
                         "through the learned context)")
    if args.class_set == "open":
        return dataset
    shared = [c for c in data if c in trained]
    if not shared:
        raise ValueError(f"{args.checkpoint} and the data have no class in common")
    kept = class_subset(dataset, shared)
    left = [c for c in data if c not in trained]
    print(f"--class-set shared: the {counted(len(shared), 'class')} both have "
          f"({', '.join(shared)}); left out: {counted(len(dataset) - len(kept), 'image')} of "
          f"{', '.join(left) or 'no class'}")
    return kept


def clip_to_load(args, checkpoint) -> str:
    """--clip, else the checkpoint's CLIP, else the one the Exp-CLIP head records, else
    ViT-B/16; the demo's tiny CLIP from the cache folder when the demo asks for it or the
    recorded one has moved."""
    head = recorded_clip(args.head).get("name") if args.head and not checkpoint else None
    name = args.clip or (checkpoint["clip"]["name"] if checkpoint else head or "")
    if name and not os.path.isfile(name) and os.path.basename(name) == DEMO_CLIP_FILE:
        name = ""
    elif head and name == head and head not in clip.available_models() and not os.path.isfile(
            head):
        raise FileNotFoundError(f"{args.head} was trained on the CLIP {head}, which is not there "
                                "any more; give its new path with --clip PATH")
    if not name and (args.demo or checkpoint or head):
        return demo_clip_path(args.cache_dir)
    return name or "ViT-B/16"


def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    amp = resolve_amp(args.amp, device)

    checkpoint = load_checkpoint(args.checkpoint) if args.checkpoint else None  # tensors only
    args.trained_classes = checkpoint["classnames"] if checkpoint else []
    fill_data_defaults(args, checkpoint)
    needs_data = not (args.image or args.demo or args.interpret_prompts or args.soft_hard)
    dataset = read_split(args, checkpoint) if needs_data else None
    clip_name = clip_to_load(args, checkpoint)
    recorded = recorded_clip(args.head) if args.head and not args.clip else {}
    activation = clip_activation(args.clip_activation or recorded.get("activation"), checkpoint,
                                 demo_clip=os.path.basename(clip_name) == DEMO_CLIP_FILE)
    clip_model, _ = clip.load(clip_name, device=device, download_root=args.cache_dir,
                              activation=activation)
    resolution = clip_model.visual.input_resolution
    if checkpoint:
        check_compatible(checkpoint, args.checkpoint, clip_model,
                         allow_other_clip=args.allow_other_clip)

    classifiers, model, classnames = [], None, None
    if checkpoint:
        model = model_from_checkpoint(checkpoint, clip_model).eval()
        classnames = checkpoint["classnames"]
        if args.interpret_prompts or args.soft_hard:
            return inspect_prompts(args, model, checkpoint)
        classifiers.append(Classifier("MPA-FER", lambda x: model(x).logits,
                                      *input_transform("clip", resolution), classnames))
    if args.image:
        classnames = classnames or args.classes or list(BASIC_CLASSES)
    else:
        if args.demo:  # one face per class for the unused training split: it is not needed
            dataset = check_classes(args, checkpoint, demo_datasets(
                1, args.demo_test_per_class, words=args.demo_class_words)[1])
        classnames = list(dataset.classnames)
        if checkpoint and args.class_set == "open":  # unseen classes through the learned context
            model = model.with_classes(classnames)
            classifiers[0] = classifiers[0]._replace(logits=lambda x: model(x).logits,
                                                     classnames=classnames)
    if args.zero_shot or args.method == "expclip":
        classifiers += zero_shot_classifiers(args, clip_model, classnames)

    if args.image:
        return predict_images(args, classifiers, model, device, amp, resolution)
    results = evaluate_all(args, classifiers, dataset, classnames, device, amp)
    main_label = classifiers[0].label if checkpoint else list(results)[-1]  # the checkpoint
    if args.json:
        payload = {"dataset": "synthetic-demo" if args.demo else args.dataset, "split": args.split,
                   "checkpoint": args.checkpoint, "clip": clip_name, "classifier": main_label,
                   "clip_activation": clip_model.activation, **results[main_label]}
        if len(results) > 1:
            payload["all"] = results
        atomic_write_json(payload, args.json)
        print(f"wrote {args.json}")
    if args.confusion_png:
        save_png(confusion_figure(results[main_label], counts=args.confusion_counts),
                 args.confusion_png)
        print(f"wrote {args.confusion_png}")
    return results


def evaluate_all(args, classifiers, dataset, classnames, device, amp):
    """Metrics of every classifier on the split (each with its transform), printed."""
    results = {}
    for c in classifiers:
        # A checkpoint's class order may differ from the dataset's: predictions match by name.
        order = [c.classnames.index(name) for name in classnames]
        dataset.transform = c.transform
        metrics = evaluate(lambda x, c=c: c.logits(x)[:, order], dataset, classnames, device,
                           amp, batch_size=args.batch_size, workers=args.workers, desc=c.label)
        results[c.label] = {**metrics, "transform": c.transform_name}
        print(f"\n{c.label} on {'synthetic demo' if args.demo else args.dataset} {args.split} "
              f"(transform: {c.transform_name}):")
        print(format_report(metrics))
        if args.class_set == "open" and args.checkpoint:
            results[c.label].update(seen_and_unseen(metrics, args.trained_classes))
            print(format_seen_and_unseen(results[c.label]))
    if len(results) > 1:
        print("\nside by side:  " + "   ".join(f"{k}: WAR {100 * v['war']:.2f}% UAR "
                                            f"{100 * v['uar']:.2f}%" for k, v in results.items()))
        transforms = {v["transform"] for v in results.values()}
        if len(transforms) == 1:
            print(f"(all on the same input transform: {transforms.pop()})")
    return results


def seen_and_unseen(metrics: Dict, seen_classes: List[str]) -> Dict:
    """--class-set open: WAR and UAR over the images of the classes the checkpoint was trained
    on ("seen") and of the others ("unseen"), from the predictions over all of them."""
    seen = [c for c in metrics["classnames"] if c in seen_classes]
    unseen = [c for c in metrics["classnames"] if c not in seen_classes]
    return {"seen": over_classes(metrics, seen), "unseen": over_classes(metrics, unseen)}


def format_seen_and_unseen(metrics: Dict) -> str:
    lines = []
    for part in ("seen", "unseen"):
        m = metrics[part]
        recall = ", ".join(f"{c} {100 * metrics['per_class_recall'][c]:.1f}%"
                           for c in m["classes"] if c in metrics["per_class_recall"])
        scores = (f"WAR {100 * m['war']:.2f}%  UAR {100 * m['uar']:.2f}%" if m["war"] is not None
                  else "WAR n/a  UAR n/a")  # no image of these classes: nothing to score
        lines.append(f"{part} classes ({counted(m['num_samples'], 'image')}): {scores}  "
                     f"recall: {recall or 'n/a'}")
    return "\n".join(lines)


def inspect_prompts(args, model, checkpoint):
    """--interpret-prompts, --soft-hard: print (and with --json write) what the prompts hold."""
    report = {}
    if args.interpret_prompts:
        report["prompt_tokens"] = prompt_tokens(model, args.tokens)
        print(format_prompt_tokens(report["prompt_tokens"]))
    if args.soft_hard:
        template = model.config.hard_prompt_template
        descriptions = checkpoint.get("descriptions")
        if template == 3 and not descriptions:
            print("note: the checkpoint has no descriptions; using the shipped ones")
            descriptions = load_descriptions(model.classnames)
        report["soft_hard"] = soft_hard_similarity(model, descriptions, template)
        print(format_soft_hard(report["soft_hard"]))
    if args.json:
        atomic_write_json(report, args.json, ensure_ascii=False)
    return report


@torch.no_grad()
def predict_images(args, classifiers, model, device, amp, resolution):
    """Class probabilities of each image under each classifier; optionally one grid of MPA-FER's
    attention over every face."""
    for c in classifiers:
        print(f"[{c.label}] input transform: {c.transform_name}")
    outputs, tiles, failed = {}, [], []
    for path in args.image:
        try:
            image, note = face_input(load_image(path), resolution)
        except OSError as error:  # report it and go on with the other images
            print(f"error: {error}", file=sys.stderr)
            failed.append(path)
            continue
        if note:
            print(f"note: {path}: {note}")
        for c in classifiers:
            x = c.transform(image).unsqueeze(0).to(device)
            with autocast(device, amp):
                logits = c.logits(x).float()
            probs = logits.softmax(dim=-1)[0]
            ranked = sorted(zip(c.classnames, probs.tolist()), key=lambda t: -t[1])
            print(f"{path} [{c.label}]: " + ", ".join(f"{n} {100 * p:.1f}%" for n, p in ranked))
            outputs.setdefault(path, {})[c.label] = dict(ranked)
        if args.attention_png and model is not None:
            tiles.append(attention_tile(model, classifiers[0].transform, image, path, device, amp))
    if tiles:
        save_png(attention_grid(tiles), args.attention_png)
        print(f"wrote {args.attention_png} (attention of each image's predicted class)")
    if args.json:
        atomic_write_json(outputs, args.json)
    if failed:
        sys.exit(f"error: {len(failed)} of {len(args.image)} image(s) could not be read: "
                 f"{', '.join(failed)}")
    return outputs


def attention_tile(model, transform, image, path, device, amp):
    """(the face as the model sees it, the predicted class's patch attention [g, g], caption)."""
    with autocast(device, amp):
        out = model(transform(image).unsqueeze(0).to(device))
    if out.attention is None:
        sys.exit("this checkpoint has no global-local alignment (global_local = False): no "
                 "attention to draw")
    probs = out.logits.float().softmax(dim=-1)[0]
    predicted = int(probs.argmax())
    grid = model.clip.visual.input_resolution // model.clip.visual.patch_size
    attention = out.attention[0, predicted].float().reshape(grid, grid).cpu().numpy()  # [g, g]
    caption = [f"{model.classnames[predicted]} {100 * float(probs[predicted]):.1f}%",
               os.path.basename(path)]
    return centre_square(image), attention, caption  # CLIP's preprocessing crops the centre


if __name__ == "__main__":
    run_cli(main)
