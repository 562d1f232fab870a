"""AutoBalance: learn the parametric loss on validation data by bilevel optimisation (Li et al., NeurIPS 2021).

Lower level: the network trains on the train split with `ParametricCrossEntropy(theta)`. Upper level, every
`hyper_update_steps` steps: the hypergradient of the validation loss with respect to theta, by the implicit
function theorem, d L_val / d theta = dL_val/dtheta - (d^2 L_train / dtheta dw) H^-1 grad_w L_val, with H^-1 from
a Neumann series (or a one-step unrolled approximation), then one step of the hyper-optimiser.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from . import _compat
from .cards import optimisation_settings
from .config import parse_options
from .features import PooledFeatures, find_head, unwrap
from .losses import ParametricCrossEntropy, class_balanced_weights
from .longtail_trainer import LongTailConfig, LongTailTrainer
from .metrics import confusion_counts, normalized_confusion
from .objectives import OBJECTIVES, objective_for_training
from .sampling import rank_seed
from .validation import PeriodicRefresh, check_every_class, gathered_validation_pass, pick_validation_set, require_whole_head

HYPERGRADIENTS = ("neumann", "unrolled")
UPPER_OBJECTIVES = ("balanced_ce", *sorted(OBJECTIVES))


def hypergradient(
    weights: list[torch.Tensor],
    hyperparameters: list[torch.Tensor],
    train_loss: Callable[[], torch.Tensor],
    validation_loss: Callable[[], torch.Tensor],
    *,
    method: str = "neumann",
    neumann_steps: int = 5,
    neumann_lr: float = 1.0,
    unroll_lr: float = 1.0,
) -> list[torch.Tensor]:
    """d L_val / d theta at the current weights, treating them as the minimiser of L_train(., theta).

    ``method="neumann"``: H^-1 v ~ neumann_lr * sum_{j=0..J} (I - neumann_lr H)^j v (J = neumann_steps).
    ``method="unrolled"``: the effect of one SGD step of size unroll_lr, H^-1 v ~ unroll_lr * v.
    """
    if method not in HYPERGRADIENTS:
        raise ValueError(f"unknown hypergradient method {method!r}; valid: {', '.join(HYPERGRADIENTS)}")
    val = validation_loss()
    val_grads = torch.autograd.grad(val, weights + hyperparameters, allow_unused=True)
    v1 = _zeros_for_none(val_grads[: len(weights)], weights)
    direct = _zeros_for_none(val_grads[len(weights):], hyperparameters)
    train_grads = torch.autograd.grad(train_loss(), weights, create_graph=True)
    if method == "neumann":
        v, total = list(v1), [t.clone() for t in v1]
        for _ in range(neumann_steps):
            hv = torch.autograd.grad(train_grads, weights, grad_outputs=v, retain_graph=True, allow_unused=True)
            v = [vi - neumann_lr * hi for vi, hi in zip(v, _zeros_for_none(hv, weights))]
            total = [ti + vi for ti, vi in zip(total, v)]
        inverse_hvp = [neumann_lr * t for t in total]
    else:
        inverse_hvp = [unroll_lr * t for t in v1]
    mixed = torch.autograd.grad(train_grads, hyperparameters, grad_outputs=inverse_hvp, allow_unused=True)
    return [d - m for d, m in zip(direct, _zeros_for_none(mixed, hyperparameters))]


def _zeros_for_none(grads: tuple | list, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, like)]


@dataclass
class AutoBalanceConfig(LongTailConfig):
    """`LongTailConfig` plus the AutoBalance search.

    Loss family: ``num_groups`` (tie parameters over groups of frequency-sorted classes), ``init`` (ones, la, cdt),
    ``delta_activation``, ``learn_delta``, ``learn_weights``. Search: ``hyper_update_steps`` (20), ``hypergradient`` (neumann or
    unrolled), ``neumann_steps`` (5), ``neumann_lr`` (1.0), ``hyper_batches`` (10), ``hyper_learning_rate``,
    ``hyper_optimizer``, ``search_steps`` (after it the parameters are frozen), ``hypergradient_params``. Upper objective: ``upper_objective`` (class-balanced CE as published, or any objective of
    the engine through its surrogate on a soft confusion matrix) and ``upper_objective_options``.
    Defaults: ``loss_type`` is "parametric" (the searched loss); ``hypergradient_params`` is "head": the IFT
    treats the backbone as fixed, because PyTorch's fused attention kernels (SDPA, the default of transformers
    models) have no second derivative on CPU. "all" is the published setting and needs eager attention.
    """

    loss_type: str = field(default="parametric", metadata={"help": "Must be 'parametric' for AutoBalance."})
    num_groups: int | None = field(default=None, metadata={"help": "Tie the loss parameters over this many groups."})
    init: str = field(default="ones", metadata={"help": "Initial loss: ones (CE), la (logit adjustment) or cdt."})
    delta_activation: str = field(
        default="exp", metadata={"help": "Delta = activation(raw): exp (positive, starts at 1), sigmoid (published), identity."}
    )
    learn_weights: bool = field(default=False, metadata={"help": "Also learn the per-class weights w."})
    learn_delta: bool = field(default=True, metadata={"help": "Learn the multiplicative Delta (else only l, and w if asked)."})
    hyper_update_steps: int = field(default=20, metadata={"help": "Optimiser steps between hypergradient updates."})
    hypergradient: str = field(default="neumann", metadata={"help": "neumann (IFT + Neumann series) or unrolled (one step)."})
    neumann_steps: int = field(default=5, metadata={"help": "Terms of the Neumann series."})
    neumann_lr: float = field(default=1.0, metadata={"help": "Step size eta of the Neumann series."})
    hyper_batches: int = field(default=10, metadata={"help": "Train and validation batches averaged per hypergradient."})
    hyper_learning_rate: float = field(default=0.01, metadata={"help": "Learning rate of the loss parameters."})
    hyper_optimizer: str = field(default="adam", metadata={"help": "adam or sgd, for the loss parameters."})
    search_steps: int | None = field(
        default=None, metadata={"help": "Stop updating the loss parameters after this step (frozen afterwards)."}
    )
    hypergradient_params: str = field(
        default="head",
        metadata={"help": "Lower-level weights in the hypergradient: head (final layer; works with every model) or all."},
    )
    upper_objective: str = field(
        default="balanced_ce",
        metadata={"help": f"Validation objective: {', '.join(UPPER_OBJECTIVES)} (engine objectives use a soft confusion matrix)."},
    )
    upper_objective_options: dict | str | None = field(default=None, metadata={"help": "Options of the upper objective (JSON)."})

    def __post_init__(self) -> None:
        if self.loss_type != "parametric":
            raise ValueError("AutoBalanceConfig searches the parametric loss: loss_type must be 'parametric'")
        self.upper_objective_options = parse_options(self.upper_objective_options, "upper_objective_options")
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
        self.loss_options = {
            **parse_options(self.loss_options, "loss_options"),
            "num_groups": self.num_groups, "init": self.init, "delta_activation": self.delta_activation,
            "learn_weights": self.learn_weights, "learn_delta": self.learn_delta,
        }
        super().__post_init__()


class AutoBalanceTrainer(LongTailTrainer):
    """`LongTailTrainer` with the parametric loss learned on the validation split (bilevel, every few steps).

    The learned parameters are logged at each update, saved with checkpoints (with the hyper-optimiser state), and
    written to ``<output_dir>/autobalance_loss.json`` at the end of training; ``load_parametric_loss`` reads that file
    back for a fresh run with the loss frozen (``LongTailTrainer(loss=...)``).
    """

    state_file = "autobalance_state_rank{rank}.pt"

    def __init__(self, model: nn.Module | None = None, args: AutoBalanceConfig | None = None, *,
                 validation_dataset: Any = None, **kwargs: Any) -> None:
        if not isinstance(args, AutoBalanceConfig):
            raise TypeError("AutoBalanceTrainer needs args=AutoBalanceConfig(...)")
        super().__init__(model=model, args=args, validation_dataset=validation_dataset, **kwargs)
        require_whole_head(self, "AutoBalanceTrainer")
        self.validation_dataset = pick_validation_set(validation_dataset, self.eval_dataset, "AutoBalance")
        val_labels = check_every_class(self.validation_dataset, self.num_labels, "validation")
        self.upper_weights = class_balanced_weights(np.bincount(val_labels, minlength=self.num_labels)).to(args.device)
        self.upper_objective = None
        if args.upper_objective != "balanced_ce":
            self.upper_objective = objective_for_training(
                args.upper_objective, self.num_labels, self.class_counts, **args.upper_objective_options
            )
        self.pooled = PooledFeatures(find_head(self.model, self.num_labels)[1])
        self.hyperparameters = self.loss_fn.hyperparameters()
        for p in self.hyperparameters:  # learned by the hyper-optimiser only, never by the training backward
            p.requires_grad_(False)
        optimiser = torch.optim.Adam if args.hyper_optimizer == "adam" else torch.optim.SGD
        self.hyper_optimizer = optimiser(self.hyperparameters, lr=args.hyper_learning_rate)
        self._hyper_generator = torch.Generator().manual_seed(rank_seed(args.seed, args.process_index) ^ 0xAB)
        self._batches: dict[str, Iterator] = {}
        self.add_callback(PeriodicRefresh(self, args.hyper_update_steps))

    # -- one upper-level step ---------------------------------------------------------------------
    def refresh(self) -> dict[str, float]:
        """One upper-level step: the hypergradient of the validation objective, averaged over ranks.

        The model runs in evaluation mode (no dropout noise, no BatchNorm statistics updated from validation data).
        With ``hypergradient_params="head"`` the pooled features are computed once without a graph and both losses
        are taken of the head alone; the validation side is a gathered pass over the whole validation set.
        """
        if self.args.search_steps is not None and self.state.global_step > self.args.search_steps:
            return {}
        model = unwrap(self.model)
        was_training = model.training
        model.eval()
        head_only = self.args.hypergradient_params == "head"
        try:
            if head_only or self.upper_objective is not None:
                features, logits, labels = gathered_validation_pass(self, self.validation_dataset, self.pooled)
                if self.upper_objective is not None:  # its multipliers follow the hard validation confusion matrix
                    counts = confusion_counts(labels.cpu(), logits.argmax(dim=1).cpu(), self.num_labels)
                    self.upper_objective.update(normalized_confusion(counts, self.upper_objective.class_prior))
            train_batches = [self._next_batch("train") for _ in range(self.args.hyper_batches)]
            if head_only:
                head = self.pooled.head
                weights = [p for p in head.parameters() if p.requires_grad]
                train_features = [(self._features(model, b), b["labels"]) for b in train_batches]
                train_loss = lambda: sum(self.loss_fn(head(f), y) for f, y in train_features) / len(train_features)  # noqa: E731
                val_loss = lambda: self._upper_loss(head(features.to(head.weight)), labels)  # noqa: E731
            else:
                weights = [p for p in model.parameters() if p.requires_grad]
                val_batches = [self._next_batch("validation") for _ in range(self.args.hyper_batches)]
                train_loss = lambda: sum(self.loss_fn(self._logits(model, b), b["labels"]) for b in train_batches) / len(train_batches)  # noqa: E731
                val_loss = lambda: self._upper_loss(  # noqa: E731
                    torch.cat([self._logits(model, b) for b in val_batches]), torch.cat([b["labels"] for b in val_batches])
                )
            for p in self.hyperparameters:
                p.requires_grad_(True)
            grads = _second_order_guard(lambda: hypergradient(
                weights, self.hyperparameters, train_loss, val_loss, method=self.args.hypergradient,
                neumann_steps=self.args.neumann_steps, neumann_lr=self.args.neumann_lr, unroll_lr=self.args.learning_rate,
            ))
        finally:
            for p in self.hyperparameters:
                p.requires_grad_(False)
            model.train(was_training)
        if self.args.world_size > 1:
            grads = [self.accelerator.reduce(g.contiguous(), reduction="mean") for g in grads]
        for p, g in zip(self.hyperparameters, grads):
            p.grad = g.detach()
        self.hyper_optimizer.step()
        self.hyper_optimizer.zero_grad(set_to_none=True)
        return self.learned_parameters()

    def learned_parameters(self) -> dict[str, float]:
        """Per-class Delta, l (and w) as log entries (group values when tied)."""
        logs = {}
        groups = self.loss_fn.groups.tolist()
        shown = sorted(set(groups)) if len(set(groups)) <= 16 else []
        for name, values in (("delta", self.loss_fn.class_delta()), ("offset", self.loss_fn.class_offset()),
                             ("weight", self.loss_fn.class_weight())):
            for g in shown:
                logs[f"autobalance/{name}_{g}"] = float(values[groups.index(g)])
        return logs

    def _logits(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Logits of a batch with the graph kept (the whole-model hypergradient differentiates through them)."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with self.compute_loss_context_manager():
            return model(**inputs).logits.float()

    def _features(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The pooled embeddings of a batch, without a graph (the head-only hypergradient treats them as data)."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad(), self.pooled.capture(), self.compute_loss_context_manager():
            model(**inputs)
        return self.pooled.captured.float()

    def _upper_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Class-balanced CE on validation (published), or minus an engine objective of the soft confusion matrix."""
        logits = logits.float()
        if self.upper_objective is None:
            per_sample = F.cross_entropy(logits, labels, reduction="none")
            return (self.upper_weights[labels] * per_sample).mean()
        probs = torch.softmax(logits, dim=1)
        sums = torch.zeros(self.num_labels, self.num_labels, dtype=probs.dtype, device=probs.device)
        sums = sums.index_add(0, labels, probs)
        counts = torch.bincount(labels, minlength=self.num_labels).clamp_min(1).to(probs)
        prior = self.upper_objective.class_prior.to(probs)
        soft_confusion = (sums / counts.unsqueeze(1) * prior.unsqueeze(1)).clamp_min(1e-7)
        return -self.upper_objective.surrogate(soft_confusion)

    def _next_batch(self, split: str) -> dict[str, Any]:
        """Batches drawn with replacement from the train or validation split, from this rank's own stream."""
        if split not in self._batches:
            dataset = self.train_dataset if split == "train" else self.validation_dataset
            dataset, collator = _compat.drop_unused_columns(self, dataset, self.data_collator, f"autobalance {split}")
            sampler = RandomSampler(dataset, replacement=True, num_samples=1 << 62, generator=self._hyper_generator)
            loader = DataLoader(dataset, sampler=sampler, batch_size=self.args.per_device_train_batch_size,
                                collate_fn=collator)
            self._batches[split] = iter(loader)
        return _compat.prepare_inputs(self, next(self._batches[split]))

    # -- checkpoints and export -------------------------------------------------------------------
    def card_stage(self) -> dict[str, Any]:
        """This run as the model card's training stage: AutoBalance's search settings."""
        a = self.args
        return {
            "title": "AutoBalance (loss learned on validation data)", "method": "autobalance", "cite": ["autobalance"],
            "objective": None if self.upper_objective is None else self.upper_objective.name,
            "settings": {**optimisation_settings(self), "upper_objective": a.upper_objective, "init": a.init,
                         "hypergradient": a.hypergradient, "hypergradient_params": a.hypergradient_params,
                         "hyper_update_steps": a.hyper_update_steps, "hyper_learning_rate": a.hyper_learning_rate,
                         "neumann_lr": a.neumann_lr, "learned loss": "autobalance_loss.json"},
        }

    def extra_state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss_fn.state_dict(), "hyper_optimizer": self.hyper_optimizer.state_dict(),
                "hyper_generator": self._hyper_generator.get_state(),
                "upper_objective": None if self.upper_objective is None else self.upper_objective.state_dict()}

    def load_extra_state_dict(self, state: dict[str, Any], same_rank: bool) -> None:
        self.loss_fn.load_state_dict(state["loss"])
        self.hyper_optimizer.load_state_dict(state["hyper_optimizer"])
        if self.upper_objective is not None:
            self.upper_objective.load_state_dict(state["upper_objective"])
        if same_rank:
            self._hyper_generator.set_state(state["hyper_generator"])
        self._batches = {}

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """`LongTailTrainer.train`, then the learned loss is written to <output_dir>/autobalance_loss.json."""
        output = super().train(*args, **kwargs)
        if self.args.should_save:
            save_parametric_loss(self.loss_fn, os.path.join(self.args.output_dir, "autobalance_loss.json"))
        return output


def _second_order_guard(compute: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
    """Run a hypergradient; a kernel without a second derivative becomes an error that says what to change."""
    try:
        return compute()
    except RuntimeError as err:
        if "derivative for" in str(err) and "not implemented" in str(err):
            raise RuntimeError(
                f"the hypergradient needs second derivatives through the whole model, and one of its kernels has none "
                f"({err}). Use hypergradient_params='head' (the default), or load the model with "
                "attn_implementation='eager' to keep hypergradient_params='all'."
            ) from err
        raise


def save_parametric_loss(loss: ParametricCrossEntropy, path: str) -> None:
    """The per-class Delta, l and w of a parametric loss as JSON (readable, and enough to rebuild it)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with torch.no_grad():
        values = {"delta": loss.class_delta().tolist(), "offset": loss.class_offset().tolist(),
                  "weight": loss.class_weight().tolist()}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(values, fh, indent=2)
    os.replace(tmp, path)


def load_parametric_loss(path: str) -> ParametricCrossEntropy:
    """A frozen parametric loss from `save_parametric_loss`'s JSON, for a fresh run with the learned loss."""
    with open(path) as fh:
        values = json.load(fh)
    loss = ParametricCrossEntropy.from_values(torch.tensor(values["delta"]), torch.tensor(values["offset"]),
                                              torch.tensor(values["weight"]))
    for p in loss.parameters():
        p.requires_grad_(False)
    return loss


__all__ = ["AutoBalanceConfig", "AutoBalanceTrainer", "hypergradient", "load_parametric_loss", "save_parametric_loss"]
