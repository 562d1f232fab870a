"""Post-hoc decision rules for a trained classifier: per-class logit offsets or a gain-matrix rule, fitted on
validation logits for any objective of the registry, with a cross-fitted estimate that guards against overfitting.

Plug-in method (Narasimhan et al., 2014-2015; Narasimhan & Menon, 2021): for a linear objective
psi(C) = sum_ij G_ij C_ij the Bayes-optimal rule predicts argmax_j sum_i G_ij eta_i(x), with eta the class
posteriors under the objective's prior. The logits are first calibrated to that prior by per-class offsets
(maximum likelihood, `calibration_offsets`); a diagonal G then gives offsets log G_jj. For the other objectives the
rule is re-derived from the gradient G = dpsi/dC at the current rule's confusion matrix, with the objective's own
multiplier updates (min recall, coverage constraints), keeping the best iterate; offsets are then polished by
coordinate search on the validation objective. docs/posthoc.md has the details.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .metrics import confusion_counts, normalized_confusion
from .objectives import CONFUSION_CLIP, Objective

RULES = ("offsets", "gain_matrix")
POLISH_CANDIDATES = 64  # offsets tried per class in one coordinate-search sweep


def calibration_offsets(logits: torch.Tensor, labels: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Offsets b making softmax(logits + b) the posteriors under ``prior``: max of the prior-weighted likelihood.

    Each validation sample of class k weighs pi_k / N_k, so the fit estimates posteriors for the objective's prior,
    not the validation set's class frequencies. The problem is convex in b; b is centred (sum 0).
    """
    logits = logits.detach().double()
    num_classes = logits.shape[1]
    counts = torch.bincount(labels, minlength=num_classes).double().clamp_min(1.0)
    weights = (prior.double() / counts)[labels]
    offsets = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([offsets], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = -(weights * torch.log_softmax(logits + offsets, dim=1)[torch.arange(len(labels)), labels]).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    result = offsets.detach()
    return result - result.mean()


def _confusion(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int, prior: torch.Tensor) -> torch.Tensor:
    return normalized_confusion(confusion_counts(labels, predictions, num_classes), prior)


def _value(objective: Objective, labels: torch.Tensor, predictions: torch.Tensor) -> float:
    return float(objective.value(_confusion(labels, predictions, objective.num_classes, objective.class_prior)))


@dataclass
class DecisionRule:
    """A decision rule on top of a classifier's logits: ``offsets`` (K) or a ``gain`` matrix (K x K) over
    posteriors softmax(logits + calibration); ``kind="none"`` keeps argmax(logits)."""

    kind: str
    offsets: torch.Tensor
    objective: str
    calibration: torch.Tensor | None = None
    gain: torch.Tensor | None = None
    estimates: dict[str, float] = field(default_factory=dict)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Class ids the rule predicts for a batch of logits."""
        logits = torch.as_tensor(logits).double()
        if self.kind == "gain_matrix":
            posteriors = torch.softmax(logits + self.calibration.to(logits), dim=1)
            return (posteriors @ self.gain.to(logits)).argmax(dim=1)
        return (logits + self.offsets.to(logits)).argmax(dim=1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (lists and floats), e.g. for ``config.json``."""
        return {
            "kind": self.kind,
            "objective": self.objective,
            "offsets": self.offsets.tolist(),
            "calibration": None if self.calibration is None else self.calibration.tolist(),
            "gain": None if self.gain is None else self.gain.tolist(),
            "estimates": dict(self.estimates),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DecisionRule:
        """The rule back from `to_dict`; non-finite values are refused."""
        tensors = {
            key: None if values.get(key) is None else torch.tensor(values[key], dtype=torch.float64)
            for key in ("offsets", "calibration", "gain")
        }
        for key, tensor in tensors.items():
            if tensor is not None and not torch.isfinite(tensor).all():
                raise ValueError(f"decision rule: {key} holds NaN or inf")
        return cls(
            values["kind"],
            tensors["offsets"],
            values["objective"],
            tensors["calibration"],
            tensors["gain"],
            dict(values.get("estimates") or {}),
        )


def _plug_in_offsets(objective: Objective, confusion: torch.Tensor, calibration: torch.Tensor) -> torch.Tensor:
    """Offsets of the plug-in rule for the linearisation of psi at ``confusion``: calibration + log diag(G)."""
    objective.update(confusion)
    diagonal = torch.diagonal(objective.gradient(confusion)).clamp_min(CONFUSION_CLIP)
    offsets = calibration + torch.log(diagonal)
    return offsets - offsets.mean()


def _polish(
    objective: Objective, logits: torch.Tensor, labels: torch.Tensor, offsets: torch.Tensor, sweeps: int = 2
) -> torch.Tensor:
    """Coordinate search: each class's offset moved to the best of a few candidate values (the validation objective)."""
    best, best_value = offsets.clone(), _value(objective, labels, (logits + offsets).argmax(dim=1))
    quantiles = torch.linspace(0.0, 1.0, POLISH_CANDIDATES, dtype=torch.float64)
    for _ in range(sweeps):
        for k in range(logits.shape[1]):
            shifted = logits + best
            others = shifted.clone()
            others[:, k] = -math.inf
            margins = others.max(dim=1).values - logits[:, k]  # class k is predicted when its offset exceeds this
            for candidate in torch.quantile(margins, quantiles) + 1e-9:
                trial = best.clone()
                trial[k] = candidate
                value = _value(objective, labels, (logits + trial).argmax(dim=1))
                if value > best_value + 1e-12:
                    best, best_value = trial, value
    return best - best.mean()


def _fit(objective: Objective, logits: torch.Tensor, labels: torch.Tensor, kind: str, iterations: int) -> DecisionRule:
    """Fit one rule on one set of logits (no cross-fitting); the objective's multipliers move as it goes."""
    objective = copy.deepcopy(objective)
    prior, num_classes = objective.class_prior, objective.num_classes
    calibration = calibration_offsets(logits, labels, prior)
    if kind == "offsets" and objective.is_linear:  # G is fixed: the plug-in on calibrated posteriors is exact
        predictions = (logits + calibration).argmax(dim=1)
        offsets = _plug_in_offsets(objective, _confusion(labels, predictions, num_classes, prior), calibration)
        return DecisionRule("offsets", offsets, objective.name)
    if kind == "offsets":
        offsets = torch.zeros(num_classes, dtype=torch.float64)
        best, best_value = offsets, _value(objective, labels, logits.argmax(dim=1))
        candidate = calibration
        for _ in range(iterations):
            predictions = (logits + candidate).argmax(dim=1)
            value = _value(objective, labels, predictions)
            if value > best_value + 1e-12:
                best, best_value = candidate, value
            candidate = _plug_in_offsets(objective, _confusion(labels, predictions, num_classes, prior), calibration)
        return DecisionRule("offsets", _polish(objective, logits, labels, best), objective.name)
    posteriors = torch.softmax(logits + calibration, dim=1)
    best_gain, best_value = torch.eye(num_classes, dtype=torch.float64), -math.inf
    gain = torch.eye(num_classes, dtype=torch.float64)
    for _ in range(iterations):
        predictions = (posteriors @ gain).argmax(dim=1)
        value = _value(objective, labels, predictions)
        if value > best_value + 1e-12:
            best_gain, best_value = gain, value
        confusion = _confusion(labels, predictions, num_classes, prior)
        objective.update(confusion)
        gain = objective.gradient(confusion)  # psi ~ sum_ij G_ij C_ij = E[sum_i G_i,pred eta_i(x)]: argmax_j (eta G)_j
    zero = torch.zeros(num_classes, dtype=torch.float64)
    return DecisionRule("gain_matrix", zero, objective.name, calibration=calibration, gain=best_gain)


def _folds(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """A fold id per sample, stratified by class (each class spread evenly over the folds)."""
    generator = torch.Generator().manual_seed(seed)
    fold = torch.empty_like(labels)
    for k in labels.unique().tolist():
        members = torch.nonzero(labels == k).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        fold[members] = torch.arange(len(members)) % folds
    return fold


def fit_decision_rule(
    logits: torch.Tensor,
    labels: torch.Tensor,
    objective: Objective,
    *,
    kind: str = "offsets",
    folds: int = 5,
    iterations: int = 30,
    seed: int = 0,
) -> DecisionRule:
    """Fit a rule for ``objective`` on validation logits and labels, keeping it only when it generalises.

    The rule is fitted ``folds`` times on all folds but one and applied to the held-out fold; the held-out
    predictions give the cross-fitted estimate of the objective, which is compared with the plain argmax on the
    same samples. The rule fitted on all samples is returned when its cross-fitted estimate is higher, else the
    identity rule (``kind="none"``). ``estimates`` holds the cross-fitted, the plain and the in-sample values.
    """
    if kind not in RULES:
        raise ValueError(f"unknown rule kind {kind!r}; valid: {', '.join(RULES)}")
    logits = torch.as_tensor(logits).detach().double().cpu()
    labels = torch.as_tensor(labels).detach().long().cpu()
    if logits.ndim != 2 or logits.shape[1] != objective.num_classes or len(labels) != len(logits):
        raise ValueError(
            f"logits must be N x {objective.num_classes} with one label per row, got "
            f"{tuple(logits.shape)} and {len(labels)} labels"
        )
    if not torch.isfinite(logits).all():
        raise ValueError("the validation logits hold NaN or inf; fix the model or the data before fitting a rule")
    counts = torch.bincount(labels, minlength=objective.num_classes)
    if int(counts.min()) < folds:
        raise ValueError(
            f"cross-fitting over {folds} folds needs at least {folds} validation samples of every class; "
            f"the smallest class has {int(counts.min())}: lower folds= or add validation samples"
        )
    fold = _folds(labels, folds, seed)
    held_out = torch.empty_like(labels)
    for f in range(folds):
        inside = fold != f
        rule = _fit(objective, logits[inside], labels[inside], kind, iterations)
        held_out[~inside] = rule.predict(logits[~inside])
    final = _fit(objective, logits, labels, kind, iterations)
    plain = _value(objective, labels, logits.argmax(dim=1))
    crossed = _value(objective, labels, held_out)
    final.estimates = {
        "cross_fitted": crossed,
        "without_rule": plain,
        "in_sample": _value(objective, labels, final.predict(logits)),
    }
    if crossed <= plain:
        zero = torch.zeros(objective.num_classes, dtype=torch.float64)
        return DecisionRule("none", zero, objective.name, estimates=final.estimates)
    return final


def fold_offsets(model: torch.nn.Module, offsets: torch.Tensor) -> None:
    """Add per-class offsets to the classifier head's bias, so the saved model predicts argmax(logits + offsets)."""
    from .features import find_head, num_labels_of

    _, head = find_head(model, num_labels_of(model))
    if head.bias is None:
        raise ValueError("the classifier head has no bias to fold the offsets into; apply DecisionRule.predict instead")
    with torch.no_grad():
        head.bias.add_(torch.as_tensor(offsets, dtype=head.bias.dtype, device=head.bias.device))


__all__ = ["RULES", "DecisionRule", "calibration_offsets", "fit_decision_rule", "fold_offsets"]
