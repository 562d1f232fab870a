"""PEFT adapters in every trainer: LoRA on a BERT, a ViT and a timm model, the head trained as the adapter's copy."""

from __future__ import annotations

import os
import sys

import pytest
import torch

peft = pytest.importorskip("peft")

sys.path.insert(0, os.path.dirname(__file__))
from test_contract import SUBJECTS, build  # noqa: E402
from tiny import ARCHITECTURES, NUM_LABELS, attention_names, class_signal_dataset, model_inputs  # noqa: E402

from selmix_hf import find_head  # noqa: E402

TRAINERS = [s for s in SUBJECTS if s.name in ("selmix", "longtail-cost-sensitive", "autobalance")]
# architecture -> (LoRA target modules, the head's name for modules_to_save; None: the task type adds it)
LORA = {
    "bert": (["query", "value"], None),
    "vit": (["q_proj", "v_proj"], ["classifier"]),
    "timm-resnet": (["conv2"], ["fc"]),
}


def lora_model(arch_name: str, folder: str, modules_to_save: list[str] | None | bool = True) -> torch.nn.Module:
    """A LoRA adapter over a tiny classifier saved in ``folder`` (so the adapter names a base that loads offline)."""
    arch = next(a for a in ARCHITECTURES if a.name == arch_name)
    torch.manual_seed(0)
    arch.build().save_pretrained(folder)
    base = type(arch.build()).from_pretrained(folder)
    targets, head = LORA[arch_name]
    targets = attention_names(base, targets)
    task = "SEQ_CLS" if arch.kind == "text" else None
    config = peft.LoraConfig(
        task_type=task, r=4, lora_alpha=8, target_modules=targets, modules_to_save=head if modules_to_save else None
    )
    return peft.get_peft_model(base, config)


def data(arch_name: str) -> tuple:
    kind = next(a for a in ARCHITECTURES if a.name == arch_name).kind
    return class_signal_dataset(kind, [24, 12, 6], seed=1), class_signal_dataset(kind, [6, 6, 6], seed=2), kind


def wrapper_of(model: torch.nn.Module):
    """The PEFT ModulesToSaveWrapper around the classification head."""
    return next(m for m in model.modules() if type(m).__name__ == "ModulesToSaveWrapper")


@pytest.mark.parametrize("arch", list(LORA))
@pytest.mark.parametrize("subject", TRAINERS, ids=[s.name for s in TRAINERS])
def test_a_lora_model_trains_saves_and_reloads_in_every_trainer(arch, subject, tmp_path):
    model = lora_model(arch, str(tmp_path / "base"))
    train, validation, kind = data(arch)
    wrapper = wrapper_of(model)
    original = {k: v.clone() for k, v in wrapper.original_module.state_dict().items()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    name, head = find_head(model, NUM_LABELS)
    assert head is peft_copy(wrapper) and "modules_to_save" in name  # the copy forward runs, not the original
    before = {k: v.clone() for k, v in head.state_dict().items()}
    out = str(tmp_path / "run")
    trainer = build(subject, out, model=model, train=train, validation=validation, max_steps=3)
    trainer.train()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == trainable  # every trainable parameter, and nothing frozen
    assert any(not torch.equal(before[k], v) for k, v in head.state_dict().items())  # the copy learned
    for key, value in wrapper.original_module.state_dict().items():
        assert torch.equal(original[key], value), f"the original head changed: {key}"
    for name_, param in model.named_parameters():
        if name_ in frozen:
            assert torch.equal(frozen[name_], param.detach()), f"a frozen weight changed: {name_}"
    trainer.save_model(out)
    saved = set(os.listdir(out))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= saved and "model.safetensors" not in saved
    fresh = lora_model(arch, str(tmp_path / "base2")).get_base_model()
    fresh = type(fresh).from_pretrained(str(tmp_path / "base"))
    reloaded = peft.PeftModel.from_pretrained(fresh, out).eval()
    model.eval()
    inputs = model_inputs(kind, 5, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)
    if kind == "text":
        auto = peft.AutoPeftModelForSequenceClassification.from_pretrained(out).eval()
        with torch.no_grad():
            torch.testing.assert_close(auto(**inputs).logits, model(**inputs).logits)
    trainer.create_model_card()
    with open(os.path.join(out, "README.md")) as fh:
        card = fh.read()
    assert "library_name: peft" in card and "PEFT adapter" in card
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if norms:  # held at their loaded statistics while training only: afterwards the model is the user's again
        statistics = [m.running_mean.clone() for m in norms]
        model.train()
        with torch.no_grad():
            model(**model_inputs(kind, 4, seed=3))
        assert any(not torch.equal(s, m.running_mean) for s, m in zip(statistics, norms))


def peft_copy(wrapper) -> torch.nn.Module:
    return wrapper.modules_to_save[wrapper.active_adapters[0]]


def test_the_gain_matrix_reads_the_adapters_head_copy_not_the_original(tmp_path):
    model = lora_model("bert", str(tmp_path / "base"))
    train, validation, _ = data("bert")
    trainer = build(TRAINERS[0], str(tmp_path / "run"), model=model, train=train, validation=validation, max_steps=1)
    trainer.train()
    gains = trainer.refresh() and trainer.gains.clone()
    wrapper = wrapper_of(model)
    with torch.no_grad():
        wrapper.original_module.weight.mul_(-3.0)
        wrapper.original_module.bias.add_(5.0)
    trainer.refresh()
    torch.testing.assert_close(trainer.gains, gains)  # the original head is not what forward runs: no effect
    with torch.no_grad():
        peft_copy(wrapper).bias.add_(torch.tensor([2.0, 0.0, -2.0]))
    trainer.refresh()
    assert not torch.allclose(trainer.gains, gains)  # the copy is


def test_a_peft_model_whose_head_is_frozen_is_refused_with_the_fix(tmp_path):
    model = lora_model("timm-resnet", str(tmp_path / "base"), modules_to_save=False)
    train, validation, _ = data("timm-resnet")
    for subject in TRAINERS:
        with pytest.raises(ValueError, match=r"head 'timm_model\.fc' is frozen.*modules_to_save=\['fc'\]"):
            build(subject, str(tmp_path / subject.name), model=model, train=train, validation=validation)
