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
    "PREFIX_CHECKPOINT_DIR",
    "base_model_of",
    "checkpoint_folder",
    "classifier_classes",
    "disable_loss_kwargs",
    "drop_unused_columns",
    "get_last_checkpoint",
    "is_batchnorm",
    "is_headless",
    "is_peft_model",
    "peft_active_copy",
    "peft_base_model_name",
    "peft_inactive_modules",
    "prepare_inputs",
    "restore_best_weights",
]


def checkpoint_folder(trainer: Trainer, trial: Any) -> str:
    """The folder `Trainer._save_checkpoint` is about to write for the current step."""
    return os.path.join(trainer._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}")


def prepare_inputs(trainer: Trainer, batch: dict[str, Any]) -> dict[str, Any]:
    """Move a collated batch to the trainer's device the way `training_step` does."""
    return trainer._prepare_inputs(batch)


def drop_unused_columns(trainer: Trainer, dataset: Any, collator: Callable, description: str) -> tuple[Any, Callable]:
    """Drop the columns the model's forward does not take (honours `remove_unused_columns`)."""
    if isinstance(dataset, datasets.Dataset):
        return trainer._remove_unused_columns(dataset, description=description), collator
    return dataset, trainer._get_collator_with_removed_columns(collator, description=description)


def model_input_columns(trainer: Trainer) -> set[str] | None:
    """The dataset columns the Trainer keeps for the model (its forward's arguments and the label names), or None
    when ``remove_unused_columns=False`` keeps every column."""
    if not trainer.args.remove_unused_columns:
        return None
    trainer._set_signature_columns_if_needed()
    return set(trainer._signature_columns)


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


def classifier_classes(model_type: str | None) -> list[str]:
    """The transformers classifier classes (text, image) of a model type, e.g. ['BertForSequenceClassification']."""
    from transformers.models.auto import modeling_auto

    if not model_type:
        return []
    found = [
        mapping.get(model_type)
        for mapping in (
            modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
            modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        )
    ]
    return [name for name in found if name]


def is_headless(model: Any) -> bool:
    """Whether the model is a transformers base model (``AutoModel`` class: hidden states out, no classifier)."""
    from transformers.models.auto import modeling_auto

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return bool(model_type) and modeling_auto.MODEL_MAPPING_NAMES.get(model_type) == type(model).__name__


def is_batchnorm(module: Any) -> bool:
    """Whether a module is a BatchNorm layer of any dimension (torch's shared base class is private)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return isinstance(module, _BatchNorm)


def _peft_model_class() -> type | None:
    try:
        from peft import PeftModel
    except Exception:  # noqa: BLE001 - not installed, or a release that does not import beside this transformers
        return None
    return PeftModel


def base_model_of(model: Any) -> Any:
    """The transformers model inside a PEFT adapter model (the model itself when it is not one)."""
    peft_class = _peft_model_class()
    if peft_class is not None and isinstance(model, peft_class):
        return model.get_base_model()
    return model


def is_peft_model(model: Any) -> bool:
    """Whether the model is a PEFT adapter model."""
    peft_class = _peft_model_class()
    return peft_class is not None and isinstance(model, peft_class)


def _peft_copy_wrappers(model: Any) -> list[Any]:
    """The `ModulesToSaveWrapper`s in a model (modules PEFT trains as a copy, e.g. a classifier head)."""
    try:
        from peft.utils.other import ModulesToSaveWrapper
    except Exception:  # noqa: BLE001 - not installed, or a release without it
        return []
    return [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]


def peft_active_copy(module: Any) -> Any:
    """The module a PEFT `ModulesToSaveWrapper` runs in forward: the active adapter's copy (the original when
    adapters are disabled); any other module is returned as is."""
    if module not in _peft_copy_wrappers(module):
        return module
    adapters = list(module.active_adapters)
    if module.disable_adapters or not adapters or adapters[0] not in module.modules_to_save:
        return module.original_module
    return module.modules_to_save[adapters[0]]


def peft_inactive_modules(model: Any) -> set[int]:
    """ids of the modules inside PEFT copy wrappers that forward does not run (the original, other adapters')."""
    inactive: set[int] = set()
    for wrapper in _peft_copy_wrappers(model):
        active = peft_active_copy(wrapper)
        for child in wrapper.children():
            for branch in [child] if child is not wrapper.modules_to_save else list(child.values()):
                if branch is not active:
                    inactive.update(id(m) for m in branch.modules())
    return inactive


def peft_base_model_name(model: Any) -> str | None:
    """The checkpoint a PEFT adapter model was built on (None when unknown or when the model is not a PEFT model)."""
    peft_class = _peft_model_class()
    if peft_class is None or not isinstance(model, peft_class):
        return None
    config = model.peft_config.get(model.active_adapter) if hasattr(model, "peft_config") else None
    return getattr(config, "base_model_name_or_path", None) or None


def restore_best_weights(model: Any, checkpoint: str) -> None:
    """Reload the best checkpoint's weights through `from_pretrained`, which applies the checkpoint conversions.

    `Trainer._load_best_model` loads the state dict as saved; when a transformers release lays a model out
    differently in memory than on disk (ViT's attention in 5.24: ``encoder.layer.0.attention.attention.query`` on
    disk, ``layers.0.attention.q_proj`` in memory), it misses those weights and the model keeps the last step's.
    """
    from transformers import PreTrainedModel

    inner = model
    while hasattr(inner, "module") and not isinstance(inner, PreTrainedModel):
        inner = inner.module
    if not isinstance(inner, PreTrainedModel) or is_peft_model(inner):
        return
    loaded = type(inner).from_pretrained(checkpoint)
    inner.load_state_dict(loaded.state_dict(), strict=True)
