"""Probe (not a library feature): coverage multipliers by projected dual ascent instead of the specified reset rule.

    .venv/bin/python benchmarks/coverage_dual_probe.py --datasets fashion --seeds 0 \\
        --methods selmix_mean_recall_min_coverage_sf --probe cov_dual300 \
        --options '{"objective_options": {"dual_step": 300}}'

The library sets mu_l = max(0, mu_max (1 - exp((cov_l - alpha pi_l) / tau))) afresh at each refresh
(docs/engine.md, M4. Coverage multiplier).
Here mu_l <- clip(mu_l + dual_step (alpha pi_l - cov_l), 0, mu_max) accumulates over refreshes instead, to test
whether the coverage row's swings between refreshes come from the reset rule. Every other argument is quality.py's.
"""

from __future__ import annotations

import os
import sys

import torch

from selmix_hf import metrics
from selmix_hf.objectives import OBJECTIVES, MeanRecallMinCoverage

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402


class DualAscentMeanRecallMinCoverage(MeanRecallMinCoverage):
    """Mean recall under min coverage, multipliers by projected dual ascent on the validation coverage gap."""

    def __init__(
        self,
        num_classes: int,
        *,
        dual_step: float = 300.0,
        alpha: float = 0.95,
        tau: float = 0.01,
        mu_max: float = 100.0,
        class_prior=None,
    ) -> None:
        super().__init__(num_classes, alpha=alpha, tau=tau, mu_max=mu_max, class_prior=class_prior)
        self.dual_step = float(dual_step)

    def update(self, confusion: torch.Tensor) -> None:
        gap = self.alpha * self.class_prior - metrics.coverages(confusion.detach().cpu().to(torch.float64))
        self.mu = (self.mu + self.dual_step * gap).clamp(0.0, self.mu_max)


if __name__ == "__main__":
    OBJECTIVES["mean_recall_min_coverage"] = DualAscentMeanRecallMinCoverage
    quality.main()
