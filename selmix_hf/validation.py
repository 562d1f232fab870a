"""What the trainers share: the gathered validation pass, periodic refreshes, and extra state in checkpoints."""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from collections.abc import Sized
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import Trainer, TrainerCallback

from . import _compat
from .data import dataset_labels
from .features import PooledFeatures, unwrap
from .metrics import check_labels

logger = logging.getLogger(__name__)


def pick_validation_set(validation_dataset: Any, eval_dataset: Any, purpose: str) -> Any:
    """The labelled validation set a trainer estimates on (validation_dataset, else eval_dataset), checked."""
    dataset = validation_dataset if validation_dataset is not None else eval_dataset
    if dataset is None:
        raise ValueError(f"{purpose} needs a labelled validation set: pass validation_dataset= or eval_dataset=")
    if isinstance(dataset, dict):
        raise ValueError("eval_dataset is a dict of datasets; pass the one to estimate on as validation_dataset=")
    if not isinstance(dataset, Sized) or len(dataset) == 0:
        raise ValueError(f"the validation set is empty; {purpose} needs every class in it")
    return dataset


def check_every_class(dataset: Any, num_labels: int, what: str) -> np.ndarray:
    """Labels of a dataset, after checking they lie in [0, num_labels) and cover every class."""
    labels = dataset_labels(dataset)
    check_labels(torch.as_tensor(labels), num_labels, f"{what} labels")
    missing = np.flatnonzero(np.bincount(labels, minlength=num_labels) == 0).tolist()
    if missing:
        raise ValueError(
            f"classes {missing[:20]} have no sample in the {what} set; every class is needed there (its recall, "
            "its prototype). Build the split with selmix_hf.data.balanced_split."
        )
    return labels


def require_whole_head(trainer: Trainer, purpose: str) -> None:
    """Refuse sharded parameters (FSDP, DeepSpeed ZeRO-3): the head's weights are read whole between steps."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if getattr(trainer, "is_fsdp_enabled", False) or (getattr(trainer, "is_deepspeed_enabled", False)
                                                      and is_deepspeed_zero3_enabled()):
        raise ValueError(
            f"{purpose} reads the classifier head's full weights between steps, which FSDP and DeepSpeed ZeRO-3 "
            "shard; use DDP (accelerate launch / torchrun) or DeepSpeed ZeRO-1/2"
        )


def gathered_validation_pass(
    trainer: Trainer, dataset: Any, pooled: PooledFeatures | None = None
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(pooled features or None, logits, labels) of a whole dataset in eval mode, gathered across processes.

    `gather_for_metrics` inside the loop drops the duplicates that pad the last round, so every rank ends with
    the same tensors and every sample counted once.
    """
    cache = trainer.__dict__.setdefault("_validation_loaders", {})
    if id(dataset) not in cache:
        cache[id(dataset)] = _compat.validation_dataloader(trainer, dataset)
    loader = cache[id(dataset)]
    model = unwrap(trainer.model)
    was_training = model.training
    model.eval()
    features, logits, labels = [], [], []
    capture = pooled.capture() if pooled is not None else nullcontext()
    with torch.no_grad(), capture:
        for batch in loader:
            batch = _compat.prepare_inputs(trainer, batch)
            batch_labels = batch.pop("labels")
            with trainer.compute_loss_context_manager():
                batch_logits = model(**batch).logits
            batch_features = pooled.captured.float() if pooled is not None else batch_logits.new_zeros(len(batch_labels), 0)
            gathered = trainer.accelerator.gather_for_metrics((batch_features, batch_logits.float(), batch_labels))
            for store, tensor in zip((features, logits, labels), gathered):
                store.append(tensor)
    model.train(was_training)
    return (torch.cat(features) if pooled is not None else None), torch.cat(logits), torch.cat(labels).long()


class PeriodicRefresh(TrainerCallback):
    """Calls ``trainer.refresh()`` before the first step (unless resuming) and every ``every`` optimiser steps.

    The refresh's dict is logged without clearing the Trainer's own pending log of that step (`log` resets
    `should_log`), and ``trainer.after_refresh(control)`` may then ask to stop.
    """

    def __init__(self, trainer: Any, every: int) -> None:
        self.trainer, self.every = trainer, every

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.trainer.resumed_from_checkpoint:
            self._log(self.trainer.refresh(), control)
            self.trainer.after_refresh(control)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.every or state.global_step >= state.max_steps:
            return
        self._log(self.trainer.refresh(), control)
        self.trainer.after_refresh(control)

    def _log(self, logs: dict[str, float], control: Any) -> None:
        if not logs:
            return
        should_log = control.should_log
        self.trainer.log(logs)
        control.should_log = self.trainer.control.should_log = should_log


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class CheckpointedState:
    """Trainer mixin: a per-rank state file written atomically into each checkpoint, restored on resume.

    The file is written before the Trainer's own files, so `trainer_state.json` (written last) marks a
    complete checkpoint. Subclasses define ``extra_state_dict`` and ``load_extra_state_dict(state, same_rank)``.
    """

    state_file: ClassVar[str] = "extra_state_rank{rank}.pt"
    resumed_from_checkpoint: bool = False

    def extra_state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_extra_state_dict(self, state: dict[str, Any], same_rank: bool) -> None:
        raise NotImplementedError

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        folder = _compat.checkpoint_folder(self, trial)
        os.makedirs(folder, exist_ok=True)
        atomic_save(self.extra_state_dict(), os.path.join(folder, self.state_file.format(rank=self.args.process_index)))
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, **kwargs: Any) -> Any:
        """`Trainer.train`; on resume, this trainer's state in the checkpoint is restored first."""
        if resume_from_checkpoint is True or resume_from_checkpoint == "True":
            resume_from_checkpoint = _compat.get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint found in {self.args.output_dir} to resume from")
        self.resumed_from_checkpoint = bool(resume_from_checkpoint)
        if resume_from_checkpoint:
            self.load_extra_state_dict(*self._read_state(str(resume_from_checkpoint)))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _read_state(self, checkpoint: str) -> tuple[dict[str, Any], bool]:
        rank = self.args.process_index
        path = os.path.join(checkpoint, self.state_file.format(rank=rank))
        if os.path.exists(path):
            return torch.load(path, weights_only=False), True
        first = os.path.join(checkpoint, self.state_file.format(rank=0))
        if not os.path.exists(first):
            raise FileNotFoundError(
                f"{checkpoint} has no {type(self).__name__} state ({self.state_file.format(rank=rank)}); resume from a "
                f"checkpoint written by {type(self).__name__}, or start a new run from the model weights instead"
            )
        logger.warning("no state for rank %d in %s (world size changed?): using rank 0's", rank, checkpoint)
        return torch.load(first, weights_only=False), False
