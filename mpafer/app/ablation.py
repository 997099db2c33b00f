"""The paper's ablation ladder over seeds (`--ablation`): one run per (row, seed) in
`<out>/<i>-<row>/seed-<s>`, then one table (ablation.md, .json); and one configuration over
seeds (`--seeds` alone). A flag given that contradicts a row's switch wins, with a note."""
import json
import os
from typing import Callable, Dict, List

from ..files import atomic_write, atomic_write_json
from . import report

# (folder, name, flags on top of the defaults); each row adds one component to the one before.
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
# The flags of the ladder runner itself, which the rows do not get (with a value: True).
OWN_FLAGS = {"--ablation": False, "--demo-ablation": False, "--seeds": True, "--seed": True,
             "--out": True, "--name": True}


def without_flags(argv: List[str], flags: Dict[str, bool]) -> List[str]:
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in flags:
            skip = flags[name] and "=" not in arg
            continue
        kept.append(arg)
    return kept


def flag_names(flags: List[str]) -> Dict[str, str]:
    """{switch name, without --no-: the flag as given}."""
    return {arg.split("=", 1)[0].replace("--no-", "--"): arg for arg in flags
            if arg.startswith("--")}


def run_ablation(cfg, argv: List[str], train: Callable[[List[str]], object]) -> Dict:
    """`train(argv)` (train.py's main) for every row and seed, then the table -> its record."""
    seeds = [int(s) for s in cfg.seeds.split(",")] if cfg.seeds else [cfg.seed]
    given = without_flags(argv, OWN_FLAGS)
    if cfg.demo and "--demo" not in given:
        given.append("--demo")
    rows = []
    for i, (folder, name, flags) in enumerate(ABLATION_LADDER, 1):
        row_flags = flag_names(flags)
        for switch, flag in flag_names(given).items():
            if switch in row_flags:
                print(f"note: {flag} (given) replaces the row's {row_flags[switch]} in row "
                      f"{name!r}")
        folders = []
        for seed in seeds:
            out = os.path.join(cfg.out, f"{i}-{folder}", f"seed-{seed}")
            print(f"\n=== ablation row {i}/{len(ABLATION_LADDER)}, seed {seed}: {name} -> {out}")
            train([*flags, *given, "--seed", str(seed), "--out", out])
            folders.append(out)
        runs = [report.read_run(folder) for folder in folders]
        (summary,) = report.summarize_groups([r for r in runs if r is not None])
        baselines = []  # each run measured zero-shot CLIP before training
        for folder in folders:
            with open(os.path.join(folder, "baseline.json")) as f:
                baselines.append(json.load(f).get("zero_shot_hard_prompts"))
        rows.append({"row": name, "flags": " ".join(flags), **summary,
                     "zero_shot": [b for b in baselines if b is not None]})
    # ablation.json: the zero-shot baseline, then every row with its change from the one before.
    zero_shot = [report.reported_numbers(z) for z in rows[0]["zero_shot"]]
    table = {"seeds": seeds, "folder": cfg.out, "zero_shot_hard_prompts": {
        k: report.mean_std([z[k] for z in zero_shot]) for k in zero_shot[0]}
        if zero_shot else None, "rows": []}  # None: the descriptions do not cover the classes
    for previous, row in zip([None, *rows], rows):
        entry = {k: row[k] for k in ("row", "flags", "n", "seeds", "runs", "reported", "war",
                                     "uar", "last_war", "last_uar", *report.BASE_TO_NOVEL)}
        entry["change"] = None if previous is None else {
            k: row[k]["mean"] - previous[k]["mean"] for k in ("war", "uar")}
        table["rows"].append(entry)
    text = report.ladder_table(table)
    atomic_write(os.path.join(cfg.out, "ablation.md"),
                 lambda f: f.write((text + "\n").encode("utf-8")))
    atomic_write_json(table, os.path.join(cfg.out, "ablation.json"))
    print(f"\nablation ladder ({'synthetic demo faces' if cfg.demo else cfg.dataset}, seeds "
          f"{', '.join(map(str, seeds))}):\n{text}\nwritten to "
          f"{os.path.join(cfg.out, 'ablation.md')} and ablation.json")
    return table


def run_seeds(cfg, argv: List[str], train: Callable[[List[str]], object]) -> List[Dict]:
    """`train(argv)` once per seed in `<out>/seed-<s>`, then the report over them (report.md)."""
    seeds = [int(s) for s in cfg.seeds.split(",")]
    given = without_flags(argv, OWN_FLAGS)
    folders = []
    for seed in seeds:
        out = os.path.join(cfg.out, f"seed-{seed}")
        print(f"\n=== seed {seed} of {', '.join(map(str, seeds))} -> {out}")
        train([*given, "--seed", str(seed), "--out", out])
        folders.append(out)
    runs = [report.read_run(folder) for folder in folders]
    summaries = report.summarize_groups([r for r in runs if r is not None])
    text = report.markdown_table(summaries)
    path = os.path.join(cfg.out, "report.md")
    atomic_write(path, lambda f: f.write((text + "\n").encode("utf-8")))
    print(f"\nover seeds {', '.join(map(str, seeds))}:\n{text}\nwritten to {path} (again: "
          f"python -m mpafer.report {os.path.join(cfg.out, 'seed-*')})")
    return summaries
