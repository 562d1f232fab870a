"""Tiny models built from configs, and tiny datasets for them: the shared fixtures of the trainer tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    ConvNextConfig,
    ConvNextForImageClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DeiTConfig,
    DeiTForImageClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    RobertaConfig,
    RobertaForSequenceClassification,
    SwinConfig,
    SwinForImageClassification,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.modeling_outputs import SequenceClassifierOutput

NUM_LABELS = 3
VOCAB, SEQ, IMAGE = 64, 8, 16
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=32,
    num_labels=NUM_LABELS,
)
VISION = dict(
    image_size=IMAGE,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    num_labels=NUM_LABELS,
)


@dataclass
class Arch:
    """One supported architecture: how to build it, its input kind, an independent reference for the pooled feature."""

    name: str
    build: Callable[[], nn.Module]
    kind: str  # "text" or "image"
    pooled: Callable[[nn.Module, dict], torch.Tensor]
    head: str  # expected dotted path of the final linear layer


def _first_token(out) -> torch.Tensor:
    return out.last_hidden_state[:, 0]


ARCHITECTURES = [
    Arch(
        "bert",
        lambda: BertForSequenceClassification(BertConfig(**TEXT)),
        "text",
        lambda m, x: m.bert(**x).pooler_output,
        "classifier",
    ),
    Arch(
        "roberta",
        lambda: RobertaForSequenceClassification(RobertaConfig(**{**TEXT, "max_position_embeddings": 40})),
        "text",
        lambda m, x: torch.tanh(m.classifier.dense(_first_token(m.roberta(**x)))),
        "classifier.out_proj",
    ),
    Arch(
        "distilbert",
        lambda: DistilBertForSequenceClassification(
            DistilBertConfig(
                vocab_size=VOCAB,
                dim=16,
                n_layers=1,
                n_heads=2,
                hidden_dim=32,
                max_position_embeddings=32,
                num_labels=NUM_LABELS,
            )
        ),
        "text",
        lambda m, x: torch.relu(m.pre_classifier(_first_token(m.distilbert(**x)))),
        "classifier",
    ),
    Arch(
        "deberta-v2",
        lambda: DebertaV2ForSequenceClassification(DebertaV2Config(**TEXT)),
        "text",
        lambda m, x: m.pooler(m.deberta(**x).last_hidden_state),
        "classifier",
    ),
    Arch(
        "vit",
        lambda: ViTForImageClassification(ViTConfig(**VISION, patch_size=8)),
        "image",
        lambda m, x: _first_token(m.vit(**x)),
        "classifier",
    ),
    Arch(
        "deit",
        lambda: DeiTForImageClassification(DeiTConfig(**VISION, patch_size=8)),
        "image",
        lambda m, x: _first_token(m.deit(**x)),
        "classifier",
    ),
    Arch(
        "swin",
        lambda: SwinForImageClassification(
            SwinConfig(
                image_size=IMAGE,
                patch_size=4,
                embed_dim=8,
                depths=[1],
                num_heads=[1],
                window_size=2,
                num_labels=NUM_LABELS,
            )
        ),
        "image",
        lambda m, x: m.swin(**x).pooler_output,
        "classifier",
    ),
    Arch(
        "convnext",
        lambda: ConvNextForImageClassification(
            ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=NUM_LABELS)
        ),
        "image",
        lambda m, x: m.convnext(**x).pooler_output,
        "classifier",
    ),
    Arch(
        "timm-resnet",
        lambda: TimmWrapperForImageClassification(TimmWrapperConfig(architecture="resnet10t", num_labels=NUM_LABELS)),
        "image",
        lambda m, x: m.timm_model.forward_head(m.timm_model.forward_features(x["pixel_values"]), pre_logits=True),
        "timm_model.fc",
    ),
]


def model_inputs(kind: str, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if kind == "text":
        return {
            "input_ids": torch.randint(3, VOCAB, (batch, SEQ), generator=gen),
            "attention_mask": torch.ones(batch, SEQ, dtype=torch.long),
        }
    return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=gen)}


class ListDataset(torch.utils.data.Dataset):
    """A map-style dataset of example dicts."""

    def __init__(self, examples: list[dict]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def class_signal_dataset(kind: str, counts: list[int], seed: int = 0) -> ListDataset:
    """Examples whose class is visible in the input (first token / a bright image channel), with given class counts."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for label, count in enumerate(counts):
        for _ in range(count):
            if kind == "text":
                ids = torch.randint(3 + NUM_LABELS, VOCAB, (SEQ,), generator=gen)
                ids[0] = 3 + label
                example = {"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long)}
            else:
                pixels = torch.randn(3, IMAGE, IMAGE, generator=gen) * 0.5
                pixels[label % 3] += 1.0
                example = {"pixel_values": pixels}
            examples.append({**example, "labels": label})
    return ListDataset(examples)


# -- a tiny MLP classifier on vector inputs, for the learning / equivalence tests -----------------


class TinyMLPConfig(PretrainedConfig):
    model_type = "tiny-mlp"

    def __init__(self, input_dim: int = 8, hidden_dim: int = 24, num_labels: int = 4, **kwargs) -> None:
        super().__init__(num_labels=num_labels, **kwargs)
        self.input_dim, self.hidden_dim = input_dim, hidden_dim


class TinyMLPForClassification(PreTrainedModel):
    """features -> Linear -> ReLU -> Linear(num_labels): the head is found by the generic fallback."""

    config_class = TinyMLPConfig

    def __init__(self, config: TinyMLPConfig) -> None:
        super().__init__(config)
        self.body = nn.Sequential(nn.Linear(config.input_dim, config.hidden_dim), nn.ReLU())
        self.classifier = nn.Linear(config.hidden_dim, config.num_labels)
        self.post_init()

    def get_input_embeddings(self) -> None:
        """No embedding table (FSDP2's accelerate preparation asks for one to shard on its own)."""
        return None

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        logits = self.classifier(self.body(features))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def gaussian_problem(
    counts: list[int], seed: int, dim: int = 8, spread: float = 1.0, means_seed: int = 0
) -> ListDataset:
    """Gaussian classes around fixed means (means_seed), sampled with the given per-class counts."""
    means = torch.randn(len(counts), dim, generator=torch.Generator().manual_seed(means_seed)) * spread
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for label, count in enumerate(counts):
        for x in means[label] + torch.randn(count, dim, generator=gen):
            examples.append({"features": x, "labels": label})
    return ListDataset(examples)


def grouped_gaussian_problem(cell_counts: list[list[int]], seed: int, dim: int = 8, shift: float = 1.5) -> ListDataset:
    """Gaussian classes (means of `gaussian_problem`) whose samples also carry a group id that shifts the features
    (a spurious direction per group): cell_counts[k][g] samples of class k in group g."""
    means = torch.randn(len(cell_counts), dim, generator=torch.Generator().manual_seed(0))
    directions = torch.randn(len(cell_counts[0]), dim, generator=torch.Generator().manual_seed(99))
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for label, row in enumerate(cell_counts):
        for group, count in enumerate(row):
            for x in means[label] + shift * directions[group] + torch.randn(count, dim, generator=gen):
                examples.append({"features": x, "labels": label, "group": group})
    return ListDataset(examples)


def per_class_recall(model: nn.Module, dataset: ListDataset, num_labels: int) -> np.ndarray:
    """Per-class recall of a model on a dataset of {"features", "labels"}."""
    x = torch.stack([e["features"] for e in dataset.examples])
    y = torch.tensor([e["labels"] for e in dataset.examples])
    model.eval()
    with torch.no_grad():
        pred = model(features=x).logits.argmax(1)
    return np.array([(pred[y == k] == k).float().mean().item() for k in range(num_labels)])


def two_cpu_ranks(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run a test file's ``__main__`` as two gloo ranks under torchrun, one OpenMP thread each.

    Fresh processes, not forks: forking a pytest process whose OpenMP pool already ran can deadlock the children.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a crashing rank prints its stacks
    return subprocess.run(command, timeout=600, env=env, capture_output=True, text=True)


def run_rank(main: Callable[..., Any], *args: str) -> None:
    """Run one launched rank's body, then leave without interpreter finalisation: exit 0 on success, 1 on error.

    torch's gloo worker threads can abort a finished rank ("terminate called without an active exception") when
    they meet Python's finalisation; a rank whose results are written has nothing left to clean up, so after the
    recipes' ``end_launch`` (barrier, ``destroy_process_group``) it exits at once. Errors print their traceback and
    skip the barrier.
    """
    import traceback

    from selmix_hf.recipe import end_launch

    code = 0
    try:
        main(*args)
        end_launch()
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def attention_names(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """LoRA targets as this transformers release names them (ViT's q_proj / v_proj were query / value before 5.x)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    renamed = {"q_proj": "query", "v_proj": "value"}
    return [t if t in names else renamed.get(t, t) for t in targets]


def pretend_fsdp(monkeypatch: Any) -> None:
    """Trainers built in this test see an FSDP accelerator (their start-up checks read ``is_fsdp_enabled``)."""
    from transformers import Trainer

    original = Trainer.create_accelerator_and_postprocess

    def create(self: Trainer) -> None:
        original(self)
        self.is_fsdp_enabled = True

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", create)


def fsdp_on_cpu_ranks() -> None:
    """Let this process's trainers shard with FSDP on CPU gloo ranks (accelerate enables FSDP on GPU runs only).

    The accelerator state is told MULTI_GPU just before it picks its engine, so that it takes the FSDP branch; the
    device (cpu) and backend (gloo) are already fixed by then. For launched test processes only.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType
    from transformers import Trainer

    original = Trainer.create_accelerator_and_postprocess

    def create(self: Trainer) -> None:
        _ = self.args.device  # builds the process state: MULTI_CPU over gloo
        if PartialState._shared_state.get("distributed_type") == DistributedType.MULTI_CPU:
            PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
        original(self)

    Trainer.create_accelerator_and_postprocess = create
