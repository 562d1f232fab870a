"""Time of `fit_decision_rule` (offsets, 5 folds + the final fit + the bootstrap guard) by number of classes.

    .venv/bin/python benchmarks/posthoc_speed.py                 # K = 10, 100, 1000; 50 validation samples per class
    .venv/bin/python benchmarks/posthoc_speed.py --classes 100 --per-class 20

Synthetic logits of a long-tailed model: N(0, 1) noise, + log prior (exponential profile, ratio e^6), + a margin on
the true class. Results go to benchmarks/results/posthoc_speed.json and are quoted in docs/benchmarks.md. Run it
alone: another heavy process on the same cores distorts the times.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from selmix_hf import get_objective
from selmix_hf.posthoc import fit_decision_rule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results", "posthoc_speed.json")
OBJECTIVES = ["min_recall", "h_mean", "mean_recall", "mean_recall_min_coverage"]


def synthetic(classes: int, per_class: int, margin: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    prior = torch.softmax(torch.linspace(3.0, -3.0, classes), 0)
    logits = torch.randn(len(labels), classes, generator=generator) + torch.log(prior)
    logits[torch.arange(len(labels)), labels] += margin
    return logits, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", nargs="+", type=int, default=[10, 100, 1000])
    parser.add_argument("--per-class", type=int, default=50)
    args = parser.parse_args()
    rows = []
    for classes in args.classes:
        logits, labels = synthetic(classes, args.per_class, margin=2.0 if classes <= 100 else 4.0)
        for name in OBJECTIVES:
            started = time.perf_counter()
            rule = fit_decision_rule(logits, labels, get_objective(name, classes))
            seconds = time.perf_counter() - started
            rows.append(
                {
                    "classes": classes,
                    "samples": len(labels),
                    "objective": name,
                    "seconds": round(seconds, 3),
                    "kind": rule.kind,
                    **{k: round(v, 4) for k, v in rule.estimates.items()},
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "command": f"benchmarks/posthoc_speed.py --classes {' '.join(map(str, args.classes))} "
        f"--per-class {args.per_class}",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as fh:
        json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
