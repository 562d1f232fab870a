"""Every use of transformers' private names, in one place, so a release that moves them is fixed here."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import datasets
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

__all__ = [
    "PREFIX_CHECKPOINT_DIR", "checkpoint_folder", "disable_loss_kwargs", "drop_unused_columns", "get_last_checkpoint",
    "prepare_inputs",
]


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


def disable_loss_kwargs(trainer: Trainer) -> None:
    """Make the Trainer divide our per-micro-batch mean loss by the accumulation steps, on every 5.x release.

    `loss_is_scaled_for_ga` only exists from transformers 5.19; before it, a model whose forward takes **kwargs
    (the BERT family) made the Trainer skip that division. Without loss kwargs it divides on every version.
    """
    trainer.model_accepts_loss_kwargs = False


def validation_dataloader(trainer: Trainer, dataset: Any) -> DataLoader:
    """A sequential, never-truncated loader over a validation set, prepared for gather_for_metrics.

    Not `get_eval_dataloader`: that one may be cached under the same key as the user's eval set and follows
    `dataloader_drop_last`, which would drop validation samples.
    """
    dataset, collator = drop_unused_columns(trainer, dataset, trainer.data_collator, "validation")
    loader = DataLoader(
        dataset,
        batch_size=trainer.args.eval_batch_size,
        shuffle=False,
        drop_last=False,
        collate_fn=collator,
        num_workers=trainer.args.dataloader_num_workers,
        pin_memory=trainer.args.dataloader_pin_memory,
    )
    return trainer.accelerator.prepare(loader)
