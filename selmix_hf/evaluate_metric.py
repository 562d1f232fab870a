"""The library's non-decomposable metrics as an `evaluate` module: ``evaluate.load(selmix_hf.metric_path())``.

`evaluate` loads this file as a standalone module (it copies it into its cache), so it imports the library
absolutely. The numbers are those of `selmix_hf.classification_report`, which the trainers' `compute_metrics` uses.
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate

from selmix_hf.metrics import classification_report

_DESCRIPTION = """Per-class recall and the metrics of the whole confusion matrix that do not decompose over samples:
mean, min, G-mean and H-mean of recalls, accuracy and min coverage under a class prior; with the training class
counts, head / tail recall, their minimum and many / medium / few-shot recall."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class ids.
    references: true class ids.
    num_classes: number of classes K (required: a class absent from both lists still counts).
    class_counts: training samples per class (enables head / tail and shot metrics).
    class_prior: the class prior the metrics are measured under (default uniform).
    tail_fraction: fraction of the rarest training classes that form the tail (default 0.1).
    per_class: also report recall_<name> and coverage_<name> per class.
    class_names: names used in the per-class keys (default the class ids).
Returns:
    a dict of floats, e.g. {"accuracy": ..., "mean_recall": ..., "min_recall": ..., "h_mean": ..., ...}.
"""

_CITATION = """@inproceedings{ramasubramanian2024selmix,
  title     = {Selective Mixup Fine-Tuning for Optimizing Non-Decomposable Objectives},
  author    = {Ramasubramanian, Shrinivas and Rangwani, Harsh and Takemori, Sho and Samanta, Kunal and
               Umeda, Yuhei and Radhakrishnan, Venkatesh Babu},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2024}
}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class NonDecomposableMetrics(evaluate.Metric):
    """`evaluate` metric over class-id predictions: the library's classification report."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(
        self,
        predictions: list[int],
        references: list[int],
        num_classes: int | None = None,
        class_counts: list[int] | None = None,
        class_prior: list[float] | None = None,
        tail_fraction: float = 0.1,
        per_class: bool = False,
        class_names: list[str] | None = None,
    ) -> dict[str, Any]:
        if num_classes is None:
            raise ValueError("give num_classes=K: a class missing from both predictions and references still counts")
        return classification_report(
            references,
            predictions,
            num_classes,
            class_counts=class_counts,
            class_prior=class_prior,
            tail_fraction=tail_fraction,
            per_class=per_class,
            class_names=class_names,
        )
