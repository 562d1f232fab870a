"""Head finding and the pooled-feature hook, table-driven over the supported architectures."""

import pytest
import torch
from tiny import ARCHITECTURES, NUM_LABELS, model_inputs
from torch import nn

from selmix_hf.features import HEAD_PATHS, PooledFeatures, find_head, register_head


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.name)
def test_captured_feature_is_what_the_classifier_consumes(arch):
    torch.manual_seed(0)
    model = arch.build().eval()
    name, head = find_head(model)
    assert name == arch.head
    inputs = model_inputs(arch.kind, 3)
    pooled = PooledFeatures(head)
    with torch.no_grad(), pooled.capture():
        logits = model(**inputs).logits
        reference = arch.pooled(model, inputs)
    torch.testing.assert_close(pooled.captured, reference)
    torch.testing.assert_close(head(pooled.captured), logits)
    pooled.remove()


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.name)
def test_mixing_replaces_the_head_input_by_the_mixed_halves(arch):
    torch.manual_seed(0)
    model = arch.build().eval()
    _, head = find_head(model)
    inputs = model_inputs(arch.kind, 4)
    pooled = PooledFeatures(head)
    lam = torch.tensor([0.9, 0.6])
    with torch.no_grad():
        with pooled.capture():
            model(**inputs)
        features = pooled.captured
        with pooled.mixing(lam):
            mixed_logits = model(**inputs).logits
    expected = head(lam[:, None] * features[:2] + (1 - lam[:, None]) * features[2:])
    torch.testing.assert_close(mixed_logits, expected)


class NoHeadModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"num_labels": 5})()
        self.body = nn.Linear(4, 7)


def test_model_without_a_findable_head_is_a_clear_error():
    with pytest.raises(ValueError, match=r"NoHeadModel.*register_head\('NoHeadModel'"):
        find_head(NoHeadModel())


def test_registered_head_is_used():
    model = NoHeadModel()
    model.scores = nn.Linear(7, 5)
    model.aux = nn.Linear(7, 5)
    try:
        register_head(NoHeadModel, "scores")
        assert find_head(model)[0] == "scores"
    finally:
        HEAD_PATHS.pop("NoHeadModel")
    assert find_head(model)[0] == "aux"  # fallback: the last Linear with num_labels outputs


def test_teacher_model_is_refused_with_the_alternative():
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    model = DeiTForImageClassificationWithTeacher(
        DeiTConfig(
            image_size=16,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=NUM_LABELS,
        )
    )
    with pytest.raises(ValueError, match="DeiTForImageClassification instead"):
        find_head(model)


def test_wrong_batch_for_mixing_is_an_error():
    head = nn.Linear(4, 3)
    pooled = PooledFeatures(head)
    with pooled.mixing(torch.tensor([0.7, 0.8])), pytest.raises(RuntimeError, match=r"\(2 x 2, dim\)"):
        head(torch.randn(3, 4))


def test_the_head_fallback_warns_which_layer_it_picked_among_several(caplog):
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.aux = nn.Linear(8, NUM_LABELS)
            self.body = nn.Linear(8, 8)
            self.out = nn.Linear(8, NUM_LABELS)

    with caplog.at_level("WARNING", logger="selmix_hf.features"):
        name, _ = find_head(TwoHeads(), NUM_LABELS)
    assert name == "out"
    message = caplog.records[-1].getMessage()
    assert "'aux', 'out'" in message and "using the last, 'out'" in message and "register_head" in message


def test_one_candidate_head_needs_no_warning(caplog):
    with caplog.at_level("WARNING", logger="selmix_hf.features"):
        find_head(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, NUM_LABELS)), NUM_LABELS)
    assert not caplog.records
