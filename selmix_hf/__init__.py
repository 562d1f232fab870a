"""selmix-hf: fine-tune Hugging Face classifiers for non-decomposable metrics with SelMix."""

from .gains import class_prototypes, gain_matrix, sampling_distribution
from .metrics import classification_report, confusion_counts, make_compute_metrics, normalized_confusion
from .objectives import OBJECTIVES, CustomObjective, Objective, get_objective

__version__ = "0.1.0.dev0"

__all__ = [
    "OBJECTIVES",
    "CustomObjective",
    "Objective",
    "class_prototypes",
    "classification_report",
    "confusion_counts",
    "gain_matrix",
    "get_objective",
    "make_compute_metrics",
    "normalized_confusion",
    "sampling_distribution",
]
