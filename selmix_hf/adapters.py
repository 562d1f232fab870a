"""LoRA adapters for the recipes: wrap a classifier with PEFT so that only the adapter and the head train."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .features import find_head, num_labels_of


@dataclass
class AdapterArguments:
    """A LoRA adapter in place of full fine-tuning (``--lora_r`` > 0; needs ``pip install "selmix-hf[peft]"``)."""

    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains the whole model (no adapter)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling alpha (the update is alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch's input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names LoRA adapts; default PEFT's choice for the model type (e.g. query value)."},
    )

    def __post_init__(self) -> None:
        if self.lora_r < 0:
            raise ValueError(f"lora_r must be >= 0 (0: no adapter), got {self.lora_r}")


def head_module_name(model: Any) -> str:
    """The name PEFT's ``modules_to_save`` needs for the classification head: the first path component below
    the model (``classifier`` for ``classifier.out_proj``, ``fc`` for a timm model's ``timm_model.fc``)."""
    path = find_head(model, num_labels_of(model))[0]
    return path.removeprefix("timm_model.").split(".")[0]


def wrap_with_lora(model: Any, adapter: AdapterArguments) -> Any:
    """The model wrapped by a LoRA adapter that also trains (and saves) a copy of the classification head."""
    try:
        import peft
    except ImportError as error:
        raise ImportError('--lora_r needs PEFT: pip install "selmix-hf[peft]"') from error
    text = type(model).__name__.endswith("ForSequenceClassification")
    config = peft.LoraConfig(
        task_type="SEQ_CLS" if text else None,
        r=adapter.lora_r,
        lora_alpha=adapter.lora_alpha,
        lora_dropout=adapter.lora_dropout,
        target_modules=adapter.lora_target_modules,
        modules_to_save=[head_module_name(model)],
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as error:  # no default targets for this model type, or none of the names found
        raise ValueError(
            f"LoRA could not be applied to {type(model).__name__}: {error}. Name the layers to adapt with "
            "--lora_target_modules (e.g. query value for BERT, q_proj v_proj for a transformers ViT, qkv for timm)"
        ) from error


def load_adapter_weights(model: Any, folder: str) -> None:
    """Put a saved adapter's weights (``adapter_model.safetensors`` in ``folder``) into a model wrapped alike."""
    import peft
    from safetensors.torch import load_file

    peft.set_peft_model_state_dict(model, load_file(os.path.join(folder, "adapter_model.safetensors")))


__all__ = ["AdapterArguments", "head_module_name", "load_adapter_weights", "wrap_with_lora"]
