"""Long-tailed classification losses on logits: each takes the training class counts and is a plain nn.Module.

Every loss returns the mean over the batch of a per-sample loss, so micro-batches of equal size accumulate
exactly (class weights multiply each sample's term; they are normalised to sum to K, not per batch).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .objectives import OBJECTIVES, Objective, objective_for_training
from .options import check_options

Counts = Sequence[int] | torch.Tensor


def counts_tensor(class_counts: Counts, what: str = "this loss") -> torch.Tensor:
    """Class counts as float64, with every class present: the losses take logs and powers of them."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64).reshape(-1)
    if counts.numel() < 2:
        raise ValueError(f"{what} needs the training counts of at least two classes, got {counts.numel()}")
    if (counts < 0).any() or not torch.isfinite(counts).all():
        raise ValueError("class counts must be finite and non-negative")
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise ValueError(
            f"classes {empty[:20]} have zero training samples, and {what} needs every class's count "
            "(it takes the log or a power of it); drop those classes from num_labels, or use loss_type='ce'"
        )
    return counts


def class_balanced_weights(class_counts: Counts, beta: float = 0.9999) -> torch.Tensor:
    """Effective-number weights w_k = (1 - beta) / (1 - beta^n_k), normalised to sum to K (Cui et al., 2019)."""
    counts = counts_tensor(class_counts, "class-balanced weighting")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must lie in [0, 1), got {beta}")
    weights = (1.0 - beta) / (1.0 - beta**counts) if beta > 0 else torch.ones_like(counts)
    return (weights * counts.numel() / weights.sum()).float()


def inverse_frequency_weights(class_counts: Counts) -> torch.Tensor:
    """w_k proportional to 1 / n_k, normalised to sum to K."""
    inverse = 1.0 / counts_tensor(class_counts, "inverse-frequency weighting")
    return (inverse * inverse.numel() / inverse.sum()).float()


def log_prior(class_counts: Counts) -> torch.Tensor:
    """log pi_k of the training label distribution."""
    counts = counts_tensor(class_counts, "logit adjustment")
    return torch.log(counts / counts.sum()).float()


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits are lifted to float32 for the loss; float32 and float64 stay as they are."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _weighted_mean(per_sample: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is not None:
        per_sample = per_sample * weight.to(per_sample)[labels]
    return per_sample.mean()


class LongTailLoss(nn.Module):
    """Base of the losses: class attributes declare what a trainer must provide and what a model card cites."""

    # key of selmix_hf.citations.CITATIONS for the loss's paper, None when there is nothing to cite
    citation: ClassVar[str | None] = None
    # True when the trainer must call update(confusion) with validation confusion matrices during training
    needs_validation: ClassVar[bool] = False
    # True when the loss has set_reweighting(enabled), the deferred re-weighting (DRW) stage a trainer switches on
    has_deferred_reweighting: ClassVar[bool] = False
    # True when the loss is over (class, group) cells: built with group_counts, called as loss(logits, labels, groups)
    needs_groups: ClassVar[bool] = False
    # True when the trainer must call end_step(reduce) after every optimiser step (online state over whole steps)
    steps_with_optimizer: ClassVar[bool] = False

    @classmethod
    def objective_of(cls, options: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """The registry objective a loss with these options follows, and its options; (None, {}) for fixed losses."""
        return None, {}


class CrossEntropy(LongTailLoss):
    """-log softmax(f)_y, optionally weighted per class: the baseline."""

    citation = None

    def __init__(self, weight: Sequence[float] | torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _weighted_mean(F.cross_entropy(_upcast(logits), labels, reduction="none"), labels, self.weight)


class WeightedCrossEntropy(CrossEntropy):
    """w_y CE(f, y) with class-balanced (effective number, beta) or inverse-frequency weights summing to K."""

    citation = "class_balanced"

    def __init__(self, class_counts: Counts, weighting: str = "class_balanced", beta: float = 0.9999) -> None:
        if weighting == "class_balanced":
            weight = class_balanced_weights(class_counts, beta)
        elif weighting == "inverse":
            weight = inverse_frequency_weights(class_counts)
        else:
            raise ValueError(f"unknown weighting {weighting!r}; valid: class_balanced, inverse")
        super().__init__(weight)


class FocalLoss(LongTailLoss):
    """-(1 - p_y)^gamma log p_y (Lin et al., 2017): down-weights examples the model already gets right."""

    citation = "focal"

    def __init__(self, gamma: float = 2.0, weight: Sequence[float] | torch.Tensor | None = None) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(_upcast(logits), dim=1).gather(1, labels.unsqueeze(1)).squeeze(1)
        return _weighted_mean(-((1.0 - log_p.exp()) ** self.gamma) * log_p, labels, self.weight)


class LogitAdjustedLoss(LongTailLoss):
    """CE(f + tau log pi_train, y) (Menon et al., ICLR 2021); tau = 1 is the balanced softmax."""

    citation = "logit_adjusted"

    def __init__(self, class_counts: Counts, tau: float = 1.0) -> None:
        super().__init__()
        self.tau = float(tau)
        self.register_buffer("log_prior", log_prior(class_counts))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(_upcast(logits) + self.tau * self.log_prior, labels)


class BalancedSoftmaxLoss(LogitAdjustedLoss):
    """Balanced softmax (Ren et al., NeurIPS 2020): logit adjustment with tau = 1."""

    citation = "balanced_softmax"

    def __init__(self, class_counts: Counts) -> None:
        super().__init__(class_counts, tau=1.0)


def ldam_margins(class_counts: Counts, max_margin: float = 0.5) -> torch.Tensor:
    """m_k proportional to n_k^(-1/4), scaled so the rarest class gets max_margin."""
    margins = counts_tensor(class_counts, "LDAM") ** -0.25
    return (margins * (max_margin / margins.max())).float()


class LDAMLoss(LongTailLoss):
    """CE(s (f - m_y e_y), y), m_k ~ n_k^(-1/4) (Cao et al., NeurIPS 2019), with deferred re-weighting (DRW).

    The published scale s = 30 is for cosine-normalised logits (a normalised head); every head this library finds
    is an ordinary linear layer with raw logits, so the default here is s = 1. ``set_reweighting(True)`` switches on
    the class-balanced weights (the DRW stage); the trainer does it at ``drw_start_epoch``.
    """

    citation = "ldam"
    has_deferred_reweighting = True

    def __init__(
        self, class_counts: Counts, max_margin: float = 0.5, scale: float = 1.0, drw_beta: float = 0.9999
    ) -> None:
        super().__init__()
        self.scale = float(scale)
        self.register_buffer("margins", ldam_margins(class_counts, max_margin))
        self.register_buffer("drw_weight", class_balanced_weights(class_counts, drw_beta))
        self.reweighting = False

    def set_reweighting(self, enabled: bool) -> None:
        self.reweighting = bool(enabled)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shifted = _upcast(logits) - F.one_hot(labels, logits.shape[1]) * self.margins[labels].unsqueeze(1)
        per_sample = F.cross_entropy(self.scale * shifted, labels, reduction="none")
        return _weighted_mean(per_sample, labels, self.drw_weight if self.reweighting else None)

    def get_extra_state(self) -> dict[str, Any]:
        return {"reweighting": self.reweighting}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.reweighting = bool(state["reweighting"])


class VSLoss(LongTailLoss):
    """Vector-scaling loss CE(Delta * f + iota, y), Delta_k = (n_k / n_max)^gamma, iota_k = tau log pi_k (Kini)."""

    citation = "vs"

    def __init__(self, class_counts: Counts, gamma: float = 0.2, tau: float = 1.0) -> None:
        super().__init__()
        counts = counts_tensor(class_counts, "the VS loss")
        self.register_buffer("delta", ((counts / counts.max()) ** gamma).float())
        self.register_buffer("iota", (tau * torch.log(counts / counts.sum())).float())

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.delta * _upcast(logits) + self.iota, labels)


DELTA_ACTIVATIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "exp": (torch.exp, torch.log),
    "sigmoid": (torch.sigmoid, torch.logit),
    "identity": (lambda x: x, lambda x: x),
}
PARAMETRIC_INITS = ("ones", "la", "cdt")


def frequency_groups(class_counts: Counts, num_groups: int | None) -> torch.Tensor:
    """Group index of each class: classes sorted by training count (most first), cut into num_groups equal runs."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64).reshape(-1)
    num_classes = counts.numel()
    if num_groups is None or num_groups >= num_classes:
        return torch.arange(num_classes)
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    order = sorted(range(num_classes), key=lambda k: (-float(counts[k]), k))
    groups = torch.empty(num_classes, dtype=torch.long)
    for rank, k in enumerate(order):
        groups[k] = rank * num_groups // num_classes
    return groups


class ParametricCrossEntropy(LongTailLoss):
    """-w_y log softmax(Delta * f + l)_y: AutoBalance's loss family (Li et al., NeurIPS 2021).

    Delta (multiplicative, through ``delta_activation``), l (additive) and w (per-class weight) are parameters,
    optionally tied over ``num_groups`` groups of frequency-sorted classes. Special cases: CE (Delta = 1, l = 0,
    w = 1), logit adjustment (l = tau log pi), CDT (Delta_k = (n_k / n_max)^gamma) and VS (both).

    With ``sample_groups`` G > 1 (the group-sensitive loss of the AutoBalance paper) each parameter is a G x K table:
    a sample of group g is scored with row g, -w_gy log softmax(Delta_g * f + l_g)_y; call it as
    loss(logits, labels, groups). Given the training ``group_counts`` (K x G), the `la` and `cdt` inits of row g
    use the class counts within group g (l_gy = tau log p(y | g)), an empty cell counted as one sample.
    """

    citation = "autobalance"

    def __init__(
        self,
        class_counts: Counts,
        *,
        num_groups: int | None = None,
        init: str = "ones",
        delta_activation: str = "exp",
        learn_weights: bool = False,
        learn_delta: bool = True,
        la_tau: float = 1.0,
        cdt_gamma: float = 0.2,
        sample_groups: int = 1,
        group_counts: Any = None,
    ) -> None:
        super().__init__()
        if not isinstance(sample_groups, int) or sample_groups < 1:
            raise ValueError(f"sample_groups must be an integer >= 1, got {sample_groups!r}")
        if init not in PARAMETRIC_INITS:
            raise ValueError(f"unknown init {init!r}; valid: {', '.join(PARAMETRIC_INITS)}")
        if delta_activation not in DELTA_ACTIVATIONS:
            raise ValueError(f"unknown delta_activation {delta_activation!r}; valid: {', '.join(DELTA_ACTIVATIONS)}")
        counts = counts_tensor(class_counts, "the parametric loss")
        self.delta_activation = delta_activation
        self.register_buffer("groups", frequency_groups(counts, num_groups))
        rows = counts.unsqueeze(0)  # the counts each parameter row starts from: 1 x K, or G x K within groups
        if sample_groups > 1 and group_counts is not None:
            cells = cell_counts_tensor(group_counts, "the group-sensitive parametric loss")
            if cells.shape != (counts.numel(), sample_groups):
                raise ValueError(
                    f"group_counts must be classes x groups = {counts.numel()} x {sample_groups}, "
                    f"got {tuple(cells.shape)}"
                )
            rows = cells.T.clamp_min(1.0)  # an empty cell counts as one sample: its log prior stays finite
        num = int(self.groups.max()) + 1
        tied = torch.zeros(rows.shape[0], num, dtype=torch.float64).index_add_(1, self.groups, rows)
        mean_counts = tied / torch.bincount(self.groups, minlength=num).double()  # a tie's classes share its mean
        delta = (
            (mean_counts / mean_counts.max(dim=1, keepdim=True).values) ** cdt_gamma
            if init == "cdt"
            else torch.ones_like(mean_counts)
        )
        if delta_activation == "sigmoid":
            delta = delta.clamp(1e-4, 1 - 1e-4)  # sigmoid never reaches 1: start as close as it gets
        offset = (
            la_tau * torch.log(mean_counts / rows.sum(dim=1, keepdim=True))
            if init == "la"
            else torch.zeros_like(mean_counts)
        )
        inverse = DELTA_ACTIVATIONS[delta_activation][1]
        self.needs_groups = sample_groups > 1  # then called as loss(logits, labels, groups)
        shape = (sample_groups, num) if self.needs_groups else (num,)

        def table(values: torch.Tensor) -> torch.Tensor:
            return (values.expand(shape) if self.needs_groups else values[0]).float().clone()

        self.raw_delta = nn.Parameter(table(inverse(delta)), requires_grad=learn_delta)
        self.offset = nn.Parameter(table(offset))
        self.weight = nn.Parameter(torch.ones(shape), requires_grad=learn_weights)

    @classmethod
    def from_values(
        cls, delta: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor | None = None
    ) -> ParametricCrossEntropy:
        """A per-class loss with the given Delta, l and w (identity activation; G x K tables for a group-sensitive
        loss): for fixed losses and checks."""
        delta = torch.as_tensor(delta)
        num_classes = delta.shape[-1]
        groups = delta.shape[0] if delta.ndim == 2 else 1
        loss = cls(torch.ones(num_classes), delta_activation="identity", sample_groups=groups)
        with torch.no_grad():
            loss.raw_delta.copy_(torch.as_tensor(delta, dtype=torch.float32))
            loss.offset.copy_(torch.as_tensor(offset, dtype=torch.float32))
            if weight is not None:
                loss.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        return loss

    def class_delta(self) -> torch.Tensor:
        """Delta per class (K), or per sample group and class (G x K)."""
        return DELTA_ACTIVATIONS[self.delta_activation][0](self.raw_delta)[..., self.groups]

    def class_offset(self) -> torch.Tensor:
        return self.offset[..., self.groups]

    def class_weight(self) -> torch.Tensor:
        return self.weight[..., self.groups]

    def hyperparameters(self) -> list[nn.Parameter]:
        """The parameters AutoBalance learns (Delta unless learn_delta=False, w only when learn_weights)."""
        return [p for p in (self.raw_delta, self.offset, self.weight) if p.requires_grad]

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        delta, offset, weight = self.class_delta(), self.class_offset(), self.class_weight()
        if self.needs_groups:  # each sample scored with its group's row
            if groups is None:
                raise ValueError("this parametric loss is per sample group: call it with the group ids")
            if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= delta.shape[0]):
                raise ValueError(f"group ids must lie in [0, {delta.shape[0]}) for this parametric loss")
            groups = groups.long()
            delta, offset, weight = (
                delta[groups],
                offset[groups],
                weight[groups].gather(1, labels.long()[:, None])[:, 0],
            )
        else:
            weight = weight[labels]
        adjusted = delta * _upcast(logits) + offset
        per_sample = F.cross_entropy(adjusted, labels, reduction="none")
        return (weight * per_sample).mean()


class CostSensitiveLoss(LongTailLoss):
    """Gain-matrix loss for a non-decomposable objective (Narasimhan & Menon, NeurIPS 2021).

    With the gain matrix Gm = dpsi/dC at the last validation confusion matrix, Dg = diag(Gm) and
    Mg = Gm Dg^-1: loss = -sum_j Mg_yj log softmax_j(f + tau log pi_train - log diag(Dg)). For min recall this is
    CE(f + tau log pi - log lam, y) with lam <- lam exp(-eta recall) normalised (eta = 0.1), the default options.
    Call ``update(confusion)`` with each new validation confusion matrix; before the first it is logit adjustment.

    Over (class, group) cells (a group objective, ``cells`` and ``group_counts`` given; docs/engine.md, M14), Gm has
    a row per cell: a sample of cell c weighs class j by Gm_cj / d_j, where d_j = sum_c rho_c Gm_cj is the gain of
    class j averaged over its cells at their training shares rho_c; the logits are adjusted by -log d. With one group
    this is the class loss exactly. A sample whose cell the validation set lacks has no gain row: plain adjusted CE.
    """

    citation = "cost_sensitive"
    needs_validation = True

    DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
        "min_recall": {"omega": 0.1, "beta": 1.0},
        # exponentiated-gradient multipliers over cells; at min recall's omega = 0.1 they barely move in a fine-tuning
        # run's few dozen refreshes (docs/groups.md: 0.58 against 0.84 - 0.92 worst-group accuracy at omega = 1)
        "worst_group_accuracy": {"omega": 1.0, "beta": 1.0},
    }

    @classmethod
    def objective_of(cls, options: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """The ``objective`` option (min recall by default) and the objective options the user set."""
        objective = options.get("objective", "min_recall")
        name = objective if isinstance(objective, str) else objective.name
        return name, {k: v for k, v in options.items() if k not in ("objective", "tau")}

    def __init__(
        self,
        class_counts: Counts,
        objective: Objective | str = "min_recall",
        tau: float = 1.0,
        *,
        cells: Any = None,
        group_counts: Any = None,
        **objective_options: Any,
    ) -> None:
        super().__init__()
        counts = counts_tensor(class_counts, "the cost-sensitive loss")
        num_classes = counts.numel()
        if isinstance(objective, str):
            options = {**self.DEFAULT_OPTIONS.get(objective, {}), **objective_options}
            if cells is not None:
                options.update(cell_classes=list(cells.classes), cell_prior=cells.prior(options.get("class_prior")))
            objective = objective_for_training(objective, num_classes, counts.long().tolist(), **options)
        self.objective = objective
        self.tau = float(tau)
        self.needs_groups = cells is not None  # called as loss(logits, labels, groups)
        self.register_buffer("log_prior", torch.log(counts / counts.sum()).float())
        rows = num_classes if cells is None else cells.num_cells
        self.register_buffer("mixing", torch.eye(num_classes)[objective.row_classes].clone())  # Mg, a row per row
        self.register_buffer("log_diagonal", torch.zeros(num_classes))  # log d
        if cells is None:
            return
        if group_counts is None:
            raise ValueError("a cost-sensitive loss over (class, group) cells needs the training group_counts")
        if objective.num_rows != rows:
            raise ValueError(f"the objective has {objective.num_rows} rows, the validation set {rows} cells")
        table = cell_counts_tensor(group_counts, "the cost-sensitive loss")
        self.num_groups = table.shape[1]
        if self.num_groups < cells.num_groups:
            raise ValueError(f"group_counts has {self.num_groups} groups, the validation set {cells.num_groups}")
        trained = table[list(cells.classes), list(cells.groups)]  # training samples of each validation cell
        per_class = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, objective.row_classes, trained)
        self.register_buffer("cell_share", (trained / per_class[objective.row_classes].clamp_min(1.0)).float())
        lookup = torch.full((num_classes * self.num_groups,), -1, dtype=torch.long)
        lookup[torch.tensor(cells.classes) * self.num_groups + torch.tensor(cells.groups)] = torch.arange(rows)
        self.register_buffer("cell_lookup", lookup)  # class * G + group -> row (-1: no validation cell)

    @torch.no_grad()
    def update(self, confusion: torch.Tensor) -> None:
        """New multipliers and gain matrix from a normalised validation confusion matrix (a row per cell when the
        loss is over (class, group) cells)."""
        self.objective.update(confusion)
        gain = self.objective.gradient(confusion.double())
        rows = torch.arange(gain.shape[0])
        if self.needs_groups:  # d_j: class j's gain over its cells, at their training shares
            own = gain[rows, self.objective.row_classes] * self.cell_share.double().cpu()
            diagonal = torch.zeros(gain.shape[1], dtype=gain.dtype).index_add_(0, self.objective.row_classes, own)
        else:
            diagonal = torch.diagonal(gain)
        diagonal = diagonal.clamp_min(1e-12)
        self.mixing.copy_((gain / diagonal.unsqueeze(0)).float())
        self.log_diagonal.copy_(torch.log(diagonal).float())

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        log_p = F.log_softmax(_upcast(logits) + self.tau * self.log_prior - self.log_diagonal, dim=1)
        if not self.needs_groups:
            return -(self.mixing[labels] * log_p).sum(dim=1).mean()
        if groups is None:
            raise ValueError("this cost-sensitive loss is over (class, group) cells: call it with the group ids")
        cells = self.cell_lookup[labels.long() * self.num_groups + groups.long()]
        weights = torch.where(
            (cells >= 0).unsqueeze(1),
            self.mixing[cells.clamp_min(0)],
            F.one_hot(labels.long(), log_p.shape[1]).to(self.mixing),
        )
        return -(weights * log_p).sum(dim=1).mean()

    def get_extra_state(self) -> dict[str, Any]:
        return {"objective": self.objective.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.objective.load_state_dict(state["objective"])


def cell_counts_tensor(group_counts: Any, what: str) -> torch.Tensor:
    """Training samples per (class, group) cell as a K x G float64 tensor; cells may be empty, classes may not."""
    counts = torch.as_tensor(group_counts, dtype=torch.float64)
    if counts.ndim != 2 or not torch.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"{what} needs group_counts: a classes x groups table of non-negative training counts")
    if (counts.sum(dim=1) == 0).any():
        missing = torch.nonzero(counts.sum(dim=1) == 0).flatten().tolist()
        raise ValueError(f"classes {missing[:20]} have no training sample in any group ({what})")
    return counts


class _GroupLoss(LongTailLoss):
    """Cross-entropy weighted per (class, group) cell; cell c = label * G + group."""

    needs_groups = True

    def __init__(self, group_counts: Any) -> None:
        super().__init__()
        counts = cell_counts_tensor(group_counts, type(self).__name__)
        self.num_groups = counts.shape[1]
        self.register_buffer("frequency", (counts / counts.sum()).flatten())  # p_c, the training share of each cell

    def cells(self, labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= self.num_groups):
            bad = groups[(groups < 0) | (groups >= self.num_groups)]
            raise ValueError(f"group ids {sorted(set(bad.tolist()))[:10]} fall outside [0, {self.num_groups})")
        return labels.long() * self.num_groups + groups.long()

    def _check_seen(self, cells: torch.Tensor) -> None:
        unseen = cells[self.frequency[cells] == 0]
        if unseen.numel():
            cell = int(unseen[0])
            raise ValueError(
                f"a batch holds a sample of cell (class {cell // self.num_groups}, group {cell % self.num_groups}), "
                "which group_counts gives no training sample; count the groups on the training set you train on"
            )


class GroupWeightedCrossEntropy(_GroupLoss):
    """Cross-entropy with each sample weighted by the inverse training frequency of its (class, group) cell, scaled
    so the weights average 1 over the training set: every cell weighs the same (group re-weighting)."""

    def __init__(self, group_counts: Any) -> None:
        super().__init__(group_counts)
        present = self.frequency > 0
        weight = torch.zeros_like(self.frequency)
        weight[present] = 1.0 / (int(present.sum()) * self.frequency[present])
        self.register_buffer("cell_weight", weight)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        cells = self.cells(labels, groups)
        self._check_seen(cells)
        per_sample = F.cross_entropy(_upcast(logits), labels, reduction="none")
        return (self.cell_weight.to(per_sample)[cells] * per_sample).mean()


class GroupDRO(_GroupLoss):
    """Group DRO (Sagawa et al., ICLR 2020): minimise sum_c q_c L_c, the cell losses L_c weighted by online weights
    q that exponentiated-gradient ascent moves toward the worst cells, q_c <- q_c exp(step_size (L_c + C / sqrt(n_c))).

    A step's loss is the batch mean of q_c / p_c times each sample's cross-entropy (p_c: the cell's training share),
    an unbiased estimate of sum_c q_c L_c that splits exactly over micro-batches and ranks; q moves after each
    optimiser step from that step's cell losses summed over all its micro-batches and ranks (``end_step``).
    """

    citation = "group_dro"
    steps_with_optimizer = True

    def __init__(self, group_counts: Any, step_size: float = 0.01, adjustment: float = 0.0) -> None:
        super().__init__(group_counts)
        if step_size <= 0:
            raise ValueError(f"step_size (GroupDRO's q learning rate) must be positive, got {step_size}")
        if adjustment < 0:
            raise ValueError(f"adjustment (GroupDRO's C of C / sqrt(n_c)) must be >= 0, got {adjustment}")
        self.step_size = float(step_size)
        present = self.frequency > 0
        counts = torch.as_tensor(group_counts, dtype=torch.float64).flatten()
        self.register_buffer("group_weight", present.double() / int(present.sum()))  # q, uniform over the cells
        self.register_buffer("adjust", float(adjustment) / counts.clamp_min(1.0).sqrt())
        self.register_buffer("loss_sums", torch.zeros_like(self.frequency))
        self.register_buffer("loss_counts", torch.zeros_like(self.frequency))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        cells = self.cells(labels, groups)
        self._check_seen(cells)
        per_sample = F.cross_entropy(_upcast(logits), labels, reduction="none")
        with torch.no_grad():
            self.loss_sums.index_add_(0, cells, per_sample.detach().to(self.loss_sums))
            self.loss_counts.index_add_(0, cells, torch.ones_like(self.loss_counts[cells]))
        weight = (self.group_weight / self.frequency.clamp_min(torch.finfo(torch.float64).tiny))[cells]
        return (weight.to(per_sample) * per_sample).mean()

    @torch.no_grad()
    def end_step(self, reduce: Any = None) -> None:
        """Move q by this step's cell losses (``reduce`` sums a tensor over ranks), then start the next step's sums."""
        sums, counts = self.loss_sums.clone(), self.loss_counts.clone()
        if reduce is not None:
            sums, counts = reduce(sums), reduce(counts)
        seen = counts > 0
        step_losses = torch.where(seen, sums / counts.clamp_min(1.0) + self.adjust, torch.zeros_like(sums))
        weight = self.group_weight * torch.exp(self.step_size * step_losses)
        self.group_weight.copy_(weight / weight.sum())
        self.loss_sums.zero_()
        self.loss_counts.zero_()

    def cell_losses_of_step(self) -> torch.Tensor:
        """This process's mean loss per cell so far in the current step (NaN for cells not seen)."""
        return self.loss_sums / self.loss_counts


LOSSES: dict[str, type[LongTailLoss]] = {
    "ce": CrossEntropy,
    "weighted_ce": WeightedCrossEntropy,
    "focal": FocalLoss,
    "logit_adjusted": LogitAdjustedLoss,
    "balanced_softmax": BalancedSoftmaxLoss,
    "ldam": LDAMLoss,
    "vs": VSLoss,
    "parametric": ParametricCrossEntropy,
    "cost_sensitive": CostSensitiveLoss,
    "group_weighted_ce": GroupWeightedCrossEntropy,
    "group_dro": GroupDRO,
}


def check_loss_options(loss_type: str, options: dict[str, Any]) -> None:
    """A loss name of the zoo and its options (names and types; the cost-sensitive loss also takes its objective's)."""
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid loss types are: {', '.join(LOSSES)}")
    objective = options.get("objective", "min_recall") if loss_type == "cost_sensitive" else None
    also = OBJECTIVES.get(objective) if isinstance(objective, str) else None
    check_options(
        LOSSES[loss_type],
        options,
        f"loss_type {loss_type!r}",
        skip=("class_counts", "group_counts", "cells"),
        also=also,
    )


def build_loss(
    loss_type: str, class_counts: Counts, *, group_counts: Any = None, cells: Any = None, **options: Any
) -> nn.Module:
    """A loss by name; unknown names and options are errors that list the valid ones. Group losses take the
    training ``group_counts`` (classes x groups); the cost-sensitive loss of a group objective also the validation
    set's (class, group) ``cells``."""
    check_loss_options(loss_type, options)
    cls = LOSSES[loss_type]
    params = inspect.signature(cls.__init__).parameters
    if "class_counts" in params:
        options["class_counts"] = class_counts
    if cells is not None:
        options.update(cells=cells, group_counts=group_counts)
    elif "group_counts" in params:
        if group_counts is None and cls.needs_groups:
            raise ValueError(
                f"loss_type {loss_type!r} weighs (class, group) cells, so it needs the group of every training "
                "sample: set group_column='<your group column>' in the config"
            )
        if group_counts is not None:  # also the group-sensitive parametric loss's per-group init
            options["group_counts"] = group_counts
    return cls(**options)


__all__ = [
    "LOSSES",
    "BalancedSoftmaxLoss",
    "CostSensitiveLoss",
    "CrossEntropy",
    "FocalLoss",
    "GroupDRO",
    "GroupWeightedCrossEntropy",
    "LDAMLoss",
    "LogitAdjustedLoss",
    "LongTailLoss",
    "ParametricCrossEntropy",
    "VSLoss",
    "WeightedCrossEntropy",
    "build_loss",
    "class_balanced_weights",
    "inverse_frequency_weights",
    "ldam_margins",
]
