"""Classification metrics from predictions: top-k accuracy, confusion matrix, per-class scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ClassReport:
    """Everything ``headstart eval`` reports, computed once from logits and targets."""

    classes: list[str]
    top1: float
    top5: float
    loss: float
    confusion: torch.Tensor  # [true, predicted] counts
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]

    def to_dict(self) -> dict:
        return {
            "top1": self.top1,
            "top5": self.top5,
            "loss": self.loss,
            "classes": self.classes,
            "confusion": self.confusion.tolist(),
            "per_class": [
                {"class": c, "precision": p, "recall": r, "f1": f, "support": s}
                for c, p, r, f, s in zip(self.classes, self.precision, self.recall, self.f1, self.support)
            ],
        }


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> int:
    """How many targets are among the ``k`` highest logits (k is capped at the class count)."""
    k = min(k, logits.shape[1])
    return int((logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1).sum())


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    idx = targets.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def class_report(logits: torch.Tensor, targets: torch.Tensor, classes: list[str]) -> ClassReport:
    """Top-1/top-5, mean cross-entropy, confusion matrix, per-class precision/recall/F1."""
    n = len(classes)
    cm = confusion_matrix(logits.argmax(1), targets, n).double()
    tp = cm.diag()
    precision = torch.where(cm.sum(0) > 0, tp / cm.sum(0).clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(cm.sum(1) > 0, tp / cm.sum(1).clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), 0)
    total = max(1, len(targets))
    return ClassReport(
        classes=list(classes),
        top1=topk_correct(logits, targets, 1) / total,
        top5=topk_correct(logits, targets, 5) / total,
        loss=float(torch.nn.functional.cross_entropy(logits.float(), targets.long())) if len(targets) else 0.0,
        confusion=cm.long(),
        precision=precision.tolist(),
        recall=recall.tolist(),
        f1=f1.tolist(),
        support=cm.sum(1).long().tolist(),
    )


def format_report(r: ClassReport) -> str:
    """The report as text: summary, per-class table, confusion matrix."""
    w = max(5, *(len(c) for c in r.classes))
    lines = [f"top-1 {r.top1:.2%}   top-5 {r.top5:.2%}   loss {r.loss:.4f}   images {sum(r.support)}", ""]
    lines.append(f"{'class':<{w}}  precision  recall     f1  support")
    for c, p, rc, f, s in zip(r.classes, r.precision, r.recall, r.f1, r.support):
        lines.append(f"{c:<{w}}  {p:9.3f}  {rc:6.3f}  {f:5.3f}  {s:7d}")
    return "\n".join(lines + ["", *format_confusion(r.classes, r.confusion)])


# Class names up to this long head the confusion matrix's columns; longer ones are numbered.
SHORT_NAME = 6


def format_confusion(classes: list[str], confusion: torch.Tensor) -> list[str]:
    """The confusion matrix as aligned text lines, rows the true class, columns the predicted one.

    Short class names head the columns themselves; when a name is longer, the columns are
    numbered and each row shows its number beside its name, so every column stays aligned.
    """
    short = max(len(c) for c in classes) <= SHORT_NAME
    heads = list(classes) if short else [str(i) for i in range(len(classes))]
    labels = list(classes) if short else [f"{i:>{len(heads[-1])}} {c}" for i, c in enumerate(classes)]
    cw = 2 + max(len(str(int(confusion.max()))), *(len(h) for h in heads))
    lw = max(len(label) for label in labels)
    title = "confusion matrix (rows: true class, columns: predicted)"
    lines = [title if short else f"{title}; columns are numbered as the rows",
             " " * lw + "".join(f"{h:>{cw}}" for h in heads)]
    for label, row in zip(labels, confusion.tolist()):
        lines.append(f"{label:<{lw}}" + "".join(f"{v:>{cw}}" for v in row))
    return lines
