"""AutoBalance: learn the parametric loss on validation data by bilevel optimisation (Li et al., NeurIPS 2021).

Lower level: the network trains on the train split with `ParametricCrossEntropy(theta)`. Upper level, every
`hyper_update_steps` steps: the hypergradient of the validation loss with respect to theta, by the implicit
function theorem, d L_val / d theta = dL_val/dtheta - (d^2 L_train / dtheta dw) H^-1 grad_w L_val, with H^-1 from
a Neumann series (or a one-step unrolled approximation), then one step of the hyper-optimiser.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import _compat
from .base_trainer import BaseTrainer
from .config import HYPERGRADIENTS, AutoBalanceConfig
from .features import PooledFeatures, logits_of
from .groups import cell_confusion_counts, normalized_cell_confusion
from .longtail_trainer import LongTailTrainer
from .losses import ParametricCrossEntropy, build_loss, class_balanced_weights
from .metrics import confusion_counts, normalized_confusion
from .nonfinite import NonFiniteError, bad_input_rows, first_bad, row_is_finite
from .objectives import OBJECTIVES, objective_for_training, vector_logs
from .sampling import rank_seed
from .sharding import model_to_call, whole_head


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
    direct = _zeros_for_none(val_grads[len(weights) :], hyperparameters)
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


class AutoBalanceTrainer(LongTailTrainer):
    """`LongTailTrainer` with the parametric loss learned on the validation split (bilevel, every few steps).

    The learned parameters are logged at each update, saved with checkpoints (with the hyper-optimiser state), and
    written to ``<output_dir>/autobalance_loss.json`` at the end of training; ``load_parametric_loss`` reads that file
    back for a fresh run with the loss frozen (``LongTailTrainer(loss=...)``). The hyper-batches hold
    ``per_device_train_batch_size x gradient_accumulation_steps`` samples each (one optimiser step's worth, whatever
    the micro-batch size), drawn from this rank's own random stream, which checkpoints save.
    """

    config_class = AutoBalanceConfig
    _name = "autobalance"
    _paper = ("autobalance",)
    _tag_names = ("bilevel-optimisation",)
    state_stem = "autobalance_state"
    reads_head_weights = True

    def __init__(
        self,
        model: nn.Module | None = None,
        args: AutoBalanceConfig | None = None,
        *,
        validation_dataset: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model=model, args=args, validation_dataset=validation_dataset, **kwargs)
        if args.hypergradient_params != "head":
            self.require_whole_parameters(
                f"with hypergradient_params={args.hypergradient_params!r} differentiates through every weight",
                ", or hypergradient_params='head' (the default)",
            )
        self.use_validation_set("AutoBalance")
        self.upper_weights = class_balanced_weights(self.validation_counts).to(args.device)
        self.upper_objective = None
        if args.upper_objective != "balanced_ce":
            over_cells = OBJECTIVES[args.upper_objective].needs_groups
            self.cells = self.validation_cells("AutoBalance") if over_cells else None
            cell_options = (
                {}
                if self.cells is None
                else {
                    "cell_classes": list(self.cells.classes),
                    "cell_prior": self.cells.prior(args.upper_objective_options.get("class_prior")).tolist(),
                }
            )
            self.upper_objective = objective_for_training(
                args.upper_objective, self.num_labels, self.class_counts, **args.upper_objective_options, **cell_options
            )
        self.pooled = PooledFeatures(self.head)
        self.hyperparameters = self.loss_fn.hyperparameters()
        for p in self.hyperparameters:  # learned by the hyper-optimiser only, never by the training backward
            p.requires_grad_(False)
        optimiser = torch.optim.Adam if args.hyper_optimizer == "adam" else torch.optim.SGD
        self.hyper_optimizer = optimiser(self.hyperparameters, lr=args.hyper_learning_rate)
        self._hyper_generator = torch.Generator().manual_seed(rank_seed(args.seed, args.process_index) ^ 0xAB)
        self._collators: dict[str, tuple[Any, Any]] = {}
        self.schedule_refresh(args.hyper_update_steps)

    def build_loss(self) -> nn.Module:
        """The searched `ParametricCrossEntropy`, with the loss-family settings of the config."""
        options = self.args.parametric_loss_options()
        if self.group_column and self.args.per_group_loss:  # the group-sensitive loss: a row per sample group
            options.update(sample_groups=self.num_groups(), group_counts=self.group_counts())
        return build_loss("parametric", self.class_counts, **options)

    # -- one upper-level step ---------------------------------------------------------------------
    def refresh(self) -> dict[str, float]:
        """One upper-level step: the hypergradient of the validation objective, averaged over ranks.

        The model runs in evaluation mode (no dropout noise, no BatchNorm statistics updated from validation data).
        With ``hypergradient_params="head"`` the pooled features are computed once without a graph and both losses
        are taken of the head alone; the validation side is a gathered pass over the whole validation set.
        """
        if self.args.search_steps is not None and self.state.global_step > self.args.search_steps:
            return {}
        model = model_to_call(self.model)
        was_training = model.training
        model.eval()
        head_only = self.args.hypergradient_params == "head"
        try:
            if head_only or self.upper_objective is not None:
                features, logits, labels, groups = self._validation_pass()
                if head_only:  # balanced over the samples this pass read (all, or validation_refresh_per_class)
                    counts = torch.bincount(labels.cpu(), minlength=self.num_labels).tolist()
                    self.upper_weights = class_balanced_weights(counts).to(labels.device)
                if self.upper_objective is not None:  # its multipliers follow the hard validation confusion matrix
                    self.upper_objective.update(self._hard_confusion(logits, labels, groups))
            error, train_features, val_batches = None, [], []
            try:  # a NaN in one rank's hyper-batches must stop every rank, not leave them in the all-reduce below
                train_batches = [self._next_batch("train") for _ in range(self.args.hyper_batches)]
                if head_only:
                    train_features = [(self._features(model, b), *self._targets(b)) for b in train_batches]
                else:
                    val_batches = [self._next_batch("validation") for _ in range(self.args.hyper_batches)]
            except NonFiniteError as err:
                error = err
            self.stop_together(error)
            if head_only:  # differentiable float copies of the head (gathered whole if sharded) stand in for it
                weights, head = self._head_copy()
            else:
                weights = [p for p in model.parameters() if p.requires_grad]

            def train_loss() -> torch.Tensor:
                """The lower-level (training) loss over the hyper-batches, with the graph to the weights."""
                if head_only:
                    return sum(self._lower_loss(head(f), y, g) for f, y, g in train_features) / len(train_features)
                losses = [self._lower_loss(self._logits(model, b), *self._targets(b)) for b in train_batches]
                return sum(losses) / len(losses)

            def val_loss() -> torch.Tensor:
                """The upper-level (validation) objective as a loss."""
                if head_only:
                    return self._upper_loss(head(features.float()), labels, groups)
                targets = [self._targets(b) for b in val_batches]
                return self._upper_loss(
                    torch.cat([self._logits(model, b) for b in val_batches]),
                    torch.cat([y for y, _ in targets]),
                    None if not self.group_column else torch.cat([g for _, g in targets]),
                )

            for p in self.hyperparameters:
                p.requires_grad_(True)
            grads = _second_order_guard(
                lambda: hypergradient(
                    weights,
                    self.hyperparameters,
                    train_loss,
                    val_loss,
                    method=self.args.hypergradient,
                    neumann_steps=self.args.neumann_steps,
                    neumann_lr=self.args.neumann_lr,
                    unroll_lr=self.args.learning_rate,
                )
            )
        finally:
            for p in self.hyperparameters:
                p.requires_grad_(False)
            model.train(was_training)
        if self.args.world_size > 1:
            grads = [self.accelerator.reduce(g.contiguous(), reduction="mean") for g in grads]
        if not all(torch.isfinite(g).all() for g in grads):
            raise NonFiniteError(
                f"the AutoBalance hypergradient is NaN or inf at step {self.state.global_step} (inputs and features "
                "were finite): lower neumann_lr or hyper_learning_rate, or use hypergradient='unrolled'. The loss "
                "parameters were not updated and nothing was saved after the last checkpoint."
            )
        for p, g in zip(self.hyperparameters, grads):
            p.grad = g.detach()
        self.hyper_optimizer.step()
        self.hyper_optimizer.zero_grad(set_to_none=True)
        return self.learned_parameters()

    def unused_settings(self) -> set[str]:
        """As LongTailTrainer's; the refreshes' validation sample acts when the search passes over validation data
        (the head-only hypergradient, or an upper objective's multipliers)."""
        unused = super().unused_settings()
        if self.args.hypergradient_params == "head" or self.upper_objective is not None:
            unused.discard("validation_refresh_per_class")
        return unused

    def learned_parameters(self) -> dict[str, float]:
        """Per-class Delta, l (and w) as log entries (group values when tied; max / min of a per-group table)."""
        logs: dict[str, float] = {}
        if self.loss_fn.needs_groups:
            for name, values in (
                ("delta", self.loss_fn.class_delta()),
                ("offset", self.loss_fn.class_offset()),
                ("weight", self.loss_fn.class_weight()),
            ):
                logs.update(vector_logs(f"autobalance/{name}", values.detach().cpu()))
            return logs
        groups = self.loss_fn.groups.tolist()
        shown = sorted(set(groups)) if len(set(groups)) <= 16 else []
        for name, values in (
            ("delta", self.loss_fn.class_delta()),
            ("offset", self.loss_fn.class_offset()),
            ("weight", self.loss_fn.class_weight()),
        ):
            for g in shown:
                logs[f"autobalance/{name}_{g}"] = float(values[groups.index(g)])
        return logs

    def _head_copy(self) -> tuple[list[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
        """The head's trainable weights as float leaves with gradients, and the linear map they define.

        The head-only hypergradient differentiates the two losses with respect to these copies: the same numbers as
        the head's own, and under FSDP or ZeRO-3 the head's parameters are shards outside the wrapped forward.
        """
        head = self.pooled.head
        with whole_head(head, self.model_wrapped) as (weight, bias):
            weight = weight.float().clone().requires_grad_(head.weight.requires_grad)
            bias = None if bias is None else bias.float().clone().requires_grad_(head.bias.requires_grad)
        trainable = [t for t in (weight, bias) if t is not None and t.requires_grad]
        return trainable, lambda features: F.linear(features, weight, bias)

    def _logits(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Logits of a batch with the graph kept (the whole-model hypergradient differentiates through them)."""
        inputs = {k: v for k, v in batch.items() if k not in (self.label_key, self.group_column, "_index")}
        with self.compute_loss_context_manager():
            return logits_of(model(**inputs)).float()

    def _features(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The pooled embeddings of a batch, without a graph (the head-only hypergradient treats them as data).

        The forwards run in micro-batches of per_device_train_batch_size, so a hyper-batch of a run with gradient
        accumulation needs no more memory than a training step.
        """
        inputs = {k: v for k, v in batch.items() if k not in (self.label_key, self.group_column, "_index")}
        rows = len(batch[self.label_key])
        size = self.args.per_device_train_batch_size
        chunks = []
        for start in range(0, rows, size):
            part = {
                k: v[start : start + size] if torch.is_tensor(v) and v.shape[:1] == (rows,) else v
                for k, v in inputs.items()
            }
            with torch.no_grad(), self.pooled.capture(), self.compute_loss_context_manager():
                model(**part)
            chunks.append(self.pooled.captured.float())
        features = torch.cat(chunks)
        bad = first_bad(row_is_finite(features))
        if bad is not None:
            raise NonFiniteError(
                f"NaN or inf in the pooled features of training sample {batch['_index'][bad]} (a hyper-batch of the "
                f"AutoBalance step at step {self.state.global_step}); check that sample's inputs. The loss parameters "
                "were not updated and nothing was saved after the last checkpoint."
            )
        return features

    def _validation_pass(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(features, logits, labels, group ids or None) of the gathered validation pass."""
        if not self.group_column:
            return (*self.validation_pass(self.pooled), None)
        return self.validation_pass(self.pooled, with_groups=True)

    def _targets(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch's labels and group ids (None without a group column)."""
        return batch[self.label_key], batch[self.group_column] if self.group_column else None

    def _lower_loss(self, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
        """The parametric training loss, with each sample's group when it has a row per group."""
        return self.loss_fn(logits, labels, groups) if self.loss_fn.needs_groups else self.loss_fn(logits, labels)

    def _rows(self, labels: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
        """The upper objective's confusion row of each validation sample: its class, or its (class, group) cell."""
        if self.cells is None:
            return labels
        return self.cells.cell_of(labels.cpu(), groups.cpu()).to(labels.device)

    def _hard_confusion(self, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
        """The normalised validation confusion matrix the upper objective's multipliers follow."""
        predictions = logits.argmax(dim=1).cpu()
        if self.cells is None:
            counts = confusion_counts(labels.cpu(), predictions, self.num_labels)
            return normalized_confusion(counts, self.upper_objective.class_prior)
        counts = cell_confusion_counts(labels.cpu(), predictions, groups.cpu(), self.cells)
        return normalized_cell_confusion(counts, self.cells, self.upper_objective.class_prior)

    def _upper_loss(self, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
        """Class-balanced CE on validation (published), or minus an engine objective of the soft confusion matrix
        (a row per (class, group) cell for a group objective)."""
        logits = logits.float()
        if self.upper_objective is None:
            per_sample = F.cross_entropy(logits, labels, reduction="none")
            return (self.upper_weights[labels] * per_sample).mean()
        probs = torch.softmax(logits, dim=1)
        rows, num_rows = self._rows(labels, groups), self.upper_objective.num_rows
        sums = torch.zeros(num_rows, self.num_labels, dtype=probs.dtype, device=probs.device)
        sums = sums.index_add(0, rows, probs)
        counts = torch.bincount(rows, minlength=num_rows).clamp_min(1).to(probs)
        prior = self.upper_objective.row_prior.to(probs)
        soft_confusion = (sums / counts.unsqueeze(1) * prior.unsqueeze(1)).clamp_min(1e-7)
        return -self.upper_objective.surrogate(soft_confusion)

    def _next_batch(self, split: str) -> dict[str, Any]:
        """A batch drawn with replacement from the train or validation split, from this rank's own stream.

        It holds one optimiser step's samples (micro-batch x accumulation steps), so the hypergradient does not
        depend on how a step is split into micro-batches; the indices are drawn here, one batch at a time, so a
        resumed run draws exactly what the uninterrupted one would have.
        """
        if split not in self._collators:
            dataset = self.train_dataset if split == "train" else self.validation_dataset
            self._collators[split] = _compat.drop_unused_columns(
                self, dataset, self.data_collator, f"autobalance {split}"
            )
        dataset, collator = self._collators[split]
        size = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        indices = torch.randint(len(dataset), (size,), generator=self._hyper_generator).tolist()
        batch = _compat.prepare_inputs(self, collator([dataset[i] for i in indices]))
        bad = bad_input_rows(batch)
        if bad:
            name, rows = next(iter(bad.items()))
            raise NonFiniteError(
                f"NaN or inf in input {name!r} of {split} sample {indices[rows[0]]} (drawn for the AutoBalance step at "
                f"step {self.state.global_step}): fix or drop that sample. Nothing was saved after the last checkpoint."
            )
        return {**batch, "_index": indices}

    # -- checkpoints and export -------------------------------------------------------------------
    def stage_title(self) -> str:
        """The card's stage title."""
        return "AutoBalance (loss learned on validation data)"

    def stage_description(self) -> str:
        """Where the learned loss is."""
        return "the parametric loss learned by bilevel optimisation is saved beside the model in autobalance_loss.json"

    def stage_objective(self) -> str | None:
        """The upper objective, when it is one of the engine's (class-balanced CE is not a reported metric)."""
        return None if self.upper_objective is None else self.upper_objective.name

    def card_stage(self) -> dict[str, Any]:
        """The base stage (LongTailTrainer's would tag the parametric loss as the method)."""
        return BaseTrainer.card_stage(self)

    def method_state(self) -> dict[str, Any]:
        """The loss parameters, the hyper-optimiser, the upper objective's multipliers and this rank's stream."""
        return {
            "loss": self.loss_fn.state_dict(),
            "hyper_optimizer": self.hyper_optimizer.state_dict(),
            "hyper_generator": self._hyper_generator.get_state(),
            "upper_objective": None if self.upper_objective is None else self.upper_objective.state_dict(),
        }

    def load_method_state(self, state: dict[str, Any], same_rank: bool) -> None:
        """Restore the search where the checkpoint left it."""
        self.loss_fn.load_state_dict(state["loss"])
        self.hyper_optimizer.load_state_dict(state["hyper_optimizer"])
        if self.upper_objective is not None:
            self.upper_objective.load_state_dict(state["upper_objective"])
        if same_rank:
            self._hyper_generator.set_state(state["hyper_generator"])

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
        values = {
            "delta": loss.class_delta().tolist(),
            "offset": loss.class_offset().tolist(),
            "weight": loss.class_weight().tolist(),
        }
    _check_loss_values(values, f"the learned loss for {path}")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(values, fh, indent=2)
    os.replace(tmp, path)


def load_parametric_loss(path: str) -> ParametricCrossEntropy:
    """A frozen parametric loss from `save_parametric_loss`'s JSON, for a fresh run with the learned loss."""
    with open(path) as fh:
        values = json.load(fh)
    _check_loss_values(values, path)
    loss = ParametricCrossEntropy.from_values(  # G x K tables for a group-sensitive loss
        torch.tensor(values["delta"]), torch.tensor(values["offset"]), torch.tensor(values["weight"])
    )
    for p in loss.parameters():
        p.requires_grad_(False)
    return loss


def _check_loss_values(values: dict[str, list[float]], what: str) -> None:
    """Refuse a parametric loss whose Delta, l or w holds NaN or inf (it would poison every weight it trains)."""
    for key in ("delta", "offset", "weight"):
        if key not in values:
            raise ValueError(f"{what} has no {key!r} entry; expected the JSON written by save_parametric_loss")
        if not all(math.isfinite(float(v)) for v in torch.as_tensor(values[key]).flatten().tolist()):
            raise NonFiniteError(f"{what}: {key} holds NaN or inf; this loss cannot be used (re-run the search)")


__all__ = ["AutoBalanceConfig", "AutoBalanceTrainer", "hypergradient", "load_parametric_loss", "save_parametric_loss"]
