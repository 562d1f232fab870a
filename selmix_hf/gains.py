"""Gain matrix G_ij (first-order change of the objective from an (i, j) feature mixup) and the pair distribution.

The formulas are written out in docs/engine.md, "The mathematics": M7 to M11. The rows i, j are the classes, or,
for a group objective, the (class, group) cells (docs/engine.md, M13): then the prototypes are the cells' mean
features, the confusion matrix has one row per cell, and a mixup keeps the class of its first cell.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .metrics import check_labels, check_prior
from .objectives import CONFUSION_CLIP, Objective

ESTIMATORS = ("selmix", "exact")
_CHUNK_ELEMENTS = 1 << 24  # rows x K temporaries of the pair reduction stay near 16M elements


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean feature of each class (K x d); every class must be present."""
    _check_features(features, "features")
    labels = labels.reshape(-1)
    if labels.numel() != features.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows but {labels.numel()} labels")
    check_labels(labels, num_classes)
    counts = torch.bincount(labels.long(), minlength=num_classes)
    _check_all_present(counts)
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels.long(), features)
    return sums / counts.to(features.dtype).unsqueeze(1)


def equal_norm_prototypes(prototypes: torch.Tensor) -> torch.Tensor:
    """Prototypes rescaled to their mean norm: the Gram z_i . z_q then weighs classes by direction, not norm."""
    _check_features(prototypes, "prototypes")
    norms = prototypes.norm(dim=1, keepdim=True)
    return prototypes / norms.clamp_min(torch.finfo(prototypes.dtype).tiny) * norms.mean()


def logit_gradient(objective: Objective, confusion: torch.Tensor, class_prior: torch.Tensor) -> torch.Tensor:
    """D[q, l] = dpsi/dA_ql through C_q. = pi_q softmax(A_q), at the clipped empirical C (docs/engine.md, M7)."""
    clipped = confusion.clamp_min(CONFUSION_CLIP)
    grad = objective.gradient(clipped)
    row_term = (clipped * grad).sum(dim=1, keepdim=True) / class_prior.unsqueeze(1)
    return clipped * (grad - row_term)


class _Head(NamedTuple):
    """The checked inputs both estimators share: head, row prior, mean mixing weight, prototype logits and the
    class of each row (the identity for classes, the cell's class for (class, group) cells)."""

    prototypes: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    prior: torch.Tensor
    lam_bar: float
    logits: torch.Tensor
    row_classes: torch.Tensor


def _checked_head(
    objective: Objective,
    prototypes: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mix_lambda_min: float,
    class_prior: torch.Tensor | None,
) -> _Head:
    """Validate the arguments common to both estimators and bring them to the dtype and device of the prototypes."""
    if not 0.0 <= mix_lambda_min <= 1.0:
        raise ValueError(f"mix_lambda_min must lie in [0, 1], got {mix_lambda_min}")
    num_classes, num_rows = objective.num_classes, objective.num_rows
    _check_features(prototypes, "prototypes")
    dtype, device = prototypes.dtype, prototypes.device
    if prototypes.shape[0] != num_rows:
        rows = "(class, group) cells" if objective.needs_groups else "classes"
        raise ValueError(f"prototypes has {prototypes.shape[0]} rows, the objective has {num_rows} {rows}")
    if tuple(weight.shape) != (num_classes, prototypes.shape[1]):
        raise ValueError(
            f"head weight has shape {tuple(weight.shape)}, expected {(num_classes, prototypes.shape[1])} (K x d)"
        )
    weight = weight.detach().to(dtype=dtype, device=device)
    _check_features(weight, "weight")
    if bias is None:
        bias = torch.zeros(num_classes, dtype=dtype, device=device)
    elif tuple(bias.shape) != (num_classes,):
        raise ValueError(f"head bias has shape {tuple(bias.shape)}, expected ({num_classes},)")
    bias = bias.detach().to(dtype=dtype, device=device)
    prior = objective.class_prior if class_prior is None else torch.as_tensor(class_prior, dtype=torch.float64)
    prior = check_prior(prior.detach().cpu().to(torch.float64), num_classes)
    if objective.needs_groups:  # the cell prior, which the objective built from its class prior
        if not torch.allclose(prior, objective.class_prior):
            raise ValueError("class_prior differs from the group objective's; set the prior in one place")
        prior = objective.row_prior
    prototypes = prototypes.detach()
    logits = torch.addmm(bias, prototypes, weight.T)  # A_q = W z_q + b
    row_classes = objective.row_classes.to(device)
    lam_bar = (mix_lambda_min + 1.0) / 2.0
    return _Head(prototypes, weight, bias, prior.to(dtype=dtype, device=device), lam_bar, logits, row_classes)


def selmix_gain_matrix(
    objective: Objective,
    confusion: torch.Tensor,
    prototypes: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    mix_lambda_min: float = 0.6,
    class_prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """The published K x K gain estimator, from the normalised validation ``confusion`` and the class ``prototypes``.

    ``weight`` (K x d) and ``bias`` (K, or None) are the classifier head; the bias enters the prototype logits only.
    Formulas: docs/engine.md, M8 (Gain matrix: the published estimator); the computation runs in the dtype and on
    the device of ``prototypes``.
    """
    head = _checked_head(objective, prototypes, weight, bias, mix_lambda_min, class_prior)
    if confusion is None:
        raise ValueError("estimator='selmix' needs the normalised validation confusion matrix")
    num_rows = objective.num_rows
    confusion = _checked_confusion(confusion, num_rows, objective.num_classes).to(head.prototypes)
    # H = S D with S = Z Z^T, the prototype Gram; as Z (Z^T D) it costs O(K^2 d) instead of O(K^3)
    value = head.prototypes @ (head.prototypes.T @ logit_gradient(objective, confusion, head.prior))
    gains = _own_class(value, head.row_classes).unsqueeze(1).expand(-1, num_rows).clone()
    return gains - _mixed_expectation(head.logits, value, head.lam_bar)


def _own_class(value: torch.Tensor, row_classes: torch.Tensor) -> torch.Tensor:
    """value[r, k(r)]: each row's entry at its own class (the diagonal when the rows are the classes)."""
    return value[torch.arange(value.shape[0], device=value.device), row_classes]


def exact_gain_matrix(
    objective: Objective,
    prototypes: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    mix_lambda_min: float = 0.6,
    class_prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-sample first-order K x K gain with the bias, from the validation ``features`` (N x d) and ``labels``.

    It builds its own soft confusion matrix from the per-sample softmax, so it needs no confusion matrix.
    Formulas: docs/engine.md, M9 (Gain matrix: the exact estimator); the computation runs in the dtype and on the
    device of ``prototypes``.
    """
    head = _checked_head(objective, prototypes, weight, bias, mix_lambda_min, class_prior)
    if features is None or labels is None:
        raise ValueError("estimator='exact' needs the per-sample validation features=(N x d) and labels=(N,)")
    value = _exact_sensitivity(objective, features, labels, head.prototypes, head.weight, head.bias, head.prior)  # Q
    # a mixup of rows (a, b) keeps a's class: lam Q[a, k(a)] + (1 - lam) Q[b, k(a)]
    own = _own_class(value, head.row_classes).unsqueeze(1)
    gains = head.lam_bar * own + (1.0 - head.lam_bar) * value[:, head.row_classes].T
    return gains - _mixed_expectation(head.logits, value, head.lam_bar)


def gain_matrix(
    objective: Objective,
    confusion: torch.Tensor | None,
    prototypes: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    mix_lambda_min: float = 0.6,
    estimator: str = "selmix",
    class_prior: torch.Tensor | None = None,
    features: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """K x K gain matrix G, dispatched on ``estimator``: G_ij estimates the objective's change from (i, j) mixups.

    ``estimator="selmix"`` calls `selmix_gain_matrix` (uses ``confusion``); ``estimator="exact"`` calls
    `exact_gain_matrix` (uses ``features`` and ``labels``, ignores ``confusion``: pass None).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown gain estimator {estimator!r}; valid estimators are: {', '.join(ESTIMATORS)}")
    if estimator == "selmix":
        return selmix_gain_matrix(
            objective, confusion, prototypes, weight, bias, mix_lambda_min=mix_lambda_min, class_prior=class_prior
        )
    return exact_gain_matrix(
        objective, prototypes, weight, bias, features, labels, mix_lambda_min=mix_lambda_min, class_prior=class_prior
    )


def _mixed_expectation(logits: torch.Tensor, value: torch.Tensor, lam_bar: float) -> torch.Tensor:
    """E_ij = p_ij . (lam_bar V_i. + (1 - lam_bar) V_j.), p_ij = softmax(lam_bar A_i + (1 - lam_bar) A_j) (M10).

    The pair softmax factorises, p_ij,l = a_il c_jl / (a c^T)_ij, so each reduction is a matrix product;
    rows whose denominators underflow are redone in float64 and, failing that, in log space.
    """
    num_classes = logits.shape[0]
    shifted, c_t, c_value_t = _factors(logits, value, lam_bar)
    out = value.new_empty(num_classes, num_classes)
    rows = max(1, min(num_classes, _CHUNK_ELEMENTS // num_classes))
    for start in range(0, num_classes, rows):
        sl = slice(start, start + rows)
        out[sl], bad = _factorised_rows(shifted[sl], value[sl], c_t, c_value_t, lam_bar)
        if bad.any():
            idx = torch.nonzero(bad).flatten() + start
            out[idx] = _mixed_expectation_rows_stable(logits, value, lam_bar, idx)
    return out


def _factors(logits: torch.Tensor, value: torch.Tensor, lam_bar: float) -> tuple[torch.Tensor, ...]:
    """Row-max-shifted logits and the column factors c^T, (c * V)^T of the pair softmax."""
    shifted = logits - logits.max(dim=1, keepdim=True).values
    c = torch.exp((1.0 - lam_bar) * shifted)
    return shifted, c.T.contiguous(), (c * value).T.contiguous()


def _factorised_rows(
    shifted_rows: torch.Tensor, value_rows: torch.Tensor, c_t: torch.Tensor, c_value_t: torch.Tensor, lam_bar: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """E for a block of rows i as three matrix products, and which rows under- or overflowed."""
    a = torch.exp(lam_bar * shifted_rows)
    denominator = a @ c_t
    numerator = torch.addmm(a @ c_value_t, a * value_rows, c_t, beta=1.0 - lam_bar, alpha=lam_bar)
    out = numerator / denominator
    tiny = torch.finfo(out.dtype).tiny ** 0.5
    return out, (denominator < tiny).any(dim=1) | ~torch.isfinite(out).all(dim=1)


def _mixed_expectation_rows_stable(
    logits: torch.Tensor, value: torch.Tensor, lam_bar: float, rows: torch.Tensor
) -> torch.Tensor:
    """The same reduction for the given rows, first factorised in float64, then per row in log space."""
    wide_logits, wide_value = logits.double(), value.double()
    shifted, c_t, c_value_t = _factors(wide_logits, wide_value, lam_bar)
    result, still_bad = _factorised_rows(shifted[rows], wide_value[rows], c_t, c_value_t, lam_bar)
    for k in torch.nonzero(still_bad).flatten().tolist():
        i = int(rows[k])
        pair_logits = lam_bar * wide_logits[i].unsqueeze(0) + (1.0 - lam_bar) * wide_logits  # row j: pair (i, j)
        p = torch.softmax(pair_logits, dim=1)
        result[k] = lam_bar * (p @ wide_value[i]) + (1.0 - lam_bar) * (p * wide_value).sum(dim=1)
    return result.to(logits.dtype)


def _exact_sensitivity(
    objective: Objective,
    features: torch.Tensor,
    labels: torch.Tensor,
    prototypes: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    prior: torch.Tensor,
) -> torch.Tensor:
    """Q = Zbar_proto Zbar^T Gamma, Gamma_n = dpsi/dA_n on the per-sample soft confusion (bias included).

    ``labels`` are the samples' rows: their classes, or their (class, group) cells for a group objective.
    """
    num_classes, num_rows = objective.num_classes, objective.num_rows
    dtype, device = prototypes.dtype, prototypes.device
    _check_features(features, "features")
    if features.shape[1] != prototypes.shape[1]:
        raise ValueError(f"features have dimension {features.shape[1]}, prototypes {prototypes.shape[1]}")
    features = features.detach().to(dtype=dtype, device=device)
    labels = labels.reshape(-1).to(device=device)
    if labels.numel() != features.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows but {labels.numel()} labels")
    check_labels(labels, num_rows, "cells of the samples" if objective.needs_groups else "labels")
    labels = labels.long()
    counts = torch.bincount(labels, minlength=num_rows)
    _check_all_present(counts)
    sample_scale = (prior / counts.to(dtype))[labels]  # pi_k / N_k for each sample
    rows = max(1, _CHUNK_ELEMENTS // max(num_classes, features.shape[1]))

    soft_confusion = torch.zeros(num_rows, num_classes, dtype=dtype, device=device)
    for start in range(0, features.shape[0], rows):
        sl = slice(start, start + rows)
        probs = torch.softmax(torch.addmm(bias, features[sl], weight.T), dim=1)
        soft_confusion.index_add_(0, labels[sl], probs * sample_scale[sl].unsqueeze(1))
    grad = objective.gradient(soft_confusion)

    sensitivity = torch.zeros(features.shape[1] + 1, num_classes, dtype=dtype, device=device)  # M = Zbar^T Gamma
    for start in range(0, features.shape[0], rows):
        sl = slice(start, start + rows)
        probs = torch.softmax(torch.addmm(bias, features[sl], weight.T), dim=1)
        grad_rows = grad[labels[sl]]
        gamma = sample_scale[sl].unsqueeze(1) * probs * (grad_rows - (probs * grad_rows).sum(dim=1, keepdim=True))
        sensitivity[:-1] += features[sl].T @ gamma
        sensitivity[-1] += gamma.sum(dim=0)
    return prototypes @ sensitivity[:-1] + sensitivity[-1]


def gain_matrix_reference(
    objective: Objective,
    confusion: torch.Tensor,
    prototypes: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    mix_lambda_min: float = 0.6,
    class_prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """The published formula evaluated literally through the K^4 tensor LCR[i, j, q, l]: for checks, small K only.

    With (class, group) cells, i, j and q range over the cells and l over the classes; the kept class of (i, j) is
    i's (M13).
    """
    num_classes = objective.num_classes
    dtype = prototypes.dtype
    prior = objective.class_prior if class_prior is None else torch.as_tensor(class_prior)
    prior = (objective.row_prior if objective.needs_groups else prior).to(dtype)
    bias = torch.zeros(num_classes, dtype=dtype) if bias is None else bias.to(dtype)
    lam_bar = (mix_lambda_min + 1.0) / 2.0
    d_matrix = logit_gradient(objective, confusion.to(dtype), prior)
    logits = prototypes @ weight.T + bias
    mixed = lam_bar * prototypes[:, None, :] + (1.0 - lam_bar) * prototypes[None, :, :]  # z~_ij
    p = torch.softmax(lam_bar * logits[:, None, :] + (1.0 - lam_bar) * logits[None, :, :], dim=-1)  # p_ij,l
    gram = prototypes @ prototypes.T  # z_i . z_q
    mixed_dot = torch.einsum("ijd,qd->ijq", mixed, prototypes)  # z~_ij . z_q
    own = torch.nn.functional.one_hot(objective.row_classes, num_classes).to(dtype)  # 1[l = k(i)]
    lcr = own[:, None, None, :] * gram[:, None, :, None] - p[:, :, None, :] * mixed_dot[:, :, :, None]
    return torch.einsum("ijql,ql->ij", lcr, d_matrix)


def sampling_distribution(
    gains: torch.Tensor, temperature: float = 0.1, epsilon: float = 1e-8, scale_free: bool = False
) -> torch.Tensor:
    """P = softmax(G / T) over all K^2 pairs, kept only where G > 0, plus epsilon everywhere, normalised (M11).

    ``scale_free=True`` divides G by max |G| first, so T is relative to the largest gain rather than in the units
    of G (which grow with the squared norm of the pooled embeddings).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if gains.ndim != 2 or gains.shape[0] != gains.shape[1]:
        raise ValueError(f"gains must be a square K x K matrix, got shape {tuple(gains.shape)}")
    if not torch.isfinite(gains).all():
        raise ValueError("gain matrix contains NaN or inf; check the validation features and the head weights")
    scale = float(gains.abs().max()) if scale_free else 1.0
    probs = torch.softmax((gains / (temperature * (scale or 1.0))).reshape(-1), dim=0).reshape(gains.shape)
    probs = probs * (gains > 0) + epsilon
    return probs / probs.sum()


def _check_features(tensor: torch.Tensor, what: str) -> None:
    if tensor.ndim != 2:
        raise ValueError(f"{what} must be a 2-D tensor, got shape {tuple(tensor.shape)}")
    if not tensor.dtype.is_floating_point:
        raise ValueError(f"{what} must be floating point, got {tensor.dtype}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what} contain NaN or inf")


def _checked_confusion(confusion: torch.Tensor, num_rows: int, num_classes: int) -> torch.Tensor:
    if tuple(confusion.shape) != (num_rows, num_classes):
        raise ValueError(f"confusion has shape {tuple(confusion.shape)}, expected ({num_rows}, {num_classes})")
    if not torch.isfinite(confusion).all():
        raise ValueError("confusion matrix contains NaN or inf")
    if (confusion < 0).any():
        raise ValueError("confusion matrix has negative entries; pass the normalised confusion, not logits")
    return confusion.detach()


def _check_all_present(counts: torch.Tensor) -> None:
    missing = torch.nonzero(counts == 0).flatten().tolist()
    if missing:
        raise ValueError(
            f"classes {missing[:20]} have no validation sample; the gains need every class's prototype. "
            "Use a validation split with every class (selmix_hf.data.balanced_split)."
        )
