"""SelMixConfig: the `TrainingArguments` of a SelMix fine-tuning run."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .gains import ESTIMATORS
from .objectives import OBJECTIVES

PAIR_DISTRIBUTIONS = ("gain", "uniform")

# The fine-tuning settings of the SelMix paper (selmix-math.md): SGD, head lr 3e-4, backbone lr 3e-5,
# weight decay 5e-4, cosine schedule, 64 pairs per batch, BatchNorm statistics frozen, early stop on gain plateau.
PUBLISHED_SETTINGS: dict[str, Any] = {
    "optim": "sgd",
    "optim_args": "momentum=0.9",
    "learning_rate": 3e-4,
    "backbone_lr_ratio": 0.1,
    "weight_decay": 5e-4,
    "lr_scheduler_type": "cosine",
    "per_device_train_batch_size": 64,  # per process: with N processes a step holds 64 N pairs
    "freeze_batchnorm": True,
    "gain_refresh_steps": 50,
    "sampling_temperature": 0.1,
    "scale_free_temperature": False,  # T = 0.1 in the units of G, as published (not this library's default)
    "mix_lambda_min": 0.6,
    "gain_estimator": "selmix",
    "early_stop_on_gain_plateau": True,
}


def parse_options(value: dict | str | None, name: str) -> dict:
    """An options field given as a dict, a JSON string (command line) or None, as a dict."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"{name} is not valid JSON: {err}") from err
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict (or a JSON object), got {type(value).__name__}")
    return dict(value or {})


@dataclass
class SelMixConfig(TrainingArguments):
    """`TrainingArguments` plus the SelMix settings.

    Objective: ``objective``, ``objective_options``, ``class_prior``, ``tail_fraction``.
    Gains and pairs: ``gain_refresh_steps``, ``gain_estimator``, ``equal_norm_prototypes``, ``sampling_temperature``,
    ``scale_free_temperature``, ``sampling_epsilon``,
    ``mix_lambda_min``, ``pair_distribution``, ``early_stop_on_gain_plateau``, ``plateau_window``, ``plateau_tolerance``.
    Optimisation: ``backbone_lr_ratio``, ``freeze_batchnorm``.

    ``per_device_train_batch_size`` counts *pairs*: each step forwards twice that many samples.
    Defaults that differ from `TrainingArguments`: ``learning_rate`` 3e-4 (the head's; the backbone gets
    ``backbone_lr_ratio`` x that, 3e-5, as published), ``ignore_data_skip`` True (the pair sampler restores its own
    position on resume, so the Trainer must not skip batches). Batches must carry the labels as ``labels`` (the
    default collators rename a ``label`` column to it).
    ``SelMixConfig.published(...)`` gives the paper's fine-tuning settings in one step.
    """

    # -- objective --------------------------------------------------------------------------------
    objective: str = field(
        default="min_recall",
        metadata={"help": f"Non-decomposable objective to maximise, one of: {', '.join(sorted(OBJECTIVES))}."},
    )
    objective_options: dict | str | None = field(
        default=None,
        metadata={"help": 'Options of the objective as a dict or JSON string, e.g. \'{"omega": 50}\' or \'{"alpha": 0.95}\'.'},
    )
    class_prior: list[float] | None = field(
        default=None,
        metadata={"help": "Class prior the metrics are measured under (K values summing to 1); default uniform."},
    )
    tail_fraction: float = field(
        default=0.1,
        metadata={"help": "Fraction of classes (the rarest in the training set) that form the tail for head/tail metrics."},
    )
    # -- gains and pairs --------------------------------------------------------------------------
    gain_refresh_steps: int = field(
        default=50, metadata={"help": "Re-estimate the gain matrix from a validation pass every this many optimiser steps."}
    )
    gain_estimator: str = field(
        default="selmix",
        metadata={"help": f"Gain estimator: {' or '.join(ESTIMATORS)} ('selmix' is the published one; 'exact' adds the bias and per-sample terms)."},
    )
    equal_norm_prototypes: bool = field(
        default=False,
        metadata={"help": "Rescale the class prototypes to their mean norm before the 'selmix' estimator reads them, so "
                  "classes with larger embeddings do not weigh more in G (not published; see docs/benchmarks.md)."},
    )
    # Default scale-free T = 1 (not the published T = 0.1 on raw G): chosen on the validation split of the quality
    # grid (docs/benchmarks.md), where the published T collapsed onto one pair; SelMixConfig.published() keeps 0.1.
    sampling_temperature: float = field(
        default=1.0,
        metadata={"help": "Temperature T of the pair distribution softmax(G / T) (relative to max |G| when "
                  "scale_free_temperature; the published 0.1 is on raw G)."},
    )
    scale_free_temperature: bool = field(
        default=True,
        metadata={"help": "Divide G by max |G| before softmax(G / T): T relative to the largest gain (not published; "
                  "False with sampling_temperature=0.1 is the paper's setting)."},
    )
    sampling_epsilon: float = field(
        default=1e-8, metadata={"help": "Mass added to every pair of the sampling distribution before normalising."}
    )
    mix_lambda_min: float = field(
        default=0.6, metadata={"help": "Mixing weights are drawn from U(mix_lambda_min, 1); the label is the first sample's."}
    )
    pair_distribution: str = field(
        default="gain",
        metadata={"help": "'gain' (SelMix) or 'uniform' (every pair of classes equally likely: the mixup ablation)."},
    )
    early_stop_on_gain_plateau: bool = field(
        default=False,
        metadata={"help": "Stop when the max gain has plateaued over the last plateau_window refreshes (as published)."},
    )
    plateau_window: int = field(default=10, metadata={"help": "Number of refreshes the plateau test looks back over."})
    plateau_tolerance: float = field(
        default=0.05, metadata={"help": "Plateau when |mean - last| < tolerance x |mean| of the windowed max gains."}
    )
    # -- optimisation -----------------------------------------------------------------------------
    backbone_lr_ratio: float = field(
        default=0.1, metadata={"help": "Backbone learning rate = backbone_lr_ratio x learning_rate (the head's)."}
    )
    freeze_batchnorm: bool = field(
        default=True, metadata={"help": "Keep BatchNorm running statistics fixed during SelMix fine-tuning (as published)."}
    )
    # -- defaults that differ from TrainingArguments ---------------------------------------------
    learning_rate: float = field(default=3e-4, metadata={"help": "Learning rate of the classifier head."})
    ignore_data_skip: bool = field(
        default=True,
        metadata={"help": "Must stay True for SelMix: the pair sampler resumes from its own saved state."},
    )

    def __post_init__(self) -> None:
        self.objective_options = parse_options(self.objective_options, "objective_options")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; valid objectives are: {', '.join(sorted(OBJECTIVES))}")
        if self.gain_estimator not in ESTIMATORS:
            raise ValueError(f"unknown gain_estimator {self.gain_estimator!r}; valid: {', '.join(ESTIMATORS)}")
        if self.equal_norm_prototypes and self.gain_estimator != "selmix":
            raise ValueError("equal_norm_prototypes applies to gain_estimator='selmix' only (the 'exact' estimator reads "
                             "every validation feature, not the prototypes' Gram): drop one of the two settings")
        if self.pair_distribution not in PAIR_DISTRIBUTIONS:
            raise ValueError(f"unknown pair_distribution {self.pair_distribution!r}; valid: {', '.join(PAIR_DISTRIBUTIONS)}")
        if self.gain_refresh_steps < 1:
            raise ValueError(f"gain_refresh_steps must be >= 1, got {self.gain_refresh_steps}")
        if self.sampling_temperature <= 0:
            raise ValueError(f"sampling_temperature must be positive, got {self.sampling_temperature}")
        if not 0.0 <= self.mix_lambda_min <= 1.0:
            raise ValueError(f"mix_lambda_min must lie in [0, 1], got {self.mix_lambda_min}")
        if self.plateau_window < 1:
            raise ValueError(f"plateau_window must be >= 1, got {self.plateau_window}")
        if self.sampling_epsilon < 0:
            raise ValueError(f"sampling_epsilon must be >= 0, got {self.sampling_epsilon}")
        if self.backbone_lr_ratio < 0:
            raise ValueError(f"backbone_lr_ratio must be >= 0, got {self.backbone_lr_ratio}")
        if not self.ignore_data_skip:
            raise ValueError(
                "SelMixConfig needs ignore_data_skip=True: the pair sampler restores its own position on resume, "
                "and skipping batches on top of that would skip them twice"
            )
        super().__post_init__()

    @classmethod
    def published(cls, **overrides: Any) -> SelMixConfig:
        """The SelMix paper's fine-tuning settings, with any field overridden by keyword."""
        return cls(**{**PUBLISHED_SETTINGS, **overrides})
