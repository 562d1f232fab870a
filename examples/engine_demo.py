"""SelMix's engine end to end on fixed features: a long-tailed problem, a CE-trained head, then gain-driven mixup.

This is the main job until the trainers land: it shows every piece of the engine doing its work on a
problem small enough to run in seconds. Synthetic Gaussian features stand in for a backbone's pooled
embeddings; only the linear head is trained. Run with `make demo` (or `.venv/bin/python examples/engine_demo.py`).
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

from selmix_hf import (
    OBJECTIVES,
    class_prototypes,
    confusion_counts,
    gain_matrix,
    get_objective,
    normalized_confusion,
    sampling_distribution,
)
from selmix_hf.data import long_tailed_counts
from selmix_hf.metrics import classification_report


def gaussian_classes(counts: list[int], means: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    return means[labels] + torch.randn(labels.numel(), means.shape[1], generator=gen), labels


def validation_pass(head: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor, num_classes: int):
    with torch.no_grad():
        predictions = head(features).argmax(1)
    return normalized_confusion(confusion_counts(labels, predictions, num_classes)), predictions


def selmix_head(head, objective, data, steps: int, uniform: bool, estimator: str, gen: torch.Generator, verbose: bool):
    """Stage 2 on the head: mixup pairs from the gain-driven distribution (or uniform, the ablation)."""
    train_x, train_y, val_x, val_y = data
    k = head.out_features
    by_class = [torch.nonzero(train_y == c).flatten() for c in range(k)]
    optimiser = torch.optim.SGD(head.parameters(), lr=0.05)
    for step in range(steps):
        if step % 50 == 0:  # refresh: validation pass -> confusion + prototypes -> multipliers -> gains -> P
            confusion, _ = validation_pass(head, val_x, val_y, k)
            objective.update(confusion)
            gains = gain_matrix(
                objective,
                confusion,
                class_prototypes(val_x, val_y, k),
                head.weight,
                head.bias,
                estimator=estimator,
                features=val_x,
                labels=val_y,
            )
            pairs = torch.full((k, k), 1.0 / k**2) if uniform else sampling_distribution(gains, temperature=0.1)
            if verbose and step % 250 == 0:
                drawn = "uniform pairs" if uniform else f"most likely pair (i, j) = {divmod(int(pairs.argmax()), k)}"
                print(
                    f"step {step:4d}: validation {objective.name} = {objective.value(confusion):.3f}, "
                    f"max gain {float(gains.max()):.4f}, {drawn}"
                )
        flat = torch.multinomial(pairs.flatten(), 64, replacement=True, generator=gen)
        first, second = flat // k, flat % k
        x1 = train_x[torch.stack([by_class[c][torch.randint(len(by_class[c]), (), generator=gen)] for c in first])]
        x2 = train_x[torch.stack([by_class[c][torch.randint(len(by_class[c]), (), generator=gen)] for c in second])]
        lam = 0.6 + 0.4 * torch.rand(64, 1, generator=gen)
        optimiser.zero_grad()
        F.cross_entropy(head(lam * x1 + (1 - lam) * x2), first).backward()  # label of the first sample, not mixed
        optimiser.step()


def run(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Stage 1 (CE head), then stage 2 with SelMix and with uniform mixup; test reports of all three."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--objective", default="min_recall")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--imbalance", type=float, default=100.0)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--estimator", default="selmix", choices=["selmix", "exact"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    k, dim = args.num_classes, 32

    means = 0.55 * torch.randn(k, dim, generator=gen)
    train_counts = long_tailed_counts(500, k, args.imbalance)
    train_x, train_y = gaussian_classes(train_counts, means, gen)
    val_x, val_y = gaussian_classes([50] * k, means, gen)
    test_x, test_y = gaussian_classes([500] * k, means, gen)
    if not args.quiet:
        print(f"train counts per class: {train_counts}  (imbalance {args.imbalance:g})")

    head = torch.nn.Linear(dim, k)
    optimiser = torch.optim.SGD(head.parameters(), lr=0.1)
    for _ in range(300):  # stage 1: plain cross-entropy on the long-tailed split
        batch = torch.randint(0, train_y.numel(), (128,), generator=gen)
        optimiser.zero_grad()
        F.cross_entropy(head(train_x[batch]), train_y[batch]).backward()
        optimiser.step()

    options = {"class_counts": train_counts} if OBJECTIVES[args.objective].needs_class_counts else {}
    reports = {
        "CE head": classification_report(
            test_y, validation_pass(head, test_x, test_y, k)[1], k, class_counts=train_counts
        )
    }
    for label, uniform in (("uniform mixup", True), ("SelMix", False)):
        tuned = copy.deepcopy(head)
        if not args.quiet:
            print(f"-- stage 2: {label}")
        selmix_head(
            tuned,
            get_objective(args.objective, k, **options),
            (train_x, train_y, val_x, val_y),
            args.steps,
            uniform,
            args.estimator,
            torch.Generator().manual_seed(args.seed + 1),
            verbose=not args.quiet,
        )
        reports[label] = classification_report(
            test_y, validation_pass(tuned, test_x, test_y, k)[1], k, class_counts=train_counts
        )
    if not args.quiet:
        print("\ntest metrics (balanced test set)  " + "".join(f"{name:>15s}" for name in reports))
        for key in (
            "mean_recall",
            "min_recall",
            "h_mean",
            "g_mean",
            "min_coverage",
            "min_head_tail_recall",
            "few_shot_recall",
        ):
            print(f"{key:33s} " + "".join(f"{r[key]:15.3f}" for r in reports.values()))
    return reports


if __name__ == "__main__":
    run()
