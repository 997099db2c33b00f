"""Summaries over run folders: WAR/UAR mean ± std per configuration across seeds, and the
training curves of each run.

    python -m mpafer.report runs/rafdb/*                      # one Markdown table
    python -m mpafer.report runs/fewshot/* --json summary.json --curves

Runs are grouped by configuration and data (by content), ignoring the seed and settings that
change no result. Each gives its reported result (test.json, else best.pt's evaluation) and its
last evaluated epoch, which involves no model selection. Std: the sample std (n - 1).
"""
import argparse
import glob
import hashlib
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from ..checkpoint import load_checkpoint
from ..files import atomic_write_json
from ..model import loss_names
from .cli import ArgumentParser, run_cli
from .config import RESULT_NEUTRAL
from .figures import save_png, training_curves
from .fingerprint import data_identity

# Training fields that do not tell runs apart: the seed, and those that change no result.
IGNORED = RESULT_NEUTRAL | {"seed"}


def read_jsonl(path: str) -> List[Dict]:
    """Records of a JSON-lines file; a malformed line is an error naming `file:line`."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
    return records


def read_json(path: str) -> Dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def run_data(folder: str, config: Dict) -> Tuple[Optional[str], str]:
    """-> (what identifies the data a run trained on, a readable name): the identity of the
    record in last.pt, else a hash of its data root; None for the demo, drawn from settings."""
    train = config.get("train", {})
    if train.get("demo"):
        return None, "synthetic-demo"
    root = str(train.get("data_root", ""))
    name = f"{train.get('dataset')}:{os.path.basename(os.path.normpath(root)) or root}"
    last = os.path.join(folder, "last.pt")
    if os.path.isfile(last):
        try:
            record = load_checkpoint(last).get("resume", {}).get("data")
        except (ValueError, RuntimeError, OSError) as error:
            print(f"note: {folder}: its data is told by its root, {root} ({error})",
                  file=sys.stderr)
            record = None
        if record:
            return data_identity(record), name
    return hashlib.sha256(f"root:{os.path.abspath(root)}".encode("utf-8")).hexdigest(), name


def read_run(folder: str) -> Optional[Dict]:
    """One run's configuration, seed and results; None (with a note) when it has none."""
    config_path, metrics_path = (os.path.join(folder, n) for n in ("config.json", "metrics.jsonl"))
    if not os.path.isfile(config_path) or not os.path.isfile(metrics_path):
        print(f"note: skipping {folder}: no config.json and metrics.jsonl", file=sys.stderr)
        return None
    config, records = read_json(config_path), read_jsonl(metrics_path)
    evaluated = [r for r in records if r.get("war") is not None]
    best_path, test_path = os.path.join(folder, "best.pt"), os.path.join(folder, "test.json")
    best = load_checkpoint(best_path) if os.path.isfile(best_path) else None
    split = config.get("train", {}).get("eval_split", "test")
    if os.path.isfile(test_path):
        reported = read_json(test_path)
        source = f"best.pt on test (chosen on {reported.get('chosen_on', split)})"
    elif best is not None and best.get("metrics"):
        reported, source = best["metrics"], f"best.pt on {split} (chosen on {split})"
    else:
        reported, source = None, "no best.pt"
    if reported is None and not evaluated:
        print(f"note: skipping {folder}: nothing evaluated yet", file=sys.stderr)
        return None
    data, data_name = run_data(folder, config)
    # What a run computes: descriptions and data identified by content, not by path.
    key = {k: v for k, v in config.get("train", {}).items() if k not in IGNORED}
    key.update(config.get("model", {}))
    if best and best.get("descriptions_sha256"):
        key["descriptions_sha256"] = best["descriptions_sha256"]
    if data:
        key["data"] = data
    return {"folder": folder, "seed": config.get("train", {}).get("seed"), "key": key,
            "data_name": data_name,
            "reported": reported and reported_numbers(reported),
            "source": source, "last": evaluated[-1] if evaluated else None,
            "epochs": records[-1]["epoch"] if records else 0}


# Base-to-novel runs (test.json with "base", "novel", "hm") report these beside WAR and UAR.
BASE_TO_NOVEL = ("base_war", "novel_war", "hm")


def reported_numbers(reported: Dict) -> Dict:
    """WAR and UAR of a run's reported result; for base-to-novel also base and novel WAR, HM."""
    numbers = {"war": reported["war"], "uar": reported["uar"]}
    if "hm" in reported:
        numbers.update(base_war=reported["base"]["war"], novel_war=reported["novel"]["war"],
                       hm=reported["hm"])
    return numbers


def mean_std(values: Sequence[float]) -> Dict:
    """Mean and sample standard deviation (None for one value)."""
    n = len(values)
    mean = sum(values) / n if n else None
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n, "values": list(values)}


def summarize_groups(runs: Sequence[Dict]) -> List[Dict]:
    """Runs grouped by configuration key (first-seen order) -> one summary per group."""
    groups: Dict[str, List[Dict]] = {}
    for run in runs:
        groups.setdefault(json.dumps(run["key"], sort_keys=True), []).append(run)
    summaries = []
    for members in groups.values():
        reported = [r["reported"] for r in members if r["reported"]]
        last = [r["last"] for r in members if r["last"]]
        summaries.append({
            "config": members[0]["key"], "data_name": members[0]["data_name"],
            "n": len(members),
            "seeds": [r["seed"] for r in members], "runs": [r["folder"] for r in members],
            "reported": sorted({r["source"] for r in members}),
            "war": mean_std([r["war"] for r in reported]),
            "uar": mean_std([r["uar"] for r in reported]),
            "last_war": mean_std([r["war"] for r in last]),
            "last_uar": mean_std([r["uar"] for r in last]),
            **{k: mean_std([r[k] for r in reported if k in r]) for k in BASE_TO_NOVEL}})
    label_groups(summaries)
    return summaries


# Characters of a hash shown in a label: enough to tell a few groups apart.
SHORT_HASH = 8


def label_groups(summaries: List[Dict]):
    """Name each group by the fields that differ between groups (one group: its data and
    method); hashes shortened, the data by name (+ a short hash where two share a name)."""
    keys = sorted({k for s in summaries for k in s["config"]})
    differing = [k for k in keys
                 if len({json.dumps(s["config"].get(k)) for s in summaries}) > 1]
    data_names: Dict[str, set] = {}
    for s in summaries:
        data_names.setdefault(s["data_name"], set()).add(s["config"].get("data"))
    for s in summaries:
        own = ("data" if "data" in s["config"] else "dataset", "method")  # its data by name
        shown = differing or [k for k in own if k in s["config"]]
        s["label"] = " ".join(label_part(k, s, len(data_names[s["data_name"]]) > 1)
                              for k in shown)


def label_part(key: str, summary: Dict, ambiguous: bool) -> str:
    value = summary["config"].get(key)
    if key == "data":
        suffix = f"#{value[:SHORT_HASH]}" if ambiguous and value else ""
        return f"data={summary['data_name']}{suffix}"
    if key.endswith("sha256") and isinstance(value, str):
        return f"{key[:-len('_sha256')] or key}={value[:SHORT_HASH]}"
    return f"{key}={value}"


def percent(stat: Dict) -> str:
    if stat["mean"] is None:
        return "–"
    if stat["std"] is None:
        return f"{100 * stat['mean']:.2f}"
    return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}"


def markdown_table(summaries: Sequence[Dict]) -> str:
    """One row per configuration; base, novel and HM columns when runs have them."""
    b2n = any(s["hm"]["n"] for s in summaries)
    extra = " base WAR (%) | novel WAR (%) | HM (%) |" if b2n else ""
    lines = ["| configuration | n | seeds | WAR (%) | UAR (%) |" + extra + " reported | "
             "last-epoch WAR (%) | last-epoch UAR (%) |",
             "|---|---|---|---|---|" + "---|" * (3 if b2n else 0) + "---|---|---|"]
    for s in summaries:
        seeds = ", ".join(str(x) for x in s["seeds"])
        columns = "".join(f" {percent(s[k])} |" for k in BASE_TO_NOVEL) if b2n else ""
        lines.append(f"| {s['label']} | {s['n']} | {seeds} | {percent(s['war'])} | "
                     f"{percent(s['uar'])} |{columns} {'; '.join(s['reported'])} | "
                     f"{percent(s['last_war'])} | {percent(s['last_uar'])} |")
    return "\n".join(lines)


def ladder_table(record: Dict) -> str:
    """The ablation ladder's record as one Markdown table."""
    def seeds(stat):
        return ", ".join(f"{100 * v:.1f}" for v in stat["values"])

    zero_shot = record["zero_shot_hard_prompts"]
    b2n = record["rows"][0]["hm"]["n"] > 0
    extra = " base WAR | novel WAR | HM |" if b2n else ""
    lines = ["| row | n | WAR (%) | UAR (%) |" + extra + " change WAR | change UAR | "
             "WAR per seed | last-epoch WAR (%) |",
             "|---|---|---|---|" + "---|" * (3 if b2n else 0) + "---|---|---|---|"]
    if zero_shot:
        columns = "".join(f" {percent(zero_shot[k])} |" for k in BASE_TO_NOVEL) if b2n else ""
        lines.append(f"| zero-shot CLIP, hard prompts | {zero_shot['war']['n']} | "
                     f"{percent(zero_shot['war'])} | {percent(zero_shot['uar'])} |{columns} | | "
                     f"{seeds(zero_shot['war'])} | |")
    for row in record["rows"]:
        change = row["change"] or {}
        columns = "".join(f" {percent(row[k])} |" for k in BASE_TO_NOVEL) if b2n else ""
        lines.append(f"| {row['row']} | {row['n']} | {percent(row['war'])} | "
                     f"{percent(row['uar'])} |{columns} " + " | ".join(
                         f"{100 * change[k]:+.2f}" if k in change else "" for k in ("war", "uar"))
                     + f" | {seeds(row['war'])} | {percent(row['last_war'])} |")
    sources = sorted({source for row in record["rows"] for source in row["reported"]})
    return "\n".join(lines) + f"\n\nreported: {'; '.join(sources)}"


def write_curves(folder: str) -> str:
    """Draw `<folder>/curves.png` from its metrics.jsonl -> the path written."""
    path = os.path.join(folder, "curves.png")
    records = read_jsonl(os.path.join(folder, "metrics.jsonl"))
    save_png(training_curves(records, loss_names()[1:]), path)
    return path


def main(argv=None):
    parser = ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (train.py --out), e.g. runs/rafdb/*")
    parser.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    parser.add_argument("--curves", action="store_true",
                        help="(re)draw curves.png in every run folder")
    args = parser.parse_args(argv)
    folders = []  # (the shell usually expands the patterns already)
    for pattern in args.runs:
        folders += [m for m in sorted(glob.glob(pattern)) or [pattern] if os.path.isdir(m)]
    if not folders:
        raise FileNotFoundError(f"no run folders in {' '.join(args.runs)}")
    runs = [r for r in (read_run(f) for f in folders) if r is not None]
    if not runs:
        raise ValueError("none of the folders is a run with results")
    if args.curves:
        for run in runs:
            print(f"wrote {write_curves(run['folder'])}", file=sys.stderr)
    summaries = summarize_groups(runs)
    print(markdown_table(summaries))
    if args.json:
        atomic_write_json(summaries, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return summaries


if __name__ == "__main__":
    run_cli(main)
