"""The configurations of every selmix-hf trainer, in one place: `TrainingArguments` plus each method's settings.

Each config checks its own fields (types and values) when built, so a wrong setting fails before training starts
with a message that names it, and `method_settings()` gives the fields a model card reports: a new field shows up
in the cards without any edit of the card code.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from transformers import TrainingArguments

from .gains import ESTIMATORS
from .losses import LOSSES, check_loss_options
from .objectives import OBJECTIVES, check_objective_options
from .options import matches_type, plain, type_name

PAIR_DISTRIBUTIONS = ("gain", "uniform")
PARTNERS = ("auto", "unlabeled", "labeled", "mixed", "by_precision")
HYPERGRADIENTS = ("neumann", "unrolled")
UPPER_OBJECTIVES = ("balanced_ce", *sorted(OBJECTIVES))
_TRAINING_ARGUMENT_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainingArguments))

# The fine-tuning settings of the SelMix paper (docs/engine.md, M12): SGD, head lr 3e-4, backbone
# lr 3e-5, weight decay 5e-4, cosine schedule, 64 pairs per batch, BatchNorm statistics frozen, early stop on plateau.
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
class MethodConfig:
    """What every selmix-hf config adds to `TrainingArguments`: the post-hoc rule fitted after training, its own
    fields checked, and listed for the cards."""

    posthoc: str | None = field(
        default=None,
        metadata={
            "help": "After training, fit a decision rule on the validation set for the objective: 'offsets' (folded "
            "into the classifier bias), 'gain_matrix' (stored in config.json) or None (docs/posthoc.md)."
        },
    )
    posthoc_objective: str | None = field(
        default=None,
        metadata={
            "help": "Objective the post-hoc rule maximises; default: the one the trainer optimises "
            f"(required for fixed losses). One of: {', '.join(sorted(OBJECTIVES))}."
        },
    )
    posthoc_objective_options: dict | str | None = field(
        default=None,
        metadata={
            "help": "Options of posthoc_objective (dict or JSON); default: the trainer objective's when it is the same."
        },
    )
    posthoc_folds: int = field(
        default=5, metadata={"help": "Cross-fitting folds of the post-hoc rule (each class needs as many samples)."}
    )
    posthoc_confidence: float = field(
        default=0.9,
        metadata={
            "help": "The rule is kept only if its cross-fitted gain wins this share of bootstrap resamples of the "
            "validation set."
        },
    )
    group_column: str | None = field(
        default=None,
        metadata={
            "help": "Dataset column of each sample's integer group id (0 .. G-1): evaluation then reports the group "
            "metrics, and group objectives and group losses range over the (class, group) cells (docs/groups.md)."
        },
    )
    validation_refresh_per_class: int | None = field(
        default=None,
        metadata={
            "help": "Validation samples per class (per (class, group) cell with group_column) that each refresh "
            "passes over, a fresh random choice per refresh: None = the whole validation set (as published); n = a "
            "refresh costs about K x n forward passes, with a noisier confusion matrix."
        },
    )

    # fields a card does not show (long or derived values); everything else the config adds is a card setting
    card_excluded: ClassVar[tuple[str, ...]] = ()
    POSTHOC_FIELDS: ClassVar[tuple[str, ...]] = (
        "posthoc",
        "posthoc_objective",
        "posthoc_objective_options",
        "posthoc_folds",
        "posthoc_confidence",
    )

    @classmethod
    def method_fields(cls) -> list[str]:
        """The fields this config adds to (or redefines over) `TrainingArguments`, in declaration order (the
        post-hoc fields are the post-hoc stage's, not the training stage's)."""
        own = [f.name for f in dataclasses.fields(cls) if f.name not in _TRAINING_ARGUMENT_FIELDS]
        return [name for name in own if name not in cls.card_excluded and name not in cls.POSTHOC_FIELDS]

    def method_settings(self) -> dict[str, Any]:
        """This config's own settings, by field name (what a model card lists under the stage)."""
        return {name: getattr(self, name) for name in self.method_fields()}

    def posthoc_settings(self) -> dict[str, Any]:
        """The post-hoc fields, for the card's post-hoc stage (options only when given)."""
        return {name: getattr(self, name) for name in self.POSTHOC_FIELDS if getattr(self, name) not in (None, {})}

    def trained_objective(self) -> tuple[str | None, dict[str, Any]]:
        """The registry objective training optimises and its options, or (None, {}) for a fixed loss."""
        return None, {}

    def posthoc_target(self) -> tuple[str, dict[str, Any]]:
        """The objective the post-hoc rule maximises and its options (`objective_for_training` keywords)."""
        trained, options = self.trained_objective()
        name = self.posthoc_objective or trained
        if name is None:
            raise ValueError(
                f"posthoc={self.posthoc!r} needs posthoc_objective=<name>: {type(self).__name__} trains a fixed loss, "
                f"so there is no objective to default to. One of: {', '.join(sorted(OBJECTIVES))}"
            )
        if self.posthoc_objective_options or name != trained:
            options = dict(self.posthoc_objective_options or {})
        return name, options

    def check_posthoc(self) -> None:
        """The post-hoc fields (options already parsed by `__post_init__`): a known rule, an objective to fit it for
        (with valid options), sane folds."""
        from .posthoc import RULES

        if self.posthoc is not None and self.posthoc not in RULES:
            raise ValueError(f"unknown posthoc {self.posthoc!r}; valid: {', '.join(RULES)} or None")
        if self.posthoc_folds < 2:
            raise ValueError(f"posthoc_folds must be >= 2 (one fold fits, another judges), got {self.posthoc_folds}")
        if not 0.5 <= self.posthoc_confidence <= 1.0:
            raise ValueError(f"posthoc_confidence must lie in [0.5, 1], got {self.posthoc_confidence}")
        if self.posthoc is None:
            return
        name, options = self.posthoc_target()
        check_objective_options(name, {k: v for k, v in options.items() if k != "tail_fraction"})

    def check_group_settings(self) -> None:
        """An objective or loss over (class, group) cells needs group_column; the post-hoc rules act on classes."""
        from .losses import LOSSES

        trained, _ = self.trained_objective()
        needs = [f"objective {trained!r}"] if trained in OBJECTIVES and OBJECTIVES[trained].needs_groups else []
        loss = getattr(self, "loss_type", None)
        if loss in LOSSES and LOSSES[loss].needs_groups:
            needs.append(f"loss_type {loss!r}")
        if needs and not self.group_column:
            raise ValueError(
                f"{' and '.join(needs)} ranges over (class, group) cells, so it needs each sample's group: set "
                "group_column='<the dataset column of integer group ids>' in the config"
            )
        if self.posthoc is not None:
            name, _ = self.posthoc_target()
            if name in OBJECTIVES and OBJECTIVES[name].needs_groups:
                raise ValueError(
                    f"posthoc={self.posthoc!r} fits a rule on the class confusion matrix, which the group objective "
                    f"{name!r} does not read; set posthoc=None, or posthoc_objective=<a class objective>"
                )

    def check_refresh_sample(self) -> None:
        """validation_refresh_per_class is None or a positive count."""
        if self.validation_refresh_per_class is not None and self.validation_refresh_per_class < 1:
            raise ValueError(
                "validation_refresh_per_class must be >= 1 (or None: the whole validation set at each refresh), got "
                f"{self.validation_refresh_per_class}"
            )

    def check_field_types(self) -> None:
        """Each field this config adds holds a value of its declared type; else an error naming field and type."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if f.name in _TRAINING_ARGUMENT_FIELDS:
                continue
            value = plain(getattr(self, f.name))  # numpy / torch values become the numbers and lists they hold
            setattr(self, f.name, value)
            if not matches_type(value, hints[f.name]):
                raise TypeError(
                    f"{type(self).__name__}.{f.name} must be {type_name(hints[f.name])}, got {value!r} "
                    f"({type(value).__name__})"
                )


@dataclass
class SelMixConfig(MethodConfig, TrainingArguments):
    """`TrainingArguments` plus the SelMix settings.

    Objective: ``objective``, ``objective_options``, ``class_prior``, ``tail_fraction``.
    Gains and pairs: ``gain_refresh_steps``, ``gain_estimator``, ``equal_norm_prototypes``, ``sampling_temperature``,
    ``scale_free_temperature``, ``sampling_epsilon``,
    ``mix_lambda_min``, ``pair_distribution``, ``early_stop_on_gain_plateau``, ``plateau_window``,
    ``plateau_tolerance``.
    Optimisation: ``backbone_lr_ratio``, ``freeze_batchnorm``.

    ``per_device_train_batch_size`` counts *pairs*: each step forwards twice that many samples.
    Defaults that differ from `TrainingArguments`: ``learning_rate`` 3e-4 (the head's; the backbone gets
    ``backbone_lr_ratio`` x that, 3e-5, as published), ``ignore_data_skip`` True (the pair sampler restores its own
    position on resume, so the Trainer must not skip batches). Labels come from the ``labels``, ``label`` or
    ``label_ids`` column, or the one column named by ``label_names``, as with `Trainer`.
    ``SelMixConfig.published(...)`` gives the paper's fine-tuning settings in one step.
    """

    # -- objective --------------------------------------------------------------------------------
    objective: str = field(
        default="min_recall",
        metadata={"help": f"Non-decomposable objective to maximise, one of: {', '.join(sorted(OBJECTIVES))}."},
    )
    objective_options: dict | str | None = field(
        default=None,
        metadata={
            "help": "Options of the objective as a dict or JSON string, e.g. '{\"omega\": 50}' or '{\"alpha\": 0.95}'."
        },
    )
    class_prior: list[float] | None = field(
        default=None,
        metadata={"help": "Class prior the metrics are measured under (K values summing to 1); default uniform."},
    )
    tail_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Fraction of classes (the rarest in the training set) that form the tail for head/tail metrics."
        },
    )
    # -- gains and pairs --------------------------------------------------------------------------
    gain_refresh_steps: int = field(
        default=50,
        metadata={"help": "Re-estimate the gain matrix from a validation pass every this many optimiser steps."},
    )
    gain_estimator: str = field(
        default="selmix",
        metadata={
            "help": f"Gain estimator: {' or '.join(ESTIMATORS)} ('selmix' is the published one; 'exact' adds the bias "
            "and per-sample terms)."
        },
    )
    equal_norm_prototypes: bool = field(
        default=False,
        metadata={
            "help": "Rescale the class prototypes to their mean norm before the 'selmix' estimator reads them, so "
            "classes with larger embeddings do not weigh more in G (not published; see docs/benchmarks.md)."
        },
    )
    # Default scale-free T = 1 (not the published T = 0.1 on raw G): chosen on the validation split of the quality
    # grid (docs/benchmarks.md), where the published T collapsed onto one pair; SelMixConfig.published() keeps 0.1.
    sampling_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Temperature T of the pair distribution softmax(G / T) (relative to max |G| when "
            "scale_free_temperature; the published 0.1 is on raw G)."
        },
    )
    scale_free_temperature: bool = field(
        default=True,
        metadata={
            "help": "Divide G by max |G| before softmax(G / T): T relative to the largest gain (not published; "
            "False with sampling_temperature=0.1 is the paper's setting)."
        },
    )
    sampling_epsilon: float = field(
        default=1e-8, metadata={"help": "Mass added to every pair of the sampling distribution before normalising."}
    )
    mix_lambda_min: float = field(
        default=0.6,
        metadata={"help": "Mixing weights are drawn from U(mix_lambda_min, 1); the label is the first sample's."},
    )
    pair_distribution: str = field(
        default="gain",
        metadata={"help": "'gain' (SelMix) or 'uniform' (every pair of classes equally likely: the mixup ablation)."},
    )
    early_stop_on_gain_plateau: bool = field(
        default=False,
        metadata={
            "help": "Stop when the max gain has plateaued over the last plateau_window refreshes (as published)."
        },
    )
    plateau_window: int = field(default=10, metadata={"help": "Number of refreshes the plateau test looks back over."})
    plateau_tolerance: float = field(
        default=0.05, metadata={"help": "Plateau when |mean - last| < tolerance x |mean| of the windowed max gains."}
    )
    # -- semi-supervised: partners from an unlabelled pool (SelMixTrainer(unlabeled_dataset=...)) ---------
    partners: str = field(
        default="auto",
        metadata={
            "help": "Where the mixing partners x2 come from: 'unlabeled' (the unlabeled_dataset, by pseudo-label, as "
            "published), 'labeled' (the training set), 'mixed' (the pool with probability unlabeled_ratio), "
            "'by_precision' (a partner of pseudo-class j from the pool with the probability that the pool's label j "
            "is right, estimated at each refresh from the validation confusion; else from the labelled set) or "
            "'auto' ('unlabeled' when an unlabeled_dataset is given, else 'labeled')."
        },
    )
    unlabeled_ratio: float = field(
        default=0.5, metadata={"help": "With partners='mixed': the share of pairs whose partner is unlabelled."}
    )
    pseudo_label_threshold: float | None = field(
        default=None,
        metadata={
            "help": "Pool samples whose top softmax probability is below this are not drawn (None: all, as "
            "published); in (0, 1]."
        },
    )
    unlabeled_refresh_size: int | None = field(
        default=None,
        metadata={
            "help": "Pool samples pseudo-labelled at each refresh: None = the whole pool (as published); n = a fresh "
            "random n of them per refresh, the only ones drawn until the next (the refresh then costs n forward "
            "passes instead of the pool's size)."
        },
    )
    unlabeled_anchors: bool = field(
        default=False,
        metadata={
            "help": "Also draw the first members x1 (whose label the mixed sample takes) from the pool's samples "
            "above pseudo_label_threshold, labelled by their pseudo-labels."
        },
    )
    # -- optimisation -----------------------------------------------------------------------------
    backbone_lr_ratio: float = field(
        default=0.1, metadata={"help": "Backbone learning rate = backbone_lr_ratio x learning_rate (the head's)."}
    )
    freeze_batchnorm: bool = field(
        default=True,
        metadata={"help": "Keep BatchNorm running statistics fixed during SelMix fine-tuning (as published)."},
    )
    # -- defaults that differ from TrainingArguments ---------------------------------------------
    learning_rate: float = field(default=3e-4, metadata={"help": "Learning rate of the classifier head."})
    ignore_data_skip: bool = field(
        default=True,
        metadata={"help": "Must stay True for SelMix: the pair sampler resumes from its own saved state."},
    )

    def __post_init__(self) -> None:
        self.objective_options = parse_options(self.objective_options, "objective_options")
        self.posthoc_objective_options = parse_options(self.posthoc_objective_options, "posthoc_objective_options")
        self.check_field_types()
        check_objective_options(self.objective, self.objective_options)
        shadowed = sorted({"class_prior", "tail_fraction"} & set(self.objective_options))
        if shadowed:
            raise ValueError(
                f"objective_options sets {', '.join(shadowed)}, which SelMixConfig has as its own field(s): set "
                f"{', '.join(f'{name}=...' for name in shadowed)} on the config instead (one place for each setting)"
            )
        if self.gain_estimator not in ESTIMATORS:
            raise ValueError(f"unknown gain_estimator {self.gain_estimator!r}; valid: {', '.join(ESTIMATORS)}")
        if self.equal_norm_prototypes and self.gain_estimator != "selmix":
            raise ValueError(
                "equal_norm_prototypes applies to gain_estimator='selmix' only (the 'exact' estimator reads "
                "every validation feature, not the prototypes' Gram): drop one of the two settings"
            )
        if self.pair_distribution not in PAIR_DISTRIBUTIONS:
            raise ValueError(
                f"unknown pair_distribution {self.pair_distribution!r}; valid: {', '.join(PAIR_DISTRIBUTIONS)}"
            )
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
        self.check_partners()
        if not self.ignore_data_skip:
            raise ValueError(
                "SelMixConfig needs ignore_data_skip=True: the pair sampler restores its own position on resume, "
                "and skipping batches on top of that would skip them twice"
            )
        self.check_posthoc()
        self.check_group_settings()
        self.check_refresh_sample()
        super().__post_init__()

    def trained_objective(self) -> tuple[str | None, dict[str, Any]]:
        return self.objective, {**self.objective_options, "class_prior": self.class_prior}

    def check_partners(self) -> None:
        """The semi-supervised settings, each in its range and consistent with the others."""
        if self.partners not in PARTNERS:
            raise ValueError(f"unknown partners {self.partners!r}; valid: {', '.join(PARTNERS)}")
        if self.partners == "mixed" and not 0.0 < self.unlabeled_ratio < 1.0:
            raise ValueError(
                f"partners='mixed' needs 0 < unlabeled_ratio < 1, got {self.unlabeled_ratio}; use partners="
                "'unlabeled' or 'labeled' for all pairs from one set"
            )
        threshold = self.pseudo_label_threshold
        if threshold is not None and not 0.0 < threshold <= 1.0:
            raise ValueError(f"pseudo_label_threshold must lie in (0, 1] (or be None: no threshold), got {threshold}")
        if self.unlabeled_refresh_size is not None and self.unlabeled_refresh_size < 1:
            raise ValueError(
                f"unlabeled_refresh_size must be >= 1 (or None: the whole pool at each refresh), got "
                f"{self.unlabeled_refresh_size}"
            )
        if self.unlabeled_anchors and threshold is None:
            raise ValueError(
                "unlabeled_anchors=True labels pool samples by their pseudo-labels, which needs a confidence cut: "
                "set pseudo_label_threshold (e.g. 0.95)"
            )

    def partner_source(self, has_pool: bool) -> str:
        """'labeled', 'unlabeled' or 'mixed' for a run with or without an unlabelled pool; refuses what cannot run."""
        if self.partners == "auto":
            return "unlabeled" if has_pool else "labeled"
        if self.partners != "labeled" and not has_pool:
            raise ValueError(
                f"partners={self.partners!r} draws partners from an unlabelled pool, and none was given: pass "
                "SelMixTrainer(..., unlabeled_dataset=...) or set partners='labeled'"
            )
        if self.unlabeled_anchors and not has_pool:
            raise ValueError("unlabeled_anchors=True needs SelMixTrainer(..., unlabeled_dataset=...)")
        if has_pool and self.partners == "labeled" and not self.unlabeled_anchors:
            raise ValueError(
                "an unlabeled_dataset was given but partners='labeled' and unlabeled_anchors=False never draw from it; "
                "set partners='unlabeled' / 'mixed' (or unlabeled_anchors=True), or drop the unlabeled_dataset"
            )
        return self.partners

    def pool_fraction(self, source: str) -> float:
        """The probability that a pair's partner comes from the unlabelled pool ('by_precision': per class, set at
        each refresh; until the first, any value between 0 and 1)."""
        return {"labeled": 0.0, "unlabeled": 1.0, "mixed": self.unlabeled_ratio, "by_precision": 0.5}[source]

    SEMI_SUPERVISED_FIELDS: ClassVar[tuple[str, ...]] = (
        "partners",
        "unlabeled_ratio",
        "pseudo_label_threshold",
        "unlabeled_refresh_size",
        "unlabeled_anchors",
    )

    def posthoc_target(self) -> tuple[str, dict[str, Any]]:
        """As the base, with this config's class prior and tail fraction for any objective."""
        name, options = super().posthoc_target()
        return name, {**options, "class_prior": self.class_prior, "tail_fraction": self.tail_fraction}

    @classmethod
    def published(cls, **overrides: Any) -> SelMixConfig:
        """The SelMix paper's fine-tuning settings, with any field overridden by keyword."""
        return cls(**{**PUBLISHED_SETTINGS, **overrides})


@dataclass
class LongTailConfig(MethodConfig, TrainingArguments):
    """`TrainingArguments` plus the choice of long-tailed loss.

    Loss: ``loss_type``, ``loss_options``, ``class_counts`` (read from the training labels when not given).
    Schedule: ``drw_start_epoch`` (deferred re-weighting, e.g. for LDAM), ``validation_refresh_steps`` (how often the
    cost-sensitive loss re-reads the validation confusion matrix). Prediction: ``posthoc_tau`` (post-hoc logit
    adjustment: logits - tau log pi_train at evaluation and prediction time). No default differs from
    `TrainingArguments`.
    """

    loss_type: str = field(default="logit_adjusted", metadata={"help": f"Loss, one of: {', '.join(LOSSES)}."})
    loss_options: dict | str | None = field(
        default=None, metadata={"help": "Options of the loss as a dict or JSON string, e.g. '{\"tau\": 1.0}'."}
    )
    class_counts: list[int] | None = field(
        default=None, metadata={"help": "Training samples per class; read from the training labels when not given."}
    )
    drw_start_epoch: float | None = field(
        default=None,
        metadata={
            "help": "Epoch from which class-balanced re-weighting is switched on (DRW); losses with set_reweighting."
        },
    )
    validation_refresh_steps: int = field(
        default=50, metadata={"help": "Steps between validation passes that update the cost-sensitive loss."}
    )
    posthoc_tau: float | None = field(
        default=None, metadata={"help": "If set, evaluation and prediction logits are f - posthoc_tau * log pi_train."}
    )

    card_excluded = ("class_counts",)  # the card's data profile shows the counts

    def __post_init__(self) -> None:
        self.loss_options = parse_options(self.loss_options, "loss_options")
        self.posthoc_objective_options = parse_options(self.posthoc_objective_options, "posthoc_objective_options")
        self.check_field_types()
        check_loss_options(self.loss_type, self.loss_options)
        if self.validation_refresh_steps < 1:
            raise ValueError(f"validation_refresh_steps must be >= 1, got {self.validation_refresh_steps}")
        if self.posthoc is not None and self.posthoc_tau is not None:
            raise ValueError(
                "posthoc_tau and posthoc both change the decision rule after training; the fitted posthoc rule "
                "includes logit adjustment as a special case: set one of them"
            )
        self.check_posthoc()
        self.check_group_settings()
        self.check_refresh_sample()
        super().__post_init__()

    def trained_objective(self) -> tuple[str | None, dict[str, Any]]:
        """The objective the loss follows (the cost-sensitive loss's ``objective`` option), else none."""
        return LOSSES[self.loss_type].objective_of(self.loss_options)


@dataclass
class AutoBalanceConfig(LongTailConfig):
    """`LongTailConfig` plus the AutoBalance search.

    Loss family: ``num_groups`` (tie parameters over groups of frequency-sorted classes), ``init`` (ones, la, cdt),
    ``delta_activation``, ``learn_delta``, ``learn_weights``. Search: ``hyper_update_steps`` (20), ``hypergradient``
    (neumann or unrolled), ``neumann_steps`` (5), ``neumann_lr`` (1.0), ``hyper_batches`` (10, each of
    per_device_train_batch_size x gradient_accumulation_steps samples), ``hyper_learning_rate``, ``hyper_optimizer``,
    ``search_steps`` (after it the parameters are frozen), ``hypergradient_params``. Upper objective:
    ``upper_objective`` (class-balanced CE as published, or any objective of the engine through its surrogate on a
    soft confusion matrix) and ``upper_objective_options``.
    Defaults: ``loss_type`` is "parametric" (the searched loss); ``hypergradient_params`` is "head": the IFT
    treats the backbone as fixed, because PyTorch's fused attention kernels (SDPA, the default of transformers
    models) have no second derivative on CPU. "all" is the published setting and needs eager attention.
    """

    loss_type: str = field(default="parametric", metadata={"help": "Must be 'parametric' for AutoBalance."})
    num_groups: int | None = field(default=None, metadata={"help": "Tie the loss parameters over this many groups."})
    init: str = field(default="ones", metadata={"help": "Initial loss: ones (CE), la (logit adjustment) or cdt."})
    delta_activation: str = field(
        default="exp",
        metadata={"help": "Delta = activation(raw): exp (positive, starts at 1), sigmoid (published), identity."},
    )
    learn_weights: bool = field(default=False, metadata={"help": "Also learn the per-class weights w."})
    learn_delta: bool = field(
        default=True, metadata={"help": "Learn the multiplicative Delta (else only l, and w if asked)."}
    )
    per_group_loss: bool = field(
        default=True,
        metadata={
            "help": "With group_column: Delta, l and w per (group, class), AutoBalance's group-sensitive loss; "
            "False ties them over the groups (the upper objective may still be a group objective)."
        },
    )
    hyper_update_steps: int = field(default=20, metadata={"help": "Optimiser steps between hypergradient updates."})
    hypergradient: str = field(
        default="neumann", metadata={"help": "neumann (IFT + Neumann series) or unrolled (one step)."}
    )
    neumann_steps: int = field(default=5, metadata={"help": "Terms of the Neumann series."})
    neumann_lr: float = field(default=1.0, metadata={"help": "Step size eta of the Neumann series."})
    hyper_batches: int = field(
        default=10, metadata={"help": "Train and validation batches averaged per hypergradient."}
    )
    hyper_learning_rate: float = field(default=0.01, metadata={"help": "Learning rate of the loss parameters."})
    hyper_optimizer: str = field(default="adam", metadata={"help": "adam or sgd, for the loss parameters."})
    search_steps: int | None = field(
        default=None, metadata={"help": "Stop updating the loss parameters after this step (frozen afterwards)."}
    )
    hypergradient_params: str = field(
        default="head",
        metadata={
            "help": "Lower-level weights in the hypergradient: head (final layer; works with every model) or all."
        },
    )
    upper_objective: str = field(
        default="balanced_ce",
        metadata={
            "help": f"Validation objective: {', '.join(UPPER_OBJECTIVES)} (engine objectives use a soft confusion "
            "matrix)."
        },
    )
    upper_objective_options: dict | str | None = field(
        default=None, metadata={"help": "Options of the upper objective (JSON)."}
    )

    def __post_init__(self) -> None:
        self.upper_objective_options = parse_options(self.upper_objective_options, "upper_objective_options")
        self.check_field_types()
        if self.loss_type != "parametric":
            raise ValueError("AutoBalanceConfig searches the parametric loss: loss_type must be 'parametric'")
        for name, value, valid in (
            ("hypergradient", self.hypergradient, HYPERGRADIENTS),
            ("upper_objective", self.upper_objective, UPPER_OBJECTIVES),
            ("hyper_optimizer", self.hyper_optimizer, ("adam", "sgd")),
            ("hypergradient_params", self.hypergradient_params, ("all", "head")),
        ):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
        if self.hyper_update_steps < 1 or self.hyper_batches < 1:
            raise ValueError("hyper_update_steps and hyper_batches must be >= 1")
        super().__post_init__()
        if self.upper_objective in OBJECTIVES:
            check_objective_options(self.upper_objective, self.upper_objective_options)

    def trained_objective(self) -> tuple[str | None, dict[str, Any]]:
        """The upper objective when it is one of the registry (balanced CE is not)."""
        if self.upper_objective in OBJECTIVES:
            return self.upper_objective, dict(self.upper_objective_options)
        return None, {}

    def parametric_loss_options(self) -> dict[str, Any]:
        """The options of the searched `ParametricCrossEntropy`: ``loss_options`` plus the loss-family fields."""
        return {
            **self.loss_options,
            "num_groups": self.num_groups,
            "init": self.init,
            "delta_activation": self.delta_activation,
            "learn_weights": self.learn_weights,
            "learn_delta": self.learn_delta,
        }


@dataclass
class FixMatchConfig(LongTailConfig):
    """`LongTailConfig` plus FixMatch's unlabelled loss: semi-supervised stage 1 (FixMatch-LA with the default loss).

    Per step, each labelled sample brings ``mu`` unlabelled ones; their weak views' confident predictions
    (top probability >= ``confidence_threshold``) are the targets of their strong views, weighted by ``lambda_u``.
    Evaluation, the saved model and the card use an EMA of the weights (``ema_decay``; None: the raw weights).
    """

    mu: int = field(default=2, metadata={"help": "Unlabelled samples per labelled sample in a step (published: 2)."})
    confidence_threshold: float = field(
        default=0.95, metadata={"help": "Pseudo-labels of weak views below this top probability are masked out."}
    )
    lambda_u: float = field(default=1.0, metadata={"help": "Weight of the unlabelled loss."})
    unlabeled_logit_adjustment: float = field(
        default=0.0,
        metadata={
            "help": "tau of a logit adjustment of the unlabelled loss by the labelled class prior, "
            "CE(strong + tau log pi, pseudo-label): with a pool as long-tailed as the labelled set, plain CE on "
            "confident pseudo-labels teaches the head prior back to a logit-adjusted model. 0: plain CE (published)."
        },
    )
    ema_decay: float | None = field(
        default=0.999,
        metadata={
            "help": "Decay of the weights' EMA used for evaluation and saved at the end, warmed up as "
            "min(decay, (1 + t) / (10 + t)) at update t so a short run is not its initial weights; None: no EMA."
        },
    )

    def __post_init__(self) -> None:
        self.check_field_types()  # types first: a wrongly typed field is a TypeError naming it
        if self.mu < 1:
            raise ValueError(f"mu must be >= 1 (unlabelled samples per labelled one), got {self.mu}")
        if not 0.0 < self.confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must lie in (0, 1], got {self.confidence_threshold}")
        if self.unlabeled_logit_adjustment < 0:
            raise ValueError(
                "unlabeled_logit_adjustment must be >= 0 (0: plain CE on the pool), got "
                f"{self.unlabeled_logit_adjustment}"
            )
        if self.lambda_u < 0:
            raise ValueError(f"lambda_u must be >= 0, got {self.lambda_u}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1) (or be None: no EMA), got {self.ema_decay}")
        super().__post_init__()


__all__ = [
    "AutoBalanceConfig",
    "FixMatchConfig",
    "LongTailConfig",
    "MethodConfig",
    "SelMixConfig",
    "parse_options",
]
