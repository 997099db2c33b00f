"""The paper's ablation ladder: one training run per row, then one table.

    python train.py --demo --demo-ablation

Each row of `ABLATION_LADDER` adds one component of MPA-FER to the row before it (CoOp ->
+ visual prompts -> + prototype alignment -> + soft-hard alignment -> full). Every row trains
with the same seed and settings, in a folder of its own under the run folder; the table
(ablation.md, ablation.json) puts zero-shot CLIP with the hard prompts first.
"""
import json
import os
from typing import Callable, List, Tuple

from .utils import atomic_write, atomic_write_json

# The paper's ablation rows: (folder, name, flags on top of the defaults); the last is the method.
ABLATION_LADDER = (
    ("coop", "CoOp (text prompts only)", ["--visual-prompt-depth", "0", "--no-prototype-alignment",
                                          "--no-soft-hard-alignment", "--no-global-local"]),
    ("visual-prompts", "+ visual prompts", ["--no-prototype-alignment", "--no-soft-hard-alignment",
                                            "--no-global-local"]),
    ("prototype-alignment", "+ prototype alignment", ["--no-soft-hard-alignment",
                                                      "--no-global-local"]),
    ("soft-hard-alignment", "+ soft-hard alignment", ["--no-global-local"]),
    ("full", "+ global-local alignment (MPA-FER)", []),
)


def without_flags(argv: List[str], names: Tuple[str, ...], with_value: Tuple[str, ...]):
    """argv minus the flags `names` (and the value after those in `with_value`)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in names:
            skip = name in with_value and "=" not in arg
            continue
        kept.append(arg)
    return kept


def run_ablation(cfg, argv: List[str], train: Callable[[List[str]], object]):
    """--demo-ablation: `train(argv)` (train.py's main) once per row of ABLATION_LADDER, same
    seed and settings, each in a folder of its own under the run folder; then one table
    (ablation.md, ablation.json)."""
    if not cfg.demo:
        raise ValueError("--demo-ablation runs the demo's ablation ladder: add --demo")
    base = without_flags(argv, ("--demo-ablation", "--out", "--name"), ("--out", "--name"))
    rows = []
    for i, (folder, row, flags) in enumerate(ABLATION_LADDER, 1):
        out = os.path.join(cfg.out, f"{i}-{folder}")
        print(f"\n=== ablation row {i}/{len(ABLATION_LADDER)}: {row} -> {out}")
        train([*base, "--out", out, *flags])
        with open(os.path.join(out, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        best = max(records, key=lambda r: r["war"] if r["war"] is not None else -1)
        with open(os.path.join(out, "baseline.json")) as f:
            zero_shot = json.load(f)["zero_shot_hard_prompts"]
        rows.append({"row": row, "flags": " ".join(flags), "best_war": best["war"],
                     "best_uar": best["uar"], "best_epoch": best["epoch"], "folder": out})
    lines = ["| row | best test WAR | UAR | epoch |", "|---|---|---|---|",
             f"| zero-shot CLIP, hard prompts | {100 * zero_shot['war']:.2f} | "
             f"{100 * zero_shot['uar']:.2f} | - |"]
    lines += [f"| {r['row']} | {100 * r['best_war']:.2f} | {100 * r['best_uar']:.2f} | "
              f"{r['best_epoch']} |" for r in rows]
    table = "\n".join(lines)
    atomic_write(os.path.join(cfg.out, "ablation.md"),
                 lambda f: f.write((table + "\n").encode("utf-8")))
    atomic_write_json({"zero_shot_hard_prompts": zero_shot, "rows": rows},
                      os.path.join(cfg.out, "ablation.json"))
    print(f"\nDEMO ablation (synthetic faces, seed {cfg.seed}):\n{table}\n"
          f"written to {os.path.join(cfg.out, 'ablation.md')}")
