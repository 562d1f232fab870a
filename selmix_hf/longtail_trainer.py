"""LongTailTrainer: `Trainer` with the long-tailed loss zoo, DRW, cost-sensitive refreshes and post-hoc adjustment."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from . import _compat
from .cards import ModelCardMixin, optimisation_settings
from .config import parse_options
from .data import dataset_labels
from .features import num_labels_of
from .losses import LOSSES, build_loss, counts_tensor
from .metrics import check_labels, confusion_counts, normalized_confusion
from .objectives import multiplier_logs
from .validation import CheckpointedState, PeriodicRefresh, check_every_class, gathered_validation_pass, pick_validation_set


@dataclass
class LongTailConfig(TrainingArguments):
    """`TrainingArguments` plus the choice of long-tailed loss.

    Loss: ``loss_type``, ``loss_options``, ``class_counts`` (read from the training labels when not given).
    Schedule: ``drw_start_epoch`` (deferred re-weighting, e.g. for LDAM), ``validation_refresh_steps`` (how often the
    cost-sensitive loss re-reads the validation confusion matrix). Prediction: ``posthoc_tau`` (post-hoc logit
    adjustment: logits - tau log pi_train at evaluation and prediction time). No default differs from
    `TrainingArguments`.
    """

    loss_type: str = field(
        default="logit_adjusted", metadata={"help": f"Loss, one of: {', '.join(LOSSES)}."}
    )
    loss_options: dict | str | None = field(
        default=None, metadata={"help": 'Options of the loss as a dict or JSON string, e.g. \'{"tau": 1.0}\'.'}
    )
    class_counts: list[int] | None = field(
        default=None, metadata={"help": "Training samples per class; read from the training labels when not given."}
    )
    drw_start_epoch: float | None = field(
        default=None,
        metadata={"help": "Epoch from which class-balanced re-weighting is switched on (DRW); losses with set_reweighting."},
    )
    validation_refresh_steps: int = field(
        default=50, metadata={"help": "Steps between validation passes that update the cost-sensitive loss."}
    )
    posthoc_tau: float | None = field(
        default=None, metadata={"help": "If set, evaluation and prediction logits are f - posthoc_tau * log pi_train."}
    )

    def __post_init__(self) -> None:
        self.loss_options = parse_options(self.loss_options, "loss_options")
        if self.loss_type not in LOSSES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; valid loss types are: {', '.join(LOSSES)}")
        if self.validation_refresh_steps < 1:
            raise ValueError(f"validation_refresh_steps must be >= 1, got {self.validation_refresh_steps}")
        super().__post_init__()


class LongTailTrainer(ModelCardMixin, CheckpointedState, Trainer):
    """`Trainer` whose training loss is a long-tailed loss built from the class counts (or any loss module given).

    Takes the `Trainer` arguments plus ``loss`` (an nn.Module ``loss(logits, labels)``, instead of ``args.loss_type``)
    and ``validation_dataset`` (for the cost-sensitive loss; defaults to ``eval_dataset``). Evaluation reports the
    plain cross-entropy of the (optionally post-hoc adjusted) logits; prediction returns the adjusted logits.
    """

    loss_is_scaled_for_ga = False  # the loss is a per-micro-batch mean; the Trainer divides by the accumulation steps
    state_file = "longtail_state_rank{rank}.pt"

    def __init__(
        self,
        model: nn.Module | None = None,
        args: LongTailConfig | None = None,
        *,
        loss: nn.Module | None = None,
        validation_dataset: Any = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, LongTailConfig):
            raise TypeError("LongTailTrainer needs args=LongTailConfig(...) (TrainingArguments plus the loss settings)")
        if model is None:
            raise ValueError("LongTailTrainer needs a model (model_init is not supported)")
        super().__init__(model=model, args=args, **kwargs)
        _compat.disable_loss_kwargs(self)
        self.num_labels = num_labels_of(model)
        self.class_counts = self._class_counts()
        self.loss_name = args.loss_type if loss is None else type(loss).__name__
        self.loss_fn = loss if loss is not None else build_loss(args.loss_type, self.class_counts, **args.loss_options)
        self.loss_fn.to(args.device)
        self.validation_dataset = None
        if hasattr(self.loss_fn, "update"):  # losses that follow a validation confusion matrix
            self.validation_dataset = pick_validation_set(validation_dataset, self.eval_dataset, "the cost-sensitive loss")
            check_every_class(self.validation_dataset, self.num_labels, "validation")
            self.add_callback(PeriodicRefresh(self, args.validation_refresh_steps))
        if args.drw_start_epoch is not None:
            if not hasattr(self.loss_fn, "set_reweighting"):
                raise ValueError(f"drw_start_epoch is set but loss {type(self.loss_fn).__name__} has no re-weighting stage")
            self.add_callback(_DeferredReweighting(self.loss_fn, args.drw_start_epoch))
        self._posthoc = None
        if args.posthoc_tau is not None:
            counts = counts_tensor(self.class_counts, "post-hoc logit adjustment")
            self._posthoc = (args.posthoc_tau * torch.log(counts / counts.sum())).float().to(args.device)

    def _class_counts(self) -> list[int]:
        if self.args.class_counts is not None:
            if len(self.args.class_counts) != self.num_labels:
                raise ValueError(
                    f"class_counts has {len(self.args.class_counts)} entries but the model has num_labels={self.num_labels}"
                )
            return list(self.args.class_counts)
        if self.train_dataset is None:
            raise ValueError("give class_counts= in LongTailConfig or a train_dataset to count the classes of")
        labels = dataset_labels(self.train_dataset)
        check_labels(torch.as_tensor(labels), self.num_labels, "training labels")
        return np.bincount(labels, minlength=self.num_labels).tolist()

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """Training: the long-tailed loss. Evaluation: plain CE (post-hoc adjustment happens in prediction_step)."""
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = self.loss_fn(outputs.logits, labels) if model.training else F.cross_entropy(outputs.logits.float(), labels)
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
            loss = F.cross_entropy(adjusted.float(), labels).detach()
        return loss, (adjusted, *logits[1:]) if isinstance(logits, tuple) else adjusted, labels

    def refresh(self) -> dict[str, float]:
        """Validation pass -> confusion matrix -> the cost-sensitive loss's multipliers and gain matrix."""
        _, logits, labels = gathered_validation_pass(self, self.validation_dataset)
        counts = confusion_counts(labels.cpu(), logits.argmax(dim=1).cpu(), self.num_labels)
        objective = self.loss_fn.objective
        confusion = normalized_confusion(counts, objective.class_prior)
        self.loss_fn.update(confusion)
        logs = {f"longtail/{key}": value for key, value in objective.report(confusion).items()}
        return {**logs, **multiplier_logs(objective, "longtail")}

    def after_refresh(self, control: Any) -> None:
        """Nothing to decide after a cost-sensitive refresh."""

    def card_stage(self) -> dict[str, Any]:
        """This run as the model card's training stage."""
        a = self.args
        loss = self.loss_name
        cite = ["logit_adjusted"] if loss in ("logit_adjusted", "balanced_softmax") else []
        return {
            "title": f"fine-tuning with the {loss.replace('_', '-')} loss", "method": loss, "cite": cite,
            "objective": getattr(self.loss_fn, "objective", None) and self.loss_fn.objective.name,
            "settings": {**optimisation_settings(self), "loss_options": a.loss_options or None,
                         "drw_start_epoch": a.drw_start_epoch, "posthoc_tau": a.posthoc_tau},
        }

    def extra_state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss_fn.state_dict()}

    def load_extra_state_dict(self, state: dict[str, Any], same_rank: bool) -> None:
        self.loss_fn.load_state_dict(state["loss"])


class _DeferredReweighting(TrainerCallback):
    """Switches the loss's class-balanced re-weighting on from a given epoch (the DRW schedule)."""

    def __init__(self, loss: nn.Module, start_epoch: float) -> None:
        self.loss, self.start_epoch = loss, start_epoch

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.loss.set_reweighting((state.epoch or 0.0) >= self.start_epoch)


__all__ = ["LongTailConfig", "LongTailTrainer"]
