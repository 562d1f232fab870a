"""LongTailTrainer: `Trainer` with the long-tailed loss zoo, DRW, cost-sensitive refreshes and post-hoc adjustment."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from .base_trainer import BaseTrainer
from .config import LongTailConfig
from .features import logits_of
from .groups import CellLayout, cell_confusion_counts, normalized_cell_confusion
from .losses import LOSSES, build_loss, counts_tensor
from .metrics import confusion_counts, normalized_confusion
from .objectives import OBJECTIVES, multiplier_logs


class LongTailTrainer(BaseTrainer):
    """`Trainer` whose training loss is a long-tailed loss built from the class counts (or any loss module given).

    Takes the `Trainer` arguments plus ``loss`` (an nn.Module ``loss(logits, labels)``, instead of ``args.loss_type``)
    and ``validation_dataset`` (for losses that follow the validation confusion matrix, e.g. the cost-sensitive one;
    defaults to ``eval_dataset``). Evaluation reports the plain cross-entropy of the (optionally post-hoc adjusted)
    logits; prediction returns the adjusted logits.
    """

    config_class = LongTailConfig
    _name = "long-tail"
    _tag_names = ("long-tail-loss",)
    state_stem = "longtail_state"
    random_access_reason = (
        "counts the training labels per class before the first step (or give class_counts in the config: with "
        "the counts known, a stream trains)"
    )

    def __init__(
        self,
        model: nn.Module | None = None,
        args: LongTailConfig | None = None,
        *,
        loss: nn.Module | None = None,
        validation_dataset: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, args, validation_dataset=validation_dataset, **kwargs)
        self.loss_name = args.loss_type if loss is None else type(loss).__name__
        self.cells: CellLayout | None = None  # the validation cells a loss for a group objective ranges over
        self.loss_fn = loss if loss is not None else self.build_loss()
        self.loss_fn.to(args.device)
        if getattr(self.loss_fn, "needs_validation", False):  # losses that follow a validation confusion matrix
            self.use_validation_set(f"the {self.loss_name} loss")
            self.schedule_refresh(args.validation_refresh_steps)
        if args.drw_start_epoch is not None:
            if not getattr(self.loss_fn, "has_deferred_reweighting", False):
                raise ValueError(
                    f"drw_start_epoch is set but loss {type(self.loss_fn).__name__} has no re-weighting stage"
                )
            self.add_callback(_DeferredReweighting(self.loss_fn, args.drw_start_epoch))
        if getattr(self.loss_fn, "steps_with_optimizer", False):  # e.g. GroupDRO's weights, moved once per step
            self.add_callback(_EndOfStep(self))
        self._posthoc = None
        if args.posthoc_tau is not None:
            counts = counts_tensor(self.class_counts, "post-hoc logit adjustment")
            self._posthoc = (args.posthoc_tau * torch.log(counts / counts.sum())).float().to(args.device)

    def build_loss(self) -> nn.Module:
        """The training loss named by the config, built from the class counts (and the (class, group) cell counts
        for a group loss)."""
        name, _ = self.args.trained_objective()
        self.cells = self.validation_cells(f"the {name} objective") if _over_cells(name) else None
        over_groups = LOSSES[self.args.loss_type].needs_groups or self.cells is not None
        return build_loss(
            self.args.loss_type,
            self.class_counts,
            group_counts=self.group_counts() if over_groups else None,
            cells=self.cells,
            **self.args.loss_options,
        )

    def count_classes(self) -> list[int]:
        """Training samples per class: ``class_counts`` of the config, else counted in the training labels."""
        if self.args.class_counts is None:
            return super().count_classes()
        if len(self.args.class_counts) != self.num_labels:
            raise ValueError(
                f"class_counts has {len(self.args.class_counts)} entries but the model has num_labels={self.num_labels}"
            )
        return list(self.args.class_counts)

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """Training: the long-tailed loss. Evaluation: plain CE (post-hoc adjustment happens in prediction_step)."""
        if not model.training:
            return self.evaluation_loss(model, inputs, return_outputs)
        inputs, labels, groups = self.split_batch(inputs)
        outputs = model(**inputs)
        logits = logits_of(outputs)
        if getattr(self.loss_fn, "needs_groups", False):
            if groups is None:
                raise ValueError(f"loss {self.loss_name} weighs (class, group) cells: set group_column in the config")
            loss = self.loss_fn(logits, labels, groups)
        else:
            loss = self.loss_fn(logits, labels)
        self.check_finite_loss(loss, inputs, logits)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(
        self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: list[str] | None = None
    ) -> tuple[Any, Any, Any]:
        """`Trainer.prediction_step`; with posthoc_tau, logits - tau log pi (labelled or not) and the loss of those."""
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if self._posthoc is None or logits is None:
            return loss, logits, labels
        first = logits[0] if isinstance(logits, tuple) else logits
        adjusted = first - self._posthoc.to(first)
        if labels is not None:
            targets = labels[0] if isinstance(labels, (tuple, list)) else labels  # (labels, groups) with group_column
            loss = F.cross_entropy(adjusted.float(), targets).detach()
        return loss, (adjusted, *logits[1:]) if isinstance(logits, tuple) else adjusted, labels

    def refresh(self) -> dict[str, float]:
        """Validation pass -> confusion matrix -> the cost-sensitive loss's multipliers and gain matrix."""
        objective = self.loss_fn.objective
        if self.cells is None:
            _, logits, labels = self.validation_pass()
            counts = confusion_counts(labels.cpu(), logits.argmax(dim=1).cpu(), self.num_labels)
            confusion = normalized_confusion(counts, objective.class_prior)
        else:  # a group objective: a row per (class, group) cell
            _, logits, labels, groups = self.validation_pass(with_groups=True)
            predictions = logits.argmax(dim=1).cpu()
            counts = cell_confusion_counts(labels.cpu(), predictions, groups.cpu(), self.cells)
            confusion = normalized_cell_confusion(counts, self.cells, objective.class_prior)
        self.loss_fn.update(confusion)
        logs = {f"longtail/{key}": value for key, value in objective.report(confusion).items()}
        return {**logs, **multiplier_logs(objective, "longtail")}

    def stage_title(self) -> str:
        """The card's stage title: the loss."""
        return f"fine-tuning with the {self.loss_name.replace('_', '-')} loss"

    def card_stage(self) -> dict[str, Any]:
        """The base stage, tagged with the loss and citing the loss's paper."""
        stage = super().card_stage()
        citation = getattr(self.loss_fn, "citation", None)
        stage.update(method=self.loss_name, cite=[*stage["cite"], *([citation] if citation else [])])
        return stage

    def unused_settings(self) -> set[str]:
        """Without a loss that follows validation data, the refresh interval and its sample size did nothing."""
        if getattr(self.loss_fn, "needs_validation", False):
            return set()
        return {"validation_refresh_steps", "validation_refresh_per_class"}

    def stage_objective(self) -> str | None:
        """The objective a cost-sensitive loss follows (None for the fixed losses)."""
        objective = getattr(self.loss_fn, "objective", None)
        return None if objective is None else objective.name

    def method_state(self) -> dict[str, Any]:
        """The loss's parameters, buffers and extra state (e.g. the cost-sensitive multipliers)."""
        return {"loss": self.loss_fn.state_dict()}

    def load_method_state(self, state: dict[str, Any], same_rank: bool) -> None:
        """Restore the loss's state."""
        self.loss_fn.load_state_dict(state["loss"])


def _over_cells(objective: str | None) -> bool:
    """Whether the named objective ranges over (class, group) cells."""
    return objective in OBJECTIVES and OBJECTIVES[objective].needs_groups


class _EndOfStep(TrainerCallback):
    """Tells a loss with state over whole optimiser steps that one ended, with a sum over the ranks."""

    def __init__(self, trainer: LongTailTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        if args.world_size > 1:
            trainer.loss_fn.end_step(lambda t: trainer.accelerator.reduce(t, reduction="sum"))
        else:
            trainer.loss_fn.end_step()


class _DeferredReweighting(TrainerCallback):
    """Switches the loss's class-balanced re-weighting on from a given epoch (the DRW schedule)."""

    def __init__(self, loss: nn.Module, start_epoch: float) -> None:
        self.loss, self.start_epoch = loss, start_epoch

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.loss.set_reweighting((state.epoch or 0.0) >= self.start_epoch)


__all__ = ["LongTailConfig", "LongTailTrainer"]
