"""Every use of transformers' private names, in one place, so a release that moves them is fixed here."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import datasets
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

__all__ = ["PREFIX_CHECKPOINT_DIR", "get_last_checkpoint", "checkpoint_folder", "prepare_inputs", "drop_unused_columns"]


def checkpoint_folder(trainer: Trainer, trial: Any) -> str:
    """The folder `Trainer._save_checkpoint` is about to write for the current step."""
    return os.path.join(trainer._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}")


def prepare_inputs(trainer: Trainer, batch: dict[str, Any]) -> dict[str, Any]:
    """Move a collated batch to the trainer's device the way `training_step` does."""
    return trainer._prepare_inputs(batch)


def drop_unused_columns(
    trainer: Trainer, dataset: Any, collator: Callable, description: str
) -> tuple[Any, Callable]:
    """Drop the columns the model's forward does not take (honours `remove_unused_columns`)."""
    if isinstance(dataset, datasets.Dataset):
        return trainer._remove_unused_columns(dataset, description=description), collator
    return dataset, trainer._get_collator_with_removed_columns(collator, description=description)
