"""selmix-hf: fine-tune Hugging Face classifiers for non-decomposable metrics with SelMix."""

from .autobalance import AutoBalanceConfig, AutoBalanceTrainer
from .base_trainer import BaseTrainer
from .config import SelMixConfig
from .features import find_head, register_head
from .fixmatch import FixMatchConfig, FixMatchTrainer
from .gains import (
    class_prototypes,
    equal_norm_prototypes,
    exact_gain_matrix,
    gain_matrix,
    sampling_distribution,
    selmix_gain_matrix,
)
from .longtail_trainer import LongTailConfig, LongTailTrainer
from .losses import build_loss
from .metrics import classification_report, confusion_counts, make_compute_metrics, metric_path, normalized_confusion
from .nonfinite import NonFiniteError
from .objectives import OBJECTIVES, CustomObjective, Objective, get_objective
from .trainer import SelMixTrainer
from .views import ImageViews, Views

__version__ = "0.1.0.dev0"

__all__ = [
    "AutoBalanceConfig",
    "AutoBalanceTrainer",
    "BaseTrainer",
    "FixMatchConfig",
    "FixMatchTrainer",
    "LongTailConfig",
    "LongTailTrainer",
    "NonFiniteError",
    "OBJECTIVES",
    "CustomObjective",
    "Objective",
    "SelMixConfig",
    "SelMixTrainer",
    "ImageViews",
    "Views",
    "class_prototypes",
    "equal_norm_prototypes",
    "exact_gain_matrix",
    "build_loss",
    "classification_report",
    "confusion_counts",
    "find_head",
    "gain_matrix",
    "get_objective",
    "make_compute_metrics",
    "metric_path",
    "normalized_confusion",
    "register_head",
    "sampling_distribution",
    "selmix_gain_matrix",
]
