"""selmix-hf: fine-tune Hugging Face classifiers for non-decomposable metrics with SelMix."""

from .autobalance import AutoBalanceConfig, AutoBalanceTrainer
from .config import SelMixConfig
from .features import find_head, register_head
from .gains import class_prototypes, equal_norm_prototypes, gain_matrix, sampling_distribution
from .longtail_trainer import LongTailConfig, LongTailTrainer
from .losses import build_loss
from .metrics import classification_report, confusion_counts, make_compute_metrics, normalized_confusion
from .objectives import OBJECTIVES, CustomObjective, Objective, get_objective
from .trainer import SelMixTrainer

__version__ = "0.1.0.dev0"

__all__ = [
    "AutoBalanceConfig",
    "AutoBalanceTrainer",
    "LongTailConfig",
    "LongTailTrainer",
    "OBJECTIVES",
    "CustomObjective",
    "Objective",
    "SelMixConfig",
    "SelMixTrainer",
    "class_prototypes",
    "equal_norm_prototypes",
    "build_loss",
    "classification_report",
    "confusion_counts",
    "find_head",
    "gain_matrix",
    "get_objective",
    "make_compute_metrics",
    "normalized_confusion",
    "register_head",
    "sampling_distribution",
]
