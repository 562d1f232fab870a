"""Confusion-matrix metrics on hand-computed cases, and the compute_metrics factory for Trainer."""

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from selmix_hf import metrics

# counts [[8,2,0],[1,3,0],[0,1,1]]: recalls 0.8, 0.75, 0.5
LABELS = [0] * 10 + [1] * 4 + [2] * 2
PREDS = [0] * 8 + [1] * 2 + [0] + [1] * 3 + [1, 2]


def test_confusion_counts():
    expected = torch.tensor([[8, 2, 0], [1, 3, 0], [0, 1, 1]])
    assert torch.equal(metrics.confusion_counts(LABELS, PREDS, 3), expected)


def test_normalized_confusion_rows_sum_to_prior():
    prior = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    c = metrics.normalized_confusion(metrics.confusion_counts(LABELS, PREDS, 3), prior)
    torch.testing.assert_close(c.sum(1), prior)
    torch.testing.assert_close(metrics.recalls(c), torch.tensor([0.8, 0.75, 0.5], dtype=torch.float64))


def test_uniform_prior_on_balanced_data_is_normalize_all():
    labels = np.repeat(np.arange(4), 5)
    preds = np.random.default_rng(0).integers(0, 4, size=20)
    counts = metrics.confusion_counts(labels, preds, 4)
    torch.testing.assert_close(metrics.normalized_confusion(counts), counts.double() / counts.sum())


def test_report_values_by_hand():
    report = metrics.classification_report(
        LABELS, PREDS, 3, class_counts=[150, 60, 5], per_class=True, class_names=["cat", "dog", "red fox"]
    )
    expected = {
        "accuracy": (0.8 + 0.75 + 0.5) / 3,
        "mean_recall": (0.8 + 0.75 + 0.5) / 3,
        "min_recall": 0.5,
        "g_mean": (0.8 * 0.75 * 0.5) ** (1 / 3),
        "h_mean": 3 / (1 / 0.8 + 1 / 0.75 + 1 / 0.5),
        "min_coverage": 0.5 / 3,
        "head_recall": 0.775,
        "tail_recall": 0.5,
        "min_head_tail_recall": 0.5,
        "many_shot_recall": 0.8,
        "medium_shot_recall": 0.75,
        "few_shot_recall": 0.5,
        "recall_red_fox": 0.5,
        "coverage_cat": (0.8 + 0.25) / 3,
    }
    for key, value in expected.items():
        assert report[key] == pytest.approx(value, abs=1e-12), key


def test_zero_recall_gives_zero_g_and_h_mean():
    report = metrics.classification_report([0, 1, 2], [0, 1, 1], 3)
    assert report["g_mean"] == 0.0 and report["h_mean"] == 0.0 and report["min_recall"] == 0.0


def test_head_tail_split_takes_the_rarest_tenth():
    split = metrics.head_tail_split([5, 900, 40, 700, 3, 80, 60, 500, 20, 10, 400])  # K = 11 -> 2 tail classes
    assert split.tail == (0, 4)
    explicit = metrics.head_tail_split(tail=[1], num_classes=3)
    assert explicit.head == (0, 2)


def test_compute_metrics_for_trainer_returns_scalars():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 4)
    logits = rng.normal(size=(12, 3))
    fn = metrics.make_compute_metrics(3, class_counts=[100, 30, 4])
    out = fn(EvalPrediction(predictions=logits, label_ids=labels))
    assert all(isinstance(v, float) for v in out.values())
    direct = metrics.classification_report(labels, logits.argmax(-1), 3, class_counts=[100, 30, 4])
    assert out == direct
    # models that return (logits, hidden_states) tuples
    assert fn(EvalPrediction(predictions=(logits, np.zeros((12, 2))), label_ids=labels)) == direct


def test_labels_outside_range_are_named():
    with pytest.raises(ValueError, match=r"outside \[0, 3\): \[3, 7\]"):
        metrics.confusion_counts([0, 3, 7], [0, 1, 2], 3)


def test_missing_class_in_evaluation_data_is_an_error():
    with pytest.raises(ValueError, match=r"classes \[2\] have no sample"):
        metrics.normalized_confusion(metrics.confusion_counts([0, 1, 1], [0, 1, 2], 3))


def test_bad_prior_is_an_error():
    with pytest.raises(ValueError, match="sum to 1"):
        metrics.normalized_confusion(torch.eye(2), class_prior=[0.5, 0.6])
