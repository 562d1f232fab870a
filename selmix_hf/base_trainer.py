"""The base every selmix-hf trainer stands on: set-up, the refresh protocol, checkpoint state, NaN safety, cards.

A trainer over this base is a small file: its config class, what it cites, its `refresh` (what it re-estimates
from the validation set every few steps), its `compute_loss`, and its own state for checkpoints. Everything a
`Trainer` user relies on (argument checks, label columns, accumulation, exact resume, best-model loading, cards that
describe the saved weights) is done here once.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Sized
from typing import Any, ClassVar

import numpy as np
import torch
from accelerate.utils import broadcast_object_list
from transformers import Trainer, TrainerCallback

from . import _compat
from .cards import ModelCardMixin
from .checkpoint_state import load_state, save_state, state_exists
from .config import MethodConfig
from .data import LABEL_COLUMNS, dataset_groups, dataset_labels
from .features import find_head, logits_of, num_labels_of, unwrap
from .groups import CellLayout
from .metrics import check_labels, classification_report
from .nonfinite import NonFiniteError, bad_input_rows, check_state_finite, describe_rows
from .objectives import Objective, objective_for_training
from .posthoc import RULE_ATTRIBUTE, DecisionRule, fit_decision_rule, fold_offsets
from .sharding import local_part
from .validation import StratifiedSample, counts_with_every_class, gathered_validation_pass, pick_validation_set

logger = logging.getLogger(__name__)


class PeriodicRefresh(TrainerCallback):
    """Calls ``trainer.refresh()`` before the first step (unless resuming) and every ``every`` optimiser steps.

    The refresh's dict is logged without clearing the Trainer's own pending log of that step (`log` resets
    `should_log`), and ``trainer.after_refresh(control)`` may then ask to stop.
    """

    def __init__(self, trainer: BaseTrainer, every: int) -> None:
        self.trainer, self.every = trainer, every

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.trainer.resumed_from_checkpoint:
            self._run(control)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.every or state.global_step >= state.max_steps:
            return
        self._run(control)

    def _run(self, control: Any) -> None:
        started, self.trainer.validation_seconds = time.perf_counter(), 0.0
        logs = self.trainer.refresh()
        if logs:  # what a refresh costs, to weigh against the steps between two of them
            logs = {
                **logs,
                "refresh/seconds": time.perf_counter() - started,
                "refresh/validation_seconds": self.trainer.validation_seconds,
            }
            should_log = control.should_log
            self.trainer.log(logs)
            control.should_log = self.trainer.control.should_log = should_log
        self.trainer.after_refresh(control)


def refuse_streams(dataset: Any, why: str) -> None:
    """A clear error for an iterable-style training set (`datasets.IterableDataset`, torch `IterableDataset`)."""
    if dataset is None or (isinstance(dataset, Sized) and hasattr(dataset, "__getitem__")):
        return
    raise TypeError(
        f"train_dataset is a {type(dataset).__name__} (a stream, no len or [i]), but {why}. Pass a map-style "
        "dataset: load it without streaming=True, or materialise the stream, e.g. "
        "datasets.Dataset.from_generator(lambda: (yield from stream))"
    )


class BaseTrainer(ModelCardMixin, Trainer):
    """`Trainer` plus what every selmix-hf method needs: checked set-up, validation refreshes, own checkpoint state.

    Subclasses declare, as class attributes: ``config_class`` (their `TrainingArguments` subclass), ``_name`` (the
    method's name in cards and tags), ``_paper`` (citation keys), ``_tag_names`` (extra Hub tags), ``state_stem``
    (file name of their checkpoint state), ``reads_head_weights`` (the method reads the classifier head between
    steps), ``supports_label_smoothing`` and ``random_access_reason`` (why a streamed training set cannot work).
    They implement `refresh` / `after_refresh` when they re-estimate anything from validation data (and call
    `schedule_refresh`), `method_state` / `load_method_state` for their checkpoint state, and `stage_title` for the
    card.
    """

    config_class: ClassVar[type] = MethodConfig
    _name: ClassVar[str] = "selmix-hf"
    _paper: ClassVar[tuple[str, ...]] = ()
    _tag_names: ClassVar[tuple[str, ...]] = ()
    state_stem: ClassVar[str] = "method_state"
    reads_head_weights: ClassVar[bool] = False
    supports_label_smoothing: ClassVar[bool] = False
    batch_unit: ClassVar[str] = "samples per step"
    # why the training set must be map-style (len and [i]): named in the error a stream gets
    random_access_reason: ClassVar[str] = "counts the training labels per class before the first step"
    # the loss returned by compute_loss is a per-micro-batch mean; the Trainer divides by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(
        self, model: torch.nn.Module | None = None, args: Any = None, *, validation_dataset: Any = None, **kwargs: Any
    ) -> None:
        name = type(self).__name__
        if not isinstance(args, self.config_class):
            raise TypeError(
                f"{name} needs args={self.config_class.__name__}(...) (TrainingArguments plus the "
                f"{self._name} settings), got {type(args).__name__}"
            )
        if model is None:
            raise ValueError(f"{name} needs a model (model_init is not supported)")
        if args.n_gpu > 1:
            raise ValueError(
                f"{args.n_gpu} GPUs in one process would split each batch across replicas (DataParallel); launch one "
                "process per GPU instead: `accelerate launch` or `torchrun --nproc_per_node N`"
            )
        self.num_labels = num_labels_of(model)
        peft = _compat.is_peft_model(unwrap(model))
        head_name, head = find_head(model, self.num_labels) if self.reads_head_weights or peft else ("", None)
        self.head = head if self.reads_head_weights else None
        if peft:
            self._require_trainable_peft_head(head_name, head)
        frozen_norms = frozen_norm_layers(model) if peft else []
        if args.label_smoothing_factor and not self.supports_label_smoothing:
            raise ValueError(
                f"label_smoothing_factor={args.label_smoothing_factor} is not applied by {name}: its loss defines its "
                "own targets. Set label_smoothing_factor=0 (or smooth inside a loss= module of your own)."
            )
        super().__init__(model=model, args=args, **kwargs)
        _compat.disable_loss_kwargs(self)
        self.group_column: str | None = args.group_column
        self.label_key = self._label_key()
        self.train_labels: np.ndarray | None = None  # read by count_classes when the counts come from them
        self.class_counts = self.count_classes()
        self.train_groups = self._groups_of(self.train_dataset, "training") if self.group_column else None
        self._validation_argument = validation_dataset
        self.validation_dataset: Any = None
        self.validation_counts: list[int] | None = None
        self.validation_groups: np.ndarray | None = None
        self.run_id = uuid.uuid4().hex  # names this run's stage in the model's config (no local path is published)
        self.resumed_from_checkpoint = False
        self._validation_sample: Any = None  # with validation_refresh_per_class: the refreshes' redrawn subset
        self.validation_seconds = 0.0  # wall time of the validation passes of the current refresh
        self._frozen_norms = frozen_norms  # PEFT: BatchNorm layers that keep their statistics while training
        self.posthoc_rule: DecisionRule | None = None  # the last rule fit_posthoc fitted (kept or declined)
        self.decision_rule: DecisionRule | None = None  # a gain-matrix rule evaluation and prediction apply
        self.posthoc_metrics: dict[str, float] | None = None  # eval_dataset metrics of the model with its rule

    # -- set-up shared by every trainer ---------------------------------------------------------------
    def _require_trainable_peft_head(self, name: str, head: torch.nn.Module) -> None:
        """A PEFT model must train its classification head (new classes start from random weights): the head goes in
        the adapter config's ``modules_to_save``, which PEFT adds by itself only for some task types."""
        if not any(p.requires_grad for p in head.parameters()):
            short = name.rsplit(".", 1)[-1]
            raise ValueError(
                f"the classification head {name!r} is frozen in this PEFT model, so its classes would never be "
                f"learned; pass modules_to_save=[{short!r}] in the adapter config (e.g. peft.LoraConfig(..., "
                f"modules_to_save=[{short!r}])) so that the adapter trains and saves a copy of it"
            )

    def _label_key(self) -> str:
        """The batch key of the labels: the one entry of ``label_names`` (``labels`` by default)."""
        names = list(self.label_names or ["labels"])
        if len(names) != 1:
            raise ValueError(
                f"{type(self).__name__} trains a classifier on one label column; label_names={names} "
                "names several. Pass label_names=['<your label column>'] or leave it unset"
            )
        # a forward without a labels argument left label_names empty: the column must be kept. The group column
        # rides along as a second label: kept by remove_unused_columns, and the eval loop hands compute_metrics
        # label_ids = (labels, groups)
        self.label_names = names + ([self.group_column] if self.group_column else [])
        return names[0]

    def _label_columns(self) -> tuple[str, ...]:
        """Dataset columns read as labels: the label key, then the names `Trainer`'s collators rename to it."""
        return tuple(dict.fromkeys((self.label_key, *LABEL_COLUMNS)))

    def _labels_of(self, dataset: Any, what: str) -> np.ndarray:
        labels = dataset_labels(dataset, self._label_columns())
        check_labels(torch.as_tensor(labels), self.num_labels, f"{what} labels")
        return labels

    def _groups_of(self, dataset: Any, what: str) -> np.ndarray:
        """The checked integer group ids of a map-style dataset (``group_column``)."""
        refuse_streams(dataset, f"{type(self).__name__} reads the group of every sample (group_column)")
        return dataset_groups(dataset, self.group_column, what)

    def num_groups(self) -> int:
        """G: one more than the largest group id of the training set and, once chosen, the validation set."""
        seen = [self.train_groups] + ([self.validation_groups] if self.validation_groups is not None else [])
        return int(max(int(g.max()) if g.size else 0 for g in seen)) + 1

    def group_counts(self) -> list[list[int]]:
        """Training samples per (class, group) cell, classes x groups."""
        if self.train_groups is None or self.train_labels is None:
            raise ValueError(f"{type(self).__name__} has no group column: set group_column in the config")
        num_groups = self.num_groups()
        cells = self.train_labels * num_groups + self.train_groups
        counts = np.bincount(cells, minlength=self.num_labels * num_groups)
        return counts.reshape(self.num_labels, num_groups).tolist()

    def count_classes(self) -> list[int]:
        """Training samples per class, from the training labels (kept in ``train_labels``)."""
        if self.train_dataset is None:
            raise ValueError(f"{type(self).__name__} needs a train_dataset: the class counts are read from it")
        refuse_streams(self.train_dataset, f"{type(self).__name__} {self.random_access_reason}")
        self.train_labels = self._labels_of(self.train_dataset, "training")
        return np.bincount(self.train_labels, minlength=self.num_labels).tolist()

    def use_validation_set(self, purpose: str) -> Any:
        """Choose the labelled validation set (validation_dataset=, else eval_dataset) and check it has every class."""
        self.validation_dataset = pick_validation_set(self._validation_argument, self.eval_dataset, purpose)
        labels = self._labels_of(self.validation_dataset, "validation")
        self.validation_counts = counts_with_every_class(labels, self.num_labels, "validation")
        if self.group_column:
            self.validation_groups = self._groups_of(self.validation_dataset, "validation")
        return self.validation_dataset

    def validation_cells(self, purpose: str) -> CellLayout:
        """The (class, group) cells of the validation set (chosen here if not yet), which group objectives range
        over; G counts the training set's groups too."""
        if self.validation_dataset is None:
            self.use_validation_set(purpose)
        labels = self._labels_of(self.validation_dataset, "validation")
        return CellLayout.from_labels(labels, self.validation_groups, self.num_labels, self.num_groups())

    def require_whole_parameters(self, why: str, alternative: str) -> None:
        """Refuse FSDP and DeepSpeed ZeRO-3, which shard the parameters, for a trainer that ``why`` (a phrase)."""
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if getattr(self, "is_fsdp_enabled", False) or (
            getattr(self, "is_deepspeed_enabled", False) and is_deepspeed_zero3_enabled()
        ):
            raise ValueError(
                f"{type(self).__name__} {why}, which FSDP and DeepSpeed ZeRO-3 shard; use DDP (accelerate launch / "
                f"torchrun) or DeepSpeed ZeRO-1/2{alternative}"
            )

    # -- the refresh protocol -------------------------------------------------------------------------
    def schedule_refresh(self, every: int) -> None:
        """Call `refresh` before the first step and every ``every`` optimiser steps (once per trainer)."""
        self.add_callback(PeriodicRefresh(self, every))

    def refresh(self) -> dict[str, float]:
        """Re-estimate what the method learns from validation data; returns scalars to log (same on every rank)."""
        return {}

    def after_refresh(self, control: Any) -> None:
        """Act on the refresh just made, e.g. ``control.should_training_stop = True``; nothing by default."""

    def validation_pass(self, pooled: Any = None, *, with_groups: bool = False) -> tuple[torch.Tensor | None, ...]:
        """(features, logits, labels) of the validation set, gathered over ranks, checked for NaN / inf (with
        ``with_groups``, the group ids fourth); its wall time is added to ``validation_seconds`` (logged with the
        refresh). The validation set is chosen on first use."""
        if self.validation_dataset is None:
            self.use_validation_set("a validation pass")
        started = time.perf_counter()
        try:
            return gathered_validation_pass(
                self, self.refresh_validation_set(), pooled, purpose=f"{self._name} refresh", with_groups=with_groups
            )
        finally:
            self.validation_seconds += time.perf_counter() - started

    def refresh_validation_set(self) -> Any:
        """The validation samples of this refresh: the whole set, or with ``validation_refresh_per_class`` a fresh
        stratified choice (per class, or per cell with a group column), the same on every rank and on resume."""
        per_class = self.args.validation_refresh_per_class
        if per_class is None:
            return self.validation_dataset
        if self._validation_sample is None:
            strata = self._labels_of(self.validation_dataset, "validation")
            if self.validation_groups is not None:
                strata = strata * self.num_groups() + self.validation_groups
            self._validation_sample = StratifiedSample(self.validation_dataset, strata, per_class)
            if len(self._validation_sample) == len(self.validation_dataset):  # no stratum has more than n samples
                self._validation_sample = self.validation_dataset
        if isinstance(self._validation_sample, StratifiedSample):
            self._validation_sample.draw(self.args.seed, self.state.global_step)
        return self._validation_sample

    # -- losses and NaN safety ------------------------------------------------------------------------
    def split_batch(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor | None]:
        """(model inputs, labels, group ids or None) of a batch: the label key and the group column taken out."""
        inputs = dict(inputs)
        if self.label_key not in inputs:
            raise KeyError(
                f"the batch has no {self.label_key!r} entry (its keys: {sorted(inputs)}); the label column "
                f"must be one of {list(self._label_columns())} or named by label_names"
            )
        labels = inputs.pop(self.label_key)
        if not self.group_column:
            return inputs, labels, None
        if self.group_column not in inputs:
            raise KeyError(
                f"the batch has no {self.group_column!r} entry (group_column; its keys: {sorted(inputs)}): a custom "
                "data collator must pass the group column through"
            )
        return inputs, labels, inputs.pop(self.group_column)

    def split_labels(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor]:
        """(model inputs, labels) of a batch, the labels under the trainer's label key (the group column dropped)."""
        inputs, labels, _ = self.split_batch(inputs)
        return inputs, labels

    def evaluation_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool) -> Any:
        """Evaluation / prediction: the plain model's cross-entropy, outputs as a dict when the model gave a tensor."""
        inputs, labels = self.split_labels(inputs)
        outputs = model(**inputs)
        logits = logits_of(outputs)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        if isinstance(outputs, torch.Tensor):
            outputs = {"logits": outputs}
        return (loss, outputs) if return_outputs else loss

    def batch_indices(self) -> list[int] | None:
        """Dataset indices of the current training batch's rows, when the trainer knows them (None otherwise)."""
        return None

    def check_finite_loss(self, loss: torch.Tensor, inputs: dict[str, Any], logits: torch.Tensor | None) -> None:
        """Stop on a NaN / inf training loss (on every rank alike), naming the step and the rows it came from."""
        error = None if bool(torch.isfinite(loss.detach()).all()) else self._loss_error(inputs, logits)
        self.stop_together(error)

    def _loss_error(self, inputs: dict[str, Any], logits: torch.Tensor | None) -> NonFiniteError:
        """What made this process's loss NaN / inf: an input (rows and dataset indices), the logits, or the loss."""
        indices = self.batch_indices()
        causes = [
            f"input {name!r} has NaN or inf in {describe_rows(rows, indices)}"
            for name, rows in bad_input_rows(inputs).items()
        ]
        if not causes and logits is not None:
            rows = torch.nonzero(~torch.isfinite(logits.detach().float().reshape(len(logits), -1)).all(1)).flatten()
            if rows.numel():
                causes.append(
                    f"the logits are NaN or inf in {describe_rows(rows.tolist(), indices)} (the inputs are "
                    "finite: the weights or an activation overflowed; lower the learning rate or use fp32)"
                )
        if not causes:
            causes.append("the loss is NaN or inf with finite logits (check the loss options and the labels)")
        return NonFiniteError(
            f"{type(self).__name__} stopped at training step {self.state.global_step + 1} on process "
            f"{self.args.process_index}: {'; '.join(causes)}. Nothing was saved after the last checkpoint."
        )

    def stop_together(self, error: NonFiniteError | None) -> None:
        """Raise on every rank when any rank hit a NaN / inf (one rank's lone error would leave the others waiting)."""
        failed = error is not None
        if self.args.world_size > 1:
            flag = torch.tensor([float(failed)], device=self.args.device)
            failed = bool(self.accelerator.reduce(flag, reduction="sum")[0] > 0)
        if failed:
            raise error or NonFiniteError(
                f"another process hit a NaN or inf at step {self.state.global_step} (see its error); this process "
                "stops with it. Nothing was saved after the last checkpoint."
            )

    # -- checkpoint state -----------------------------------------------------------------------------
    def method_state(self) -> dict[str, Any]:
        """This trainer's state beyond the model and optimizer (tensors, dicts, lists, JSON scalars)."""
        return {}

    def load_method_state(self, state: dict[str, Any], same_rank: bool) -> None:
        """Restore `method_state`; ``same_rank`` is False when another rank's file stands in (world size changed)."""

    def _state_name(self, rank: int) -> str:
        return f"{self.state_stem}_rank{rank}"

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Refuse to write NaN weights or state over good checkpoints; write this rank's state before the Trainer's."""
        error = None
        for name, param in unwrap(model).named_parameters():
            if param.dtype.is_floating_point and not torch.isfinite(local_part(param).detach()).all():
                error = NonFiniteError(
                    f"the weight {name} holds NaN or inf at step {self.state.global_step}: the "
                    "checkpoint is not written, earlier checkpoints are left as they are"
                )
                break
        self.stop_together(error)  # under FSDP / ZeRO-3 each rank checked only its own shard
        state = {"run_id": self.run_id, "method": self.method_state()}
        check_state_finite(state["method"], f"{type(self).__name__} state at step {self.state.global_step}")
        folder = _compat.checkpoint_folder(self, trial)
        save_state(state, folder, self._state_name(self.args.process_index))
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, **kwargs: Any) -> Any:
        """`Trainer.train`; on resume, this trainer's state in the checkpoint is restored first."""
        if resume_from_checkpoint is True or resume_from_checkpoint == "True":
            resume_from_checkpoint = _compat.get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint found in {self.args.output_dir} to resume from")
        self.resumed_from_checkpoint = bool(resume_from_checkpoint)
        if resume_from_checkpoint:
            state, same_rank = self._read_state(str(resume_from_checkpoint))
            self.run_id = state.get("run_id", self.run_id)
            self.load_method_state(state["method"], same_rank)
        self.remember_base_model()
        hooks = [m.register_forward_pre_hook(_use_running_statistics) for m in self._frozen_norms]  # training only
        try:
            output = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        if self.best_checkpoint_step() is not None:  # what is saved and described must be the best checkpoint's
            _compat.restore_best_weights(self.model, self.state.best_model_checkpoint)
            state, same_rank = self._read_state(self.state.best_model_checkpoint)
            self.load_method_state(state["method"], same_rank)
        self.finish_weights()
        self.record_stage()
        if self.args.posthoc is not None:
            self.fit_posthoc()
        return output

    def finish_weights(self) -> None:
        """Give the model its final weights after training (e.g. an average of them); nothing by default."""

    def _read_state(self, checkpoint: str) -> tuple[dict[str, Any], bool]:
        rank = self.args.process_index
        for candidate, same_rank in ((rank, True), (0, False)):
            name = self._state_name(candidate)
            if state_exists(checkpoint, name) or os.path.exists(os.path.join(checkpoint, name + ".pt")):
                if not same_rank:
                    logger.warning("no state for rank %d in %s (world size changed?): using rank 0's", rank, checkpoint)
                state = load_state(checkpoint, name)
                if "method" not in state:  # a pre-safetensors state: the method's dict itself
                    state = {"method": state}
                return state, same_rank
        raise FileNotFoundError(
            f"{checkpoint} has no {type(self).__name__} state ({self._state_name(rank)}.json); resume from a "
            f"checkpoint written by {type(self).__name__}, or start a new run from the model weights instead"
        )

    # -- the post-hoc decision rule -------------------------------------------------------------------
    def posthoc_objective(self) -> Objective:
        """The objective the post-hoc rule maximises (``posthoc_target`` of the config, with the training counts)."""
        name, options = self.args.posthoc_target()
        return objective_for_training(name, self.num_labels, self.class_counts, **options)

    def fit_posthoc(self, dataset: Any = None, *, kind: str | None = None) -> DecisionRule:
        """Fit a decision rule for the objective on validation logits (gathered over ranks), log the validation
        metrics before and after, apply it (offsets folded into the head's bias, a gain matrix stored in the
        config and used by evaluation and prediction) and record it as a stage for the card."""
        kind = kind or self.args.posthoc or "offsets"
        if dataset is None:
            dataset = (
                self.validation_dataset
                if self.validation_dataset is not None
                else self.use_validation_set("the post-hoc rule")
            )
        else:
            counts_with_every_class(self._labels_of(dataset, "post-hoc"), self.num_labels, "post-hoc")
        self.decision_rule = None  # the rule is fitted on the model's own logits
        _, logits, labels = gathered_validation_pass(self, dataset, purpose="the post-hoc rule")
        logits, labels = logits.cpu(), labels.cpu()
        objective = self.posthoc_objective()
        rule = fit_decision_rule(
            logits,
            labels,
            objective,
            kind=kind,
            folds=self.args.posthoc_folds,
            confidence=self.args.posthoc_confidence,
            seed=self.args.seed,
        )
        if self.args.world_size > 1:  # every rank fitted on the same samples; rank 0's rule is the one kept
            rule = broadcast_object_list([rule])[0]
        logs = {f"posthoc/{key}": value for key, value in rule.estimates.items()}
        for when, predictions in (("before", logits.argmax(1)), ("after", rule.predict(logits))):
            report = classification_report(labels, predictions, self.num_labels, class_counts=self.class_counts)
            logs.update({f"posthoc/{when}_{key}": value for key, value in report.items()})
        self.log({**logs, "posthoc/kept": float(rule.kind != "none")})
        self.posthoc_rule = rule
        model = _compat.base_model_of(unwrap(self.model))
        if rule.kind == "offsets":
            fold_offsets(unwrap(self.model), rule.offsets, root=self.model_wrapped)
        self.decision_rule = rule if rule.kind == "gain_matrix" else None
        setattr(model.config, RULE_ATTRIBUTE, rule.to_dict() if self.decision_rule else None)
        self.record_posthoc_stage(rule, objective, len(labels))
        if self.eval_dataset is not None:
            metrics = self.evaluate()
            self.posthoc_metrics = {k[len("eval_") :]: v for k, v in metrics.items() if k.startswith("eval_")}
        return rule

    def prediction_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Any = None
    ) -> tuple[Any, Any, Any]:
        """`Trainer.prediction_step`; after a gain-matrix rule, the rule's scores (argmax = its class) as logits."""
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if self.decision_rule is None or logits is None:
            return loss, logits, labels
        if isinstance(logits, tuple):
            return loss, (self.decision_rule.scores(logits[0]), *logits[1:]), labels
        return loss, self.decision_rule.scores(logits), labels

    # -- the card's view of this run ------------------------------------------------------------------
    def stage_title(self) -> str:
        """The stage's title in the card."""
        return self._name

    def stage_description(self) -> str | None:
        """One sentence on what the stage did, or None."""
        return None

    def stage_objective(self) -> str | None:
        """The objective the stage optimised (None when it optimised none, or could not move it)."""
        return None

    def card_stage(self) -> dict[str, Any]:
        """This run as a card stage: title, method tag, citations, objective and the settings of its config."""
        stage = {
            "title": self.stage_title(),
            "method": self._name,
            "cite": list(self._paper),
            "tags": list(self._tag_names),
            "objective": self.stage_objective(),
            "description": self.stage_description(),
            "settings": {
                **self.optimisation_settings(),
                **{k: v for k, v in self.args.method_settings().items() if k not in self.unused_settings()},
            },
            "run": self.run_id,
        }
        return stage

    def unused_settings(self) -> set[str]:
        """Config fields that had no effect on this run (left out of the card so it lists only what acted)."""
        return set()

    def optimisation_settings(self) -> dict[str, Any]:
        """The settings every stage reports: steps of the saved weights, global batch, optimiser, schedule, seed."""
        a = self.args
        return {
            "steps": self.saved_step(),
            self.batch_unit: a.per_device_train_batch_size * a.world_size * a.gradient_accumulation_steps,
            "learning_rate": a.learning_rate,
            "optim": str(getattr(a.optim, "value", a.optim)),
            "lr_scheduler_type": str(getattr(a.lr_scheduler_type, "value", a.lr_scheduler_type)),
            "weight_decay": a.weight_decay,
            "label_smoothing_factor": a.label_smoothing_factor or None,
            "seed": a.seed,
        }

    def saved_step(self) -> int:
        """The step of the weights the model holds: the best checkpoint's after `load_best_model_at_end`."""
        best = self.best_checkpoint_step()
        return self.state.global_step if best is None else best

    def best_checkpoint_step(self) -> int | None:
        """The step of the best checkpoint when the Trainer loaded it at the end of training, else None."""
        checkpoint = self.state.best_model_checkpoint
        if not (self.args.load_best_model_at_end and checkpoint):
            return None
        best = getattr(self.state, "best_global_step", None)
        if best:
            return int(best)
        suffix = os.path.basename(os.path.normpath(checkpoint)).rsplit("-", 1)[-1]
        return int(suffix) if suffix.isdigit() else None

    def evaluated_split(self) -> tuple[str, list[int] | None, str | None]:
        """How the card names the eval set the logged metrics come from, its samples per class, and a caveat."""
        if self.eval_dataset is None or isinstance(self.eval_dataset, dict):
            return "evaluation", None, None
        if self.validation_dataset is not None and self.eval_dataset is self.validation_dataset:
            caveat = (
                f"the set {type(self).__name__} estimated on during training, so these numbers are not a held-out "
                "estimate"
            )
            return "validation", self.validation_counts, caveat
        try:
            counts = np.bincount(self._labels_of(self.eval_dataset, "evaluation"), minlength=self.num_labels).tolist()
        except (ValueError, KeyError):
            counts = None
        return "evaluation", counts, None


def _use_running_statistics(module: torch.nn.Module, args: tuple) -> None:
    """Forward pre-hook: this BatchNorm normalises with its running statistics and does not update them."""
    module.train(False)


def frozen_norm_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The BatchNorm layers a PEFT adapter does not train: during training they keep their running statistics (an
    adapter saves only what it trains, so statistics updated by training would be lost at reload and the reloaded
    model would predict differently)."""
    held = [
        m
        for m in unwrap(model).modules()
        if _compat.is_batchnorm(m) and not any(p.requires_grad for p in m.parameters())
    ]
    if held:
        logger.info("PEFT model: %d frozen BatchNorm layers keep their running statistics in training", len(held))
    return held


__all__ = ["BaseTrainer", "PeriodicRefresh", "frozen_norm_layers"]
