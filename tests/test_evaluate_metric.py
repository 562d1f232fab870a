"""The metrics as an `evaluate` module: loaded offline from the package, the same numbers as compute_metrics."""

import evaluate
import numpy as np
import pytest
from transformers import EvalPrediction

from selmix_hf import make_compute_metrics, metric_path


def predictions(seed: int = 0, n: int = 300, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    return labels, np.where(rng.random(n) < 0.6, labels, rng.integers(0, k, n))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"class_counts": [500, 200, 60, 20, 5]},
        {"class_counts": [500, 200, 60, 20, 5], "per_class": True, "class_names": ["a", "b", "c", "d", "e"]},
        {"class_prior": [0.4, 0.3, 0.1, 0.1, 0.1], "tail_fraction": 0.4},
    ],
)
def test_the_module_gives_the_numbers_of_the_trainers_compute_metrics(options, no_network):
    labels, predicted = predictions()
    metric = evaluate.load(metric_path())
    result = metric.compute(predictions=predicted, references=labels, num_classes=5, **options)
    expected = make_compute_metrics(5, **options)(EvalPrediction(predictions=np.eye(5)[predicted], label_ids=labels))
    assert result == expected
    assert {"mean_recall", "min_recall", "h_mean", "g_mean", "min_coverage"} <= set(result)


def test_batches_added_one_by_one_give_the_whole_set(no_network):
    labels, predicted = predictions(seed=1)
    metric = evaluate.load(metric_path())
    for start in range(0, len(labels), 64):
        metric.add_batch(predictions=predicted[start : start + 64], references=labels[start : start + 64])
    incremental = metric.compute(num_classes=5)
    whole = evaluate.load(metric_path()).compute(predictions=predicted, references=labels, num_classes=5)
    assert incremental == whole


def test_num_classes_is_required(no_network):
    labels, predicted = predictions()
    with pytest.raises(ValueError, match="give num_classes=K"):
        evaluate.load(metric_path()).compute(predictions=predicted, references=labels)
