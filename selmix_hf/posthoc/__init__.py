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
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from ..objectives import CONFUSION_CLIP, Objective

RULES = ("offsets", "gain_matrix")
RULE_ATTRIBUTE = "selmix_hf_decision_rule"  # config.json attribute: a gain-matrix rule predictions must apply
POLISH_CANDIDATES = 10  # offsets tried per class and level (coarse, then fine) in a coordinate-search sweep
POLISH_CLASSES = 6  # classes polished per sweep: those the objective's gradient weighs most
POLISH_SWEEPS = 2
POLISH_LEVELS = 3  # coarse-to-fine refinements of each class's candidate offsets
CALIBRATION_STEPS = 100
CALIBRATION_TOLERANCE = 1e-4  # nats: calibration stops once no offset moves more than this
BATCHED_CELLS = 1 << 20  # confusion counts computed in one bincount up to this many cells
FLOAT32_ABOVE = 2_000_000  # logits with more entries are fitted in float32 (argmax and softmax), counts in float64


def calibration_offsets(
    logits: torch.Tensor,
    labels: torch.Tensor,
    prior: torch.Tensor,
    steps: int = CALIBRATION_STEPS,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Offsets b making softmax(logits + b) the posteriors under ``prior``: max of the prior-weighted likelihood.

    Each validation sample of class k weighs pi_k / N_k, so the fit estimates posteriors for the objective's prior,
    not the validation set's class frequencies. The likelihood is concave in b and its maximum is where the
    weighted mean posterior of every class equals pi_k; the fixed point b_k += log(pi_k / mean posterior_k)
    (Saerens et al., 2002) reaches it in a few passes over the logits, fewer from a nearby ``start``. b is
    centred (sum 0).
    """
    num_classes = logits.shape[1]
    counts = torch.bincount(labels, minlength=num_classes).double().clamp_min(1.0)
    weights = (prior.double() / counts)[labels].to(logits.dtype)
    target = torch.log(prior.double())
    offsets = torch.zeros(num_classes, dtype=torch.float64) if start is None else start.double().clone()
    work = torch.empty_like(logits)  # one buffer for all steps: no N x K allocation per step
    for _ in range(steps):
        torch.add(logits, offsets.to(logits.dtype), out=work)
        work.sub_(work.max(dim=1, keepdim=True).values).exp_()
        posterior_mass = (weights / work.sum(dim=1)) @ work  # sum_s w_s softmax(logits_s + b)
        step = target - torch.log(posterior_mass.double().clamp_min(1e-300))
        offsets += step
        if float(step.abs().max()) < CALIBRATION_TOLERANCE:
            break
    return offsets - offsets.mean()


class _Split:
    """The logits, labels and per-sample weights pi_y / N_y one rule is fitted on, with fast confusion matrices."""

    def __init__(self, logits: torch.Tensor, labels: torch.Tensor, objective: Objective) -> None:
        self.logits = logits.float() if logits.numel() > FLOAT32_ABOVE else logits.double()
        self.labels, self.objective, self.num_classes = labels, objective, objective.num_classes
        counts = torch.bincount(labels, minlength=self.num_classes).double()
        self.weights = (objective.class_prior / counts)[labels]
        self.cells = labels * self.num_classes
        self._work = torch.empty_like(self.logits)  # reused by `predict`: no N x K allocation per rule tried

    def confusion(self, predictions: torch.Tensor) -> torch.Tensor:
        """Normalised confusion matrix (rows sum to the objective's prior) of a prediction vector."""
        k = self.num_classes
        return torch.bincount(self.cells + predictions, weights=self.weights, minlength=k * k).view(k, k)

    def confusion_of(self, index: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
        """`confusion` of the samples ``index`` (repeats allowed) predicted as ``predictions``."""
        k = self.num_classes
        cells = self.cells[index] + predictions
        return torch.bincount(cells, weights=self.weights[index], minlength=k * k).view(k, k)

    def confusions(self, predictions: torch.Tensor) -> Iterator[torch.Tensor]:
        """`confusion` of each row of a B x N batch of prediction vectors: one bincount for small K, one per row
        for large K (a B x K x K count buffer costs more than it saves there)."""
        k, batch = self.num_classes, predictions.shape[0]
        if batch * k * k > BATCHED_CELLS:
            yield from (self.confusion(row) for row in predictions)
            return
        cells = (torch.arange(batch)[:, None] * (k * k) + self.cells[None] + predictions).flatten()
        weights = self.weights.repeat(batch)
        yield from torch.bincount(cells, weights=weights, minlength=batch * k * k).view(batch, k, k)

    def score(self, predictions: torch.Tensor) -> float:
        return self.objective.rule_score(self.confusion(predictions))

    def tie_break(self, predictions: torch.Tensor) -> float:
        """The objective's `tie_score`: orders rules of equal score (e.g. min recall's plateaus, where raising one of
        two tied worst classes is the step that makes the next one possible)."""
        return self.objective.tie_score(self.confusion(predictions))

    def predict(self, offsets: torch.Tensor) -> torch.Tensor:
        """argmax(logits + offsets), first index on ties; max(dim).indices is the same and 2x faster on CPU."""
        return torch.add(self.logits, offsets.to(self.logits.dtype), out=self._work).max(dim=1).indices


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

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-class scores whose argmax is the rule's prediction: logits + offsets, or posteriors @ G."""
        logits = torch.as_tensor(logits)
        work = logits.double()
        if self.kind == "gain_matrix":
            posteriors = torch.softmax(work + self.calibration.to(work), dim=-1)
            return (posteriors @ self.gain.to(work)).to(logits.dtype)
        return (work + self.offsets.to(work)).to(logits.dtype)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Class ids the rule predicts for a batch of logits."""
        return self.scores(torch.as_tensor(logits).double()).argmax(dim=-1)

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


class _Polished(NamedTuple):
    """A polished rule with its validation score and tie-break value (what ranks starts, with no re-prediction)."""

    offsets: torch.Tensor
    score: float
    tie: float


def _polish(split: _Split, offsets: torch.Tensor) -> _Polished:
    """Coordinate search on the validation score: the offsets of the classes the objective's gradient weighs most
    (all when K <= POLISH_CLASSES) each moved to the best of a coarse-then-fine set of values; up to
    POLISH_SWEEPS sweeps, stopping after one that changes nothing."""
    best = offsets.clone()
    predictions = split.predict(best)
    best_value = split.score(predictions)
    for _ in range(POLISH_SWEEPS):
        improved = False
        split.objective.update(split.confusion(predictions))
        weight = torch.diagonal(split.objective.gradient(split.confusion(predictions))).abs()
        best_tie = split.tie_break(predictions)
        shifted = split.logits + best.to(split.logits.dtype)  # kept equal to logits + best, column by column
        for k in torch.argsort(weight, descending=True)[:POLISH_CLASSES].tolist():
            shifted[:, k] = -math.inf
            others_value, others = shifted.max(dim=1)
            margins = (others_value - split.logits[:, k]).double()  # class k is predicted when its offset exceeds this
            ordered = torch.sort(margins).values
            low, high = 0.0, 1.0
            centre = float((margins < best[k]).double().mean())  # where the current offset sits among the margins
            for _level in range(POLISH_LEVELS):  # quantiles of the margins over [low, high], then around the best
                grid = torch.linspace(low, high, POLISH_CANDIDATES, dtype=torch.float64)
                candidates = ordered[torch.round(grid * (len(ordered) - 1)).long()] + 1e-6  # just above a margin
                trials = torch.where(margins[None] < candidates[:, None], k, others[None])
                for index, confusion in enumerate(split.confusions(trials)):
                    value = split.objective.rule_score(confusion)
                    if value < best_value - 1e-12:
                        continue
                    tie = split.objective.tie_score(confusion) if value <= best_value + 1e-12 else math.inf
                    if value > best_value + 1e-12 or tie > best_tie + 1e-12:
                        best[k], best_value, predictions = float(candidates[index]), value, trials[index]
                        centre, improved = float(grid[index]), True
                        best_tie = split.tie_break(predictions) if math.isinf(tie) else tie
                step = (high - low) / (POLISH_CANDIDATES - 1)
                if step * len(margins) < 1.0:  # the grid already separates every sample
                    break
                low, high = max(0.0, centre - step), min(1.0, centre + step)
            shifted[:, k] = split.logits[:, k] + best[k].to(split.logits.dtype)
        if not improved:
            break
    return _Polished(best - best.mean(), best_value, split.tie_break(predictions))


def _distinct(*starts: torch.Tensor) -> list[torch.Tensor]:
    """The starts without repeats: the coordinate search is local, so each distinct start may end elsewhere."""
    out: list[torch.Tensor] = []
    for start in starts:
        if not any(torch.equal(start, seen) for seen in out):
            out.append(start)
    return out


def _fit(
    objective: Objective,
    logits: torch.Tensor,
    labels: torch.Tensor,
    kind: str,
    iterations: int,
    calibration_start: torch.Tensor | None = None,
) -> DecisionRule:
    """Fit one rule on one set of logits (no cross-fitting); the objective's multipliers move as it goes."""
    objective = copy.deepcopy(objective)
    split = _Split(logits, labels, objective)
    num_classes = objective.num_classes
    calibration = calibration_offsets(split.logits, labels, objective.class_prior, start=calibration_start)
    if kind == "offsets" and objective.is_linear:  # G is fixed: the plug-in on calibrated posteriors is exact
        offsets = _plug_in_offsets(objective, split.confusion(split.predict(calibration)), calibration)
        return DecisionRule("offsets", offsets, objective.name, calibration=calibration)
    if kind == "offsets":
        zero = torch.zeros(num_classes, dtype=torch.float64)
        best, best_value = zero, split.score(split.predict(zero))
        candidate, seen = calibration, set()
        for _ in range(iterations):
            confusion = split.confusion(split.predict(candidate))
            value = objective.rule_score(confusion)
            if value > best_value + 1e-12:
                best, best_value = candidate, value
            key = tuple(torch.round(candidate, decimals=9).tolist())
            if key in seen:  # the iteration cycles: nothing new to find
                break
            seen.add(key)
            candidate = _plug_in_offsets(objective, confusion, calibration)
        polished = max((_polish(split, start) for start in _distinct(best, calibration, zero)), key=lambda p: p[1:])
        return DecisionRule("offsets", polished.offsets, objective.name, calibration=calibration)
    posteriors = torch.softmax(split.logits + calibration.to(split.logits.dtype), dim=1)
    best_gain, best_value = torch.eye(num_classes, dtype=torch.float64), -math.inf
    gain = best_gain
    for _ in range(iterations):
        predictions = (posteriors @ gain.to(posteriors.dtype)).argmax(dim=1)
        value = split.score(predictions)
        if value > best_value + 1e-12:
            best_gain, best_value = gain, value
        confusion = split.confusion(predictions)
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


def _win_rate(split: _Split, rule: torch.Tensor, plain: torch.Tensor, resamples: int, seed: int) -> float:
    """Share of class-stratified bootstrap resamples of the validation set on which the cross-fitted predictions
    score higher than the plain argmax (ties count half): how sure the cross-fitted gain is not luck."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.argsort(split.labels, stable=True)  # samples grouped by class
    counts = torch.bincount(split.labels, minlength=split.num_classes)
    first = (torch.cumsum(counts, 0) - counts)[split.labels[order]]  # start of each sample's class in ``order``
    size = counts[split.labels[order]]
    wins = 0.0
    for _ in range(resamples):
        # each class resampled with replacement to its own count, so every sample keeps its weight pi_y / N_y
        index = order[first + (torch.rand(len(order), generator=generator) * size).long()]
        with_rule = split.objective.rule_score(split.confusion_of(index, rule[index]))
        difference = with_rule - split.objective.rule_score(split.confusion_of(index, plain[index]))
        wins += 1.0 if difference > 1e-12 else 0.5 if difference >= -1e-12 else 0.0
    return wins / resamples


def fit_decision_rule(
    logits: torch.Tensor,
    labels: torch.Tensor,
    objective: Objective,
    *,
    kind: str = "offsets",
    folds: int = 5,
    iterations: int = 30,
    confidence: float = 0.9,
    resamples: int = 200,
    seed: int = 0,
) -> DecisionRule:
    """Fit a rule for ``objective`` on validation logits and labels, keeping it only when it generalises.

    The rule is fitted ``folds`` times on all folds but one and applied to the held-out fold; the held-out
    predictions give the cross-fitted estimate of the objective, which is compared with the plain argmax on the
    same samples, and on ``resamples`` class-stratified bootstrap resamples of them. The rule fitted on all samples
    is returned when its cross-fitted estimate is higher and it is ahead on at least ``confidence`` of the
    resamples, else the identity rule (``kind="none"``). ``estimates`` holds the cross-fitted, the plain and the
    in-sample values and the bootstrap win rate.
    """
    if kind not in RULES:
        raise ValueError(f"unknown rule kind {kind!r}; valid: {', '.join(RULES)}")
    if not 0.0 <= confidence <= 1.0 or resamples < 1 or folds < 2:
        raise ValueError(
            f"need 0 <= confidence <= 1, resamples >= 1 and folds >= 2; got {confidence}, {resamples}, {folds}"
        )
    logits = torch.as_tensor(logits).detach().cpu()
    logits = logits.float() if logits.numel() > FLOAT32_ABOVE else logits.double()
    labels = torch.as_tensor(labels).detach().long().cpu()
    if logits.ndim != 2 or logits.shape[1] != objective.num_classes or len(labels) != len(logits):
        raise ValueError(
            f"logits must be N x {objective.num_classes} with one label per row, got "
            f"{tuple(logits.shape)} and {len(labels)} labels"
        )
    if not torch.isfinite(logits).all():
        raise ValueError("the validation logits hold NaN or inf; fix the model or the data before fitting a rule")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= objective.num_classes):
        raise ValueError(
            f"labels must lie in [0, {objective.num_classes}), got {int(labels.min())}..{int(labels.max())}"
        )
    counts = torch.bincount(labels, minlength=objective.num_classes)
    missing = torch.nonzero(counts == 0).flatten().tolist()
    if missing:
        raise ValueError(
            f"classes {missing} have no validation sample, so no rule can be judged on them: use a validation "
            "split with every class (selmix_hf.data.balanced_split) before fitting a rule"
        )
    if int(counts.min()) < folds:
        raise ValueError(
            f"cross-fitting over {folds} folds needs at least {folds} validation samples of every class; "
            f"the smallest class has {int(counts.min())}: lower folds= or add validation samples"
        )
    final = _fit(objective, logits, labels, kind, iterations)
    start = final.calibration if final.calibration is not None else None
    fold = _folds(labels, folds, seed)
    held_out = torch.empty_like(labels)
    for f in range(folds):
        inside = fold != f
        rule = _fit(objective, logits[inside], labels[inside], kind, iterations, start)  # a warm start only
        held_out[~inside] = rule.predict(logits[~inside])
    whole = _Split(logits, labels, objective)
    argmax = logits.argmax(dim=1)
    plain, crossed = whole.score(argmax), whole.score(held_out)
    final.estimates = {
        "cross_fitted": crossed,
        "without_rule": plain,
        "in_sample": whole.score(final.predict(logits)),
        "win_rate": _win_rate(whole, held_out, argmax, resamples, seed) if crossed > plain else 0.0,
    }
    if crossed <= plain or final.estimates["win_rate"] < confidence:
        zero = torch.zeros(objective.num_classes, dtype=torch.float64)
        return DecisionRule("none", zero, objective.name, estimates=final.estimates)
    return final


def decision_rule_of(model_or_config: Any) -> DecisionRule | None:
    """The gain-matrix rule stored in a model's ``config.json`` by a trainer's post-hoc step, or None (no rule, or
    offsets, which are folded into the classifier bias and need nothing at prediction time)."""
    config = getattr(model_or_config, "config", model_or_config)
    values = getattr(config, RULE_ATTRIBUTE, None)
    return None if not values else DecisionRule.from_dict(values)


def predict_with_rule(model_or_config: Any, logits: torch.Tensor) -> torch.Tensor:
    """Class ids of a model loaded with stock ``from_pretrained``: its stored gain-matrix rule applied to its
    logits, or argmax(logits) when it has none (offsets are already in the logits)."""
    rule = decision_rule_of(model_or_config)
    logits = torch.as_tensor(logits)
    return logits.argmax(dim=-1) if rule is None else rule.predict(logits)


def fold_offsets(model: torch.nn.Module, offsets: torch.Tensor, *, root: torch.nn.Module | None = None) -> None:
    """Add per-class offsets to the classifier head's bias, so the saved model predicts argmax(logits + offsets).

    ``root`` is the model as the sharding engine wrapped it (FSDP), when it is; every rank must call then.
    """
    from ..features import find_head, num_labels_of
    from ..sharding import add_to_head_bias

    _, head = find_head(model, num_labels_of(model))
    add_to_head_bias(head, root if root is not None else model, offsets)


__all__ = [
    "RULES",
    "RULE_ATTRIBUTE",
    "DecisionRule",
    "calibration_offsets",
    "decision_rule_of",
    "fit_decision_rule",
    "fold_offsets",
    "predict_with_rule",
]
