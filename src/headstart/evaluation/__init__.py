"""How good a trained model is: inference over a loader, metrics, the evaluation set, interpretation."""

from headstart.evaluation.inference import evaluate, predict_logits
from headstart.evaluation.metrics import ClassReport, class_report

__all__ = ["ClassReport", "class_report", "evaluate", "predict_logits"]
