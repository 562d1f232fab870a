"""Non-decomposable objectives psi(C) of a confusion matrix: reported value, surrogate, multipliers.

The formulas are written out in docs/engine.md, "The mathematics": M2 to M6.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from . import groups, metrics
from .metrics import HeadTailSplit
from .options import check_options

CONFUSION_CLIP = 1e-7  # C is clipped to at least this before any derivative (docs/engine.md, M6. Clipping)


class Objective:
    """A metric of the normalised confusion matrix C (rows sum to the class prior), to be maximised.

    ``value`` is what gets reported (on a hard confusion matrix), ``surrogate`` is the differentiable
    torch function the gains are taken of, and ``update`` moves the objective's multipliers (Lagrange
    or min-max weights) from a fresh validation confusion matrix.
    """

    name: ClassVar[str] = "objective"
    # True when the objective splits the classes into head and tail, so it needs the training class counts
    needs_class_counts: ClassVar[bool] = False
    # True when the objective ranges over (class, group) cells, so it needs the data's group column
    needs_groups: ClassVar[bool] = False
    # psi(C) = sum_ij G_ij C_ij with a fixed G: the plug-in rule for it is exact (selmix_hf.posthoc)
    is_linear: ClassVar[bool] = False
    # the keys of metrics.classification_report this objective optimises (the model card marks them)
    optimised_metrics: ClassVar[tuple[str, ...]] = ()

    def __init__(self, num_classes: int, *, class_prior: Sequence[float] | torch.Tensor | None = None) -> None:
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        prior = (
            metrics.uniform_prior(num_classes)
            if class_prior is None
            else torch.as_tensor(class_prior, dtype=torch.float64)
        )
        self.class_prior = metrics.check_prior(prior.detach().cpu().to(torch.float64), num_classes)
        # the rows of the confusion matrix this objective reads: the classes, or (class, group) cells for the
        # group objectives (`_CellObjective`); each row's class and its share of the prior
        self.row_classes = torch.arange(num_classes)
        self.row_prior = self.class_prior

    # -- what subclasses define -------------------------------------------------------------
    def surrogate(self, confusion: torch.Tensor) -> torch.Tensor:
        """Differentiable psi(C) as a scalar tensor."""
        raise NotImplementedError

    def value(self, confusion: torch.Tensor) -> float:
        """The reported value of the objective on a (hard) confusion matrix."""
        raise NotImplementedError

    def update(self, confusion: torch.Tensor) -> None:
        """Update the multipliers from a validation confusion matrix (no-op for fixed objectives)."""

    def multipliers(self) -> dict[str, torch.Tensor]:
        """The objective's current multipliers, by name (empty for fixed objectives)."""
        return {}

    def constraint_violation(self, confusion: torch.Tensor) -> float:
        """How far C is from meeting the objective's constraints, relative to their targets (0 when met or none)."""
        return 0.0

    # -- shared machinery -------------------------------------------------------------------
    def rule_score(self, confusion: torch.Tensor) -> float:
        """What a decision rule is chosen by: `value` when the constraints hold, else minus the relative shortfall,
        so every feasible rule beats every infeasible one (selmix_hf.posthoc)."""
        violation = self.constraint_violation(confusion)
        return self.value(confusion) if violation <= 0.0 else -violation

    def tie_score(self, confusion: torch.Tensor) -> float:
        """Orders decision rules of equal `rule_score` (selmix_hf.posthoc): the surrogate at the current multipliers;
        min-type objectives override it with a soft minimum, whose plateaus are where ties happen."""
        return float(self.surrogate(confusion.clamp_min(CONFUSION_CLIP)))

    def report(self, confusion: torch.Tensor) -> dict[str, float]:
        """Reported value, plus whatever the objective reports beside it (e.g. min coverage)."""
        return {self.name: self.value(confusion)}

    def gradient(self, confusion: torch.Tensor) -> torch.Tensor:
        """g = dpsi/dC by autograd, at C clipped to >= 1e-7."""
        self._check_confusion(confusion)
        clipped = confusion.detach().clamp_min(CONFUSION_CLIP).clone().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self.surrogate(clipped), clipped)
        return grad

    def state_dict(self) -> dict[str, Any]:
        """Name and multipliers, so a checkpoint can restore the objective exactly."""
        return {"name": self.name, "multipliers": {k: v.detach().cpu().clone() for k, v in self.multipliers().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state is for objective {state.get('name')!r}, not {self.name!r}")
        current = self.multipliers()
        saved = state.get("multipliers", {})
        if set(saved) != set(current):
            raise ValueError(f"multipliers {sorted(saved)} do not match {self.name}'s {sorted(current)}")
        for key, tensor in saved.items():
            if tensor.shape != current[key].shape:
                raise ValueError(
                    f"multiplier {key!r} has shape {tuple(tensor.shape)}, expected {tuple(current[key].shape)}"
                )
            setattr(self, key, tensor.to(torch.float64).clone())

    @property
    def num_rows(self) -> int:
        """Rows of the confusion matrix this objective reads (K, or the number of (class, group) cells)."""
        return len(self.row_classes)

    def _check_confusion(self, confusion: torch.Tensor) -> None:
        expected = (self.num_rows, self.num_classes)
        if tuple(confusion.shape) != expected:
            rows = "cells" if self.needs_groups else "classes"
            raise ValueError(
                f"{self.name}: confusion matrix has shape {tuple(confusion.shape)}, expected {expected} "
                f"({rows} x classes)"
            )
        if not torch.isfinite(confusion).all():
            raise ValueError(f"{self.name}: confusion matrix contains NaN or inf")

    def _prior(self, like: torch.Tensor) -> torch.Tensor:
        return self.class_prior.to(dtype=like.dtype, device=like.device)

    def _row_recall(self, confusion: torch.Tensor) -> torch.Tensor:
        """C[r, k(r)] / pi_r: each row's recall of its own class through the fixed row prior."""
        rows = torch.arange(self.num_rows, device=confusion.device)
        prior = self.row_prior.to(dtype=confusion.dtype, device=confusion.device)
        return confusion[rows, self.row_classes.to(confusion.device)] / prior

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_classes={self.num_classes})"


class MeanRecall(Objective):
    """Mean of per-class recalls; with a uniform prior the surrogate is trace(C)."""

    name = "mean_recall"
    is_linear = True
    optimised_metrics = ("mean_recall",)

    def surrogate(self, confusion: torch.Tensor) -> torch.Tensor:
        return self._row_recall(confusion).mean()

    def value(self, confusion: torch.Tensor) -> float:
        return metrics.mean_recall(confusion)


class Accuracy(Objective):
    """Accuracy under the class prior (trace of C): the decomposable baseline."""

    name = "accuracy"
    is_linear = True
    optimised_metrics = ("accuracy",)

    def surrogate(self, confusion: torch.Tensor) -> torch.Tensor:
        return torch.trace(confusion)

    def value(self, confusion: torch.Tensor) -> float:
        return metrics.accuracy(confusion)


class GMean(Objective):
    """Geometric mean of recalls, (prod_i C_ii / R_i)^(1/K)."""

    name = "g_mean"
    optimised_metrics = ("g_mean",)

    def surrogate(self, confusion: torch.Tensor) -> torch.Tensor:
        row = confusion.sum(dim=1)
        return torch.exp(torch.log(torch.diagonal(confusion) / row).mean())

    def value(self, confusion: torch.Tensor) -> float:
        return metrics.g_mean(confusion)


class HMean(Objective):
    """Harmonic mean of recalls, K / sum_i (R_i / C_ii)."""

    name = "h_mean"
    optimised_metrics = ("h_mean",)

    def surrogate(self, confusion: torch.Tensor) -> torch.Tensor:
        row = confusion.sum(dim=1)
        return self.num_classes / (row / torch.diagonal(confusion)).sum()

    def value(self, confusion: torch.Tensor) -> float:
        return metrics.h_mean(confusion)


class MinRecall(Objective):
    """Worst-class recall through its min-max surrogate sum_i lam_i recall_i.

    Multipliers: lam <- normalise(lam^beta * exp(-omega * recall)), started at 1/K (SelMix defaults).
    """

    name = "min_recall"
    optimised_metrics = ("min_recall",)

    def __init__(self, num_classes: int, *, omega: float = 50.0, beta: float = 0.0, class_prior: Any = None) -> None:
        super().__init__(num_classes, class_prior=class_prior)
        self.omega, self.beta = float(omega), float(beta)
        self.lam = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)

    def _class_weights(self) -> torch.Tensor:
        return self.lam

    def surrogate(self, confusion: torch.Tensor) -> torch.Tensor:
        weights = self._class_weights().to(confusion)
        return (weights * self._row_recall(confusion)).sum()

    def value(self, confusion: torch.Tensor) -> float:
        return metrics.min_recall(confusion)

    def update(self, confusion: torch.Tensor) -> None:
        self._check_confusion(confusion)
        self.lam = torch.softmax(self.beta * torch.log(self.lam) - self.omega * self._minimised(confusion), dim=0)

    def _minimised(self, confusion: torch.Tensor) -> torch.Tensor:
        """The recalls whose minimum is the value (one per class), which the multipliers and `tie_score` weigh."""
        return metrics.recalls(confusion.detach().cpu().to(torch.float64))

    def tie_score(self, confusion: torch.Tensor) -> float:
        """Soft minimum -log(sum exp(-omega r)) / omega of the minimised recalls, at C itself: of two rules with the
        same worst recall, the one with fewer classes at (or near) it wins, and a rule that lifts one of two tied
        worst classes by pushing others down to the minimum loses (frozen multipliers would prefer it)."""
        return float(-torch.logsumexp(-self.omega * self._minimised(confusion), dim=0) / self.omega)

    def multipliers(self) -> dict[str, torch.Tensor]:
        return {"lam": self.lam}


class _HeadTailMixin:
    """Shared handling of the head/tail class split for head-tail objectives."""

    split: HeadTailSplit

    def _set_split(
        self,
        num_classes: int,
        class_counts: Any,
        tail_fraction: float,
        head: Sequence[int] | None,
        tail: Sequence[int] | None,
    ) -> None:
        if class_counts is None and head is None and tail is None:
            raise ValueError(
                f"objective {self.name!r} needs the head/tail split: pass class_counts=<training counts per class> "  # type: ignore[attr-defined]
                "(tail = the 10% rarest classes, see tail_fraction) or explicit head=[...] / tail=[...]"
            )
        if class_counts is not None and len(class_counts) != num_classes:
            raise ValueError(f"class_counts has {len(class_counts)} entries for {num_classes} classes")
        self.split = metrics.head_tail_split(
            class_counts, tail_fraction, head=head, tail=tail, num_classes=num_classes
        ).check(num_classes)

    def _spread(self, head_value: torch.Tensor, tail_value: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Per-class vector: head_value / |head| on head classes, tail_value / |tail| on tail classes."""
        out = torch.zeros(num_classes, dtype=torch.float64)
        out[list(self.split.head)] = head_value / len(self.split.head)
        out[list(self.split.tail)] = tail_value / len(self.split.tail)
        return out


class MinHeadTailRecall(_HeadTailMixin, MinRecall):
    """min(mean head recall, mean tail recall) with (lam_h, lam_t) = softmax(-omega [head, tail recall])."""

    name = "min_head_tail_recall"
    needs_class_counts = True
    optimised_metrics = ("min_head_tail_recall",)

    def __init__(
        self,
        num_classes: int,
        *,
        class_counts: Any = None,
        tail_fraction: float = 0.1,
        head: Sequence[int] | None = None,
        tail: Sequence[int] | None = None,
        omega: float = 50.0,
        class_prior: Any = None,
    ) -> None:
        super().__init__(num_classes, omega=omega, class_prior=class_prior)
        self._set_split(num_classes, class_counts, tail_fraction, head, tail)
        del self.lam
        self.lam_head_tail = torch.full((2,), 0.5, dtype=torch.float64)

    def _class_weights(self) -> torch.Tensor:
        return self._spread(self.lam_head_tail[0], self.lam_head_tail[1], self.num_classes)

    def value(self, confusion: torch.Tensor) -> float:
        return metrics.min_head_tail_recall(confusion, self.split)

    def _minimised(self, confusion: torch.Tensor) -> torch.Tensor:
        """The head and the tail recall."""
        recalls = metrics.head_tail_recall(confusion.detach().cpu().to(torch.float64), self.split)
        return torch.tensor(recalls, dtype=torch.float64)

    def update(self, confusion: torch.Tensor) -> None:
        self._check_confusion(confusion)
        self.lam_head_tail = torch.softmax(-self.omega * self._minimised(confusion), dim=0)

    def multipliers(self) -> dict[str, torch.Tensor]:
        return {"lam_head_tail": self.lam_head_tail}


def coverage_multiplier(coverage: torch.Tensor, target: torch.Tensor, mu_max: float, tau: float) -> torch.Tensor:
    """mu = max(0, mu_max (1 - exp((coverage - target) / tau))): zero once the target is met (docs/engine.md, M4)."""
    return (mu_max * (1.0 - torch.exp((coverage - target) / tau))).clamp_min(0.0)


class _Constrained(Objective):
    """psi = (psi_base(class C) + sum_r mu_r s_r(C)) / (max mu + 1): a base objective plus multiplier-weighted
    constraint terms s_r, the mu following each constraint's violation (docs/engine.md, M4); the subclasses say what
    the constrained quantities are."""

    base_class: ClassVar[type[Objective]]

    def _set_constraint(self, tau: float, mu_max: float, rows: int) -> None:
        """Check tau, build the base objective and start every multiplier at zero."""
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.tau, self.mu_max = float(tau), float(mu_max)
        self.base = self.base_class(self.num_classes, class_prior=self.class_prior)
        self.mu = torch.zeros(rows, dtype=torch.float64)

    def _class_confusion(self, confusion: torch.Tensor) -> torch.Tensor:
        """The class confusion matrix the base objective reads."""
        return confusion

    def _penalty(self, confusion: torch.Tensor) -> torch.Tensor:
        """sum_r mu_r s_r(C), differentiable in C."""
        raise NotImplementedError

    def _normaliser(self) -> float:
        return float(self.mu.max()) + 1.0

    def surrogate(self, confusion: torch.Tensor) -> torch.Tensor:
        base = self.base.surrogate(self._class_confusion(confusion))
        return (base + self._penalty(confusion)) / self._normaliser()

    def value(self, confusion: torch.Tensor) -> float:
        return self.base.value(self._class_confusion(confusion))

    def multipliers(self) -> dict[str, torch.Tensor]:
        return {"mu": self.mu}


class _CoverageConstrained(_Constrained):
    """A base objective under per-class coverage >= alpha pi_l: s_l = cov_l."""

    def __init__(
        self,
        num_classes: int,
        *,
        alpha: float = 0.95,
        tau: float = 0.01,
        mu_max: float = 100.0,
        class_prior: Any = None,
    ) -> None:
        super().__init__(num_classes, class_prior=class_prior)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha (the coverage target as a fraction of the prior) must lie in (0, 1], got {alpha}")
        self.alpha = float(alpha)
        self._set_constraint(tau, mu_max, num_classes)

    def _class_mu(self) -> torch.Tensor:
        return self.mu

    def _penalty(self, confusion: torch.Tensor) -> torch.Tensor:
        return (self._class_mu().to(confusion) * metrics.coverages(confusion)).sum()

    def report(self, confusion: torch.Tensor) -> dict[str, float]:
        return {self.name: self.value(confusion), "min_coverage": metrics.min_coverage(confusion)}

    def _coverage_and_target(self, confusion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The constrained coverages of C and their targets alpha pi."""
        return metrics.coverages(confusion.detach().cpu().to(torch.float64)), self.alpha * self.class_prior

    def constraint_violation(self, confusion: torch.Tensor) -> float:
        coverage, target = self._coverage_and_target(confusion)
        return float(((target - coverage) / target).max().clamp_min(0.0))

    def update(self, confusion: torch.Tensor) -> None:
        self._check_confusion(confusion)
        self.mu = coverage_multiplier(*self._coverage_and_target(confusion), self.mu_max, self.tau)


class MeanRecallMinCoverage(_CoverageConstrained):
    """Mean recall under per-class coverage >= alpha pi_l."""

    name = "mean_recall_min_coverage"
    base_class = MeanRecall
    optimised_metrics = ("mean_recall", "min_coverage")


class HMeanMinCoverage(_CoverageConstrained):
    """H-mean of recalls under per-class coverage >= alpha pi_l."""

    name = "h_mean_min_coverage"
    base_class = HMean
    optimised_metrics = ("h_mean", "min_coverage")


class _HeadTailCoverageConstrained(_HeadTailMixin, _CoverageConstrained):
    """Coverage constraint on the mean head coverage and the mean tail coverage (mu_h, mu_t)."""

    needs_class_counts = True

    def __init__(
        self,
        num_classes: int,
        *,
        class_counts: Any = None,
        tail_fraction: float = 0.1,
        head: Sequence[int] | None = None,
        tail: Sequence[int] | None = None,
        alpha: float = 0.95,
        tau: float = 0.01,
        mu_max: float = 100.0,
        class_prior: Any = None,
    ) -> None:
        super().__init__(num_classes, alpha=alpha, tau=tau, mu_max=mu_max, class_prior=class_prior)
        self._set_split(num_classes, class_counts, tail_fraction, head, tail)
        del self.mu
        self.mu_head_tail = torch.zeros(2, dtype=torch.float64)

    def _class_mu(self) -> torch.Tensor:
        return self._spread(self.mu_head_tail[0], self.mu_head_tail[1], self.num_classes)

    def _normaliser(self) -> float:
        return float(self.mu_head_tail.max()) + 1.0

    def _group_means(self, per_class: torch.Tensor) -> torch.Tensor:
        return torch.stack([per_class[list(self.split.head)].mean(), per_class[list(self.split.tail)].mean()])

    def report(self, confusion: torch.Tensor) -> dict[str, float]:
        head_cov, tail_cov = self._group_means(metrics.coverages(confusion.detach().cpu().to(torch.float64))).tolist()
        return {self.name: self.value(confusion), "min_head_tail_coverage": min(head_cov, tail_cov)}

    def _coverage_and_target(self, confusion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        coverage = self._group_means(metrics.coverages(confusion.detach().cpu().to(torch.float64)))
        return coverage, self.alpha * self._group_means(self.class_prior)

    def update(self, confusion: torch.Tensor) -> None:
        self._check_confusion(confusion)
        self.mu_head_tail = coverage_multiplier(*self._coverage_and_target(confusion), self.mu_max, self.tau)

    def multipliers(self) -> dict[str, torch.Tensor]:
        return {"mu_head_tail": self.mu_head_tail}


class MeanRecallMinHeadTailCoverage(_HeadTailCoverageConstrained):
    """Mean recall under mean head and mean tail coverage >= alpha times their mean prior."""

    name = "mean_recall_min_head_tail_coverage"
    base_class = MeanRecall
    optimised_metrics = ("mean_recall",)  # classification_report has no head/tail coverage key


class HMeanMinHeadTailCoverage(_HeadTailCoverageConstrained):
    """H-mean of recalls under mean head and mean tail coverage >= alpha times their mean prior."""

    name = "h_mean_min_head_tail_coverage"
    base_class = HMean
    optimised_metrics = ("h_mean",)  # classification_report has no head/tail coverage key


class _CellMixin:
    """The (class, group) cells of a group objective: ``cell_classes`` (the class of each cell) and ``cell_prior``
    (each cell's share of its class's prior; by default the class prior split evenly). Without cells the objective
    has one group, and equals its class-only counterpart exactly."""

    needs_groups = True

    def _set_cells(self, cell_classes: Any, cell_prior: Any) -> None:
        num_classes, class_prior = self.num_classes, self.class_prior  # type: ignore[attr-defined]
        if cell_classes is None:
            if cell_prior is not None:
                raise ValueError("cell_prior was given without cell_classes (the class of each cell)")
            return
        classes = torch.as_tensor(cell_classes).long().reshape(-1)
        metrics.check_labels(classes, num_classes, "cell_classes")
        missing = sorted(set(range(num_classes)) - set(classes.tolist()))
        if missing:
            raise ValueError(f"classes {missing[:20]} have no cell; every class needs at least one (its recall)")
        per_class = torch.bincount(classes, minlength=num_classes).to(torch.float64)
        if cell_prior is None:
            prior = class_prior[classes] / per_class[classes]
        else:
            prior = torch.as_tensor(cell_prior, dtype=torch.float64).reshape(-1)
            if prior.shape != classes.shape or not torch.isfinite(prior).all() or (prior <= 0).any():
                raise ValueError(f"cell_prior must hold {classes.numel()} positive finite entries, one per cell")
            sums = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, classes, prior)
            if not torch.allclose(sums, class_prior, atol=1e-6):
                raise ValueError("the cell prior of each class must sum to that class's prior (CellLayout.prior)")
        self.row_classes, self.row_prior = classes, prior


class WorstGroupAccuracy(_CellMixin, MinRecall):
    """Worst accuracy over the (class, group) cells through its min-max surrogate sum_c lam_c recall_c, with
    lam <- normalise(lam^beta exp(-omega recall)) as min recall has over classes."""

    name = "worst_group_accuracy"
    optimised_metrics = ("worst_group_accuracy",)

    def __init__(
        self,
        num_classes: int,
        *,
        cell_classes: Any = None,
        cell_prior: Any = None,
        omega: float = 50.0,
        beta: float = 0.0,
        class_prior: Any = None,
    ) -> None:
        super().__init__(num_classes, omega=omega, beta=beta, class_prior=class_prior)
        self._set_cells(cell_classes, cell_prior)
        self.lam = torch.full((self.num_rows,), 1.0 / self.num_rows, dtype=torch.float64)

    def value(self, confusion: torch.Tensor) -> float:
        return float(self._minimised(confusion).min())

    def _minimised(self, confusion: torch.Tensor) -> torch.Tensor:
        """The accuracy of each cell."""
        return groups.row_recalls(confusion.detach().cpu().to(torch.float64), self.row_classes)


class GroupBalancedAccuracy(_CellMixin, MeanRecall):
    """Mean accuracy over the (class, group) cells, each cell weighing the same."""

    name = "group_balanced_accuracy"
    is_linear = False  # linear in the cell confusion, not in the class confusion the post-hoc rules see
    optimised_metrics = ("group_balanced_accuracy",)

    def __init__(
        self, num_classes: int, *, cell_classes: Any = None, cell_prior: Any = None, class_prior: Any = None
    ) -> None:
        super().__init__(num_classes, class_prior=class_prior)
        self._set_cells(cell_classes, cell_prior)

    def value(self, confusion: torch.Tensor) -> float:
        return float(groups.row_recalls(confusion.detach().cpu().to(torch.float64), self.row_classes).mean())


class _EqualOpportunityConstrained(_CellMixin, _Constrained):
    """A class objective under equal opportunity, every cell's true-positive rate at most ``max_gap`` below its
    class's (only the cells of ``positive_class`` when named): s_c = recall_c - recall_k(c), mu_c as for the
    coverage constraints (docs/engine.md, M4)."""

    def __init__(
        self,
        num_classes: int,
        *,
        cell_classes: Any = None,
        cell_prior: Any = None,
        max_gap: float = 0.05,
        positive_class: int | None = None,
        tau: float = 0.01,
        mu_max: float = 100.0,
        class_prior: Any = None,
    ) -> None:
        super().__init__(num_classes, class_prior=class_prior)
        if not 0.0 <= max_gap < 1.0:
            raise ValueError(f"max_gap (the allowed shortfall of a group's recall) must lie in [0, 1), got {max_gap}")
        if positive_class is not None and not 0 <= positive_class < num_classes:
            raise ValueError(f"positive_class={positive_class} is not a class index in [0, {num_classes})")
        self.max_gap, self.positive_class = float(max_gap), positive_class
        self._set_cells(cell_classes, cell_prior)
        self._set_constraint(tau, mu_max, self.num_rows)
        constrained = torch.ones(self.num_rows, dtype=torch.bool)
        if positive_class is not None:
            constrained = self.row_classes == positive_class
        self.constrained = constrained.to(torch.float64)

    def _class_confusion(self, confusion: torch.Tensor) -> torch.Tensor:
        return groups.aggregate_cells(confusion, self.row_classes, self.num_classes)

    def _shortfalls(self, confusion: torch.Tensor) -> torch.Tensor:
        """recall_c - recall_k(c) per cell, both through the fixed priors (differentiable)."""
        class_recall = torch.diagonal(self._class_confusion(confusion)) / self._prior(confusion)
        return self._row_recall(confusion) - class_recall[self.row_classes.to(confusion.device)]

    def _penalty(self, confusion: torch.Tensor) -> torch.Tensor:
        return ((self.mu * self.constrained).to(confusion) * self._shortfalls(confusion)).sum()

    def report(self, confusion: torch.Tensor) -> dict[str, float]:
        recalls = groups.row_recalls(confusion.detach().cpu().to(torch.float64), self.row_classes)
        gaps = groups.spreads(recalls, self.row_classes, self.num_classes)
        gap = float(gaps.max() if self.positive_class is None else gaps[self.positive_class])
        return {self.name: self.value(confusion), "equal_opportunity_gap": gap}

    def constraint_violation(self, confusion: torch.Tensor) -> float:
        shortfall = -self.max_gap - self._shortfalls(confusion.detach().cpu().to(torch.float64))
        return float((shortfall.clamp_min(0.0) * self.constrained).max())

    def update(self, confusion: torch.Tensor) -> None:
        self._check_confusion(confusion)
        gaps = self._shortfalls(confusion.detach().cpu().to(torch.float64))
        target = torch.full_like(gaps, -self.max_gap)
        self.mu = coverage_multiplier(gaps, target, self.mu_max, self.tau) * self.constrained


class MeanRecallEqualOpportunity(_EqualOpportunityConstrained):
    """Mean recall under equal opportunity over groups."""

    name = "mean_recall_equal_opportunity"
    base_class = MeanRecall
    optimised_metrics = ("mean_recall", "equal_opportunity_gap")


class AccuracyEqualOpportunity(_EqualOpportunityConstrained):
    """Accuracy (under the class prior) under equal opportunity over groups."""

    name = "accuracy_equal_opportunity"
    base_class = Accuracy
    optimised_metrics = ("accuracy", "equal_opportunity_gap")


class CustomObjective(Objective):
    """Any differentiable torch function of the normalised confusion matrix, to be maximised."""

    def __init__(
        self,
        num_classes: int,
        fn: Callable[[torch.Tensor], torch.Tensor],
        *,
        name: str = "custom",
        value_fn: Callable[[torch.Tensor], float] | None = None,
        class_prior: Any = None,
    ) -> None:
        super().__init__(num_classes, class_prior=class_prior)
        if not callable(fn):
            raise TypeError("fn must be a callable mapping a K x K confusion tensor to a scalar tensor")
        self.fn, self.value_fn, self.name = fn, value_fn, name  # type: ignore[misc]

    def surrogate(self, confusion: torch.Tensor) -> torch.Tensor:
        out = self.fn(confusion)
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            raise ValueError(f"custom objective {self.name!r} must return a scalar tensor, got {type(out).__name__}")
        return out.reshape(())

    def value(self, confusion: torch.Tensor) -> float:
        if self.value_fn is not None:
            return float(self.value_fn(confusion))
        return float(self.surrogate(confusion.detach()))


OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls
    for cls in (
        MeanRecall,
        MinRecall,
        MinHeadTailRecall,
        GMean,
        HMean,
        MeanRecallMinCoverage,
        HMeanMinCoverage,
        MeanRecallMinHeadTailCoverage,
        HMeanMinHeadTailCoverage,
        Accuracy,
        WorstGroupAccuracy,
        GroupBalancedAccuracy,
        MeanRecallEqualOpportunity,
        AccuracyEqualOpportunity,
    )
}


def check_objective_options(name: str, options: dict[str, Any]) -> None:
    """An objective name of the registry and its options (names and types): errors list the valid ones."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid objectives are: {', '.join(sorted(OBJECTIVES))}")
    check_options(OBJECTIVES[name], options, f"objective {name!r}", skip=("num_classes",))


def get_objective(name: str | Objective, num_classes: int, **options: Any) -> Objective:
    """Build an objective by registry name; unknown names and options are errors that list the valid ones."""
    if isinstance(name, Objective):
        if name.num_classes != num_classes:
            raise ValueError(f"objective {name.name!r} was built for {name.num_classes} classes, not {num_classes}")
        return name
    check_objective_options(name, options)
    cls = OBJECTIVES[name]
    return cls(num_classes, **options)


def objective_for_training(
    name: str, num_classes: int, class_counts: Sequence[int], tail_fraction: float = 0.1, **options: Any
) -> Objective:
    """`get_objective`, giving the training counts to objectives that need them unless the options split the classes."""
    cls = OBJECTIVES.get(name) if isinstance(name, str) else None
    if cls is not None and cls.needs_class_counts and not {"head", "tail", "class_counts"} & set(options):
        options.update(class_counts=list(class_counts), tail_fraction=tail_fraction)
    return get_objective(name, num_classes, **options)


def optimised_metrics(name: str | None) -> list[str]:
    """The `classification_report` keys the named objective optimises: [name] for a custom name, [] for none."""
    if not name:
        return []
    cls = OBJECTIVES.get(name)
    return [name] if cls is None else list(cls.optimised_metrics)


def vector_logs(name: str, values: torch.Tensor, max_entries: int = 16) -> dict[str, float]:
    """Log scalars of a tensor: ``name_i`` per entry, or ``name_max`` / ``name_min`` beyond max_entries."""
    flat = values.flatten()
    if flat.numel() <= max_entries:
        return {f"{name}_{i}": float(v) for i, v in enumerate(flat)}
    return {f"{name}_max": float(flat.max()), f"{name}_min": float(flat.min())}


def multiplier_logs(objective: Objective, prefix: str, max_entries: int = 16) -> dict[str, float]:
    """The objective's multipliers as log scalars: one per entry, or max / min beyond max_entries."""
    logs = {}
    for key, value in objective.multipliers().items():
        logs.update(vector_logs(f"{prefix}/{key}", value, max_entries))
    return logs
