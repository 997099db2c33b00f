"""FER metrics: WAR (accuracy), UAR (mean per-class recall), confusion matrix."""
from typing import Dict, Sequence

import torch


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`[C, C]` counts, rows = true class, columns = predicted class."""
    index = targets.long().cpu() * num_classes + preds.long().cpu()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def summarize(confusion: torch.Tensor, classnames: Sequence[str]) -> Dict:
    """WAR (accuracy), UAR (mean recall over the classes present) and per-class recall."""
    confusion = confusion.long()
    support = confusion.sum(dim=1)
    correct = confusion.diagonal()
    recall = correct.double() / support.clamp(min=1)
    present = support > 0
    return {
        "war": correct.sum().item() / max(support.sum().item(), 1),
        "uar": recall[present].mean().item() if present.any() else 0.0,
        "per_class_recall": {name: recall[i].item()
                             for i, name in enumerate(classnames) if present[i]},
        "support": {name: int(support[i]) for i, name in enumerate(classnames)},
        "confusion": confusion.tolist(),
        "classnames": list(classnames),
        "num_samples": int(support.sum()),
    }


def over_classes(metrics: Dict, classes: Sequence[str]) -> Dict:
    """WAR and UAR of the images of `classes` only, from a `summarize` result over every class;
    None when those classes have no image (nothing to score, not 0%)."""
    rows = [metrics["classnames"].index(c) for c in classes]
    confusion = metrics["confusion"]
    support = [sum(confusion[r]) for r in rows]
    recalls = [confusion[r][r] / n for r, n in zip(rows, support) if n]
    scored = sum(support) > 0
    return {"war": sum(confusion[r][r] for r in rows) / sum(support) if scored else None,
            "uar": sum(recalls) / len(recalls) if scored else None,
            "num_samples": sum(support), "classes": list(classes)}


def harmonic_mean(base: float, novel: float) -> float:
    """HM = 2 B N / (B + N), the summary of base-to-novel accuracy (CoCoOp, MaPLe)."""
    return 2 * base * novel / (base + novel) if base + novel > 0 else 0.0


def format_report(metrics: Dict) -> str:
    """Readable WAR/UAR, per-class recall and confusion matrix."""
    names = metrics["classnames"]
    width = max(len(n) for n in names) + 2
    lines = [f"WAR {100 * metrics['war']:.2f}%  UAR {100 * metrics['uar']:.2f}%  "
             f"({metrics['num_samples']} image{'' if metrics['num_samples'] == 1 else 's'})",
             "per-class recall:"]
    for name in names:
        if name in metrics["per_class_recall"]:
            lines.append(f"  {name:<{width}}{100 * metrics['per_class_recall'][name]:6.2f}%  "
                         f"(n={metrics['support'][name]})")
    lines.append("confusion matrix (rows: true, columns: predicted):")
    lines.append(" " * width + "".join(f"{n[:6]:>8}" for n in names))
    for name, row in zip(names, metrics["confusion"]):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>8}" for v in row))
    return "\n".join(lines)
