"""Why FixMatch-LA loses to supervised LA in the semi-supervised benchmark: one FixMatch-LA run per variant.

    .venv/bin/python benchmarks/fixmatch_probe.py --variants default lambda0 --setting consistent --seed 0
    .venv/bin/python benchmarks/fixmatch_probe.py --report

Each variant is the benchmark's FixMatch-LA stage 1 (semi_supervised.py: same split, pool, budget and settings) with
one thing changed; it is scored on the test split twice, with the EMA weights (what FixMatch saves) and with the raw
weights, with per-class recalls and the share of the pool each class gets as a pseudo-label at the end. Cells go to
benchmarks/results/semi_supervised_probe/ (never recomputed); the report prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402
import semi_supervised as semi  # noqa: E402

RESULTS = os.path.join(quality.ROOT, "benchmarks", "results", "semi_supervised_probe")
VARIANTS = {
    "default": {},  # the benchmark's FixMatch-LA
    "lambda0": {"lambda_u": 0.0},  # the same step (weak labelled views, the pool through BatchNorm), no pool loss
    "threshold_0.7": {"confidence_threshold": 0.7},
    "lambda_0.25": {"lambda_u": 0.25},
    "lambda0_plain": {"lambda_u": 0.0},  # and the weak view is the image as is (LA's stage-1 input)
    "plain": {},  # FixMatch-LA with the image as is for the weak view (labelled loss and pseudo-labels)
    "plain_ula": {"unlabeled_logit_adjustment": 1.0},  # and the pool's loss logit-adjusted by the labelled prior
}
PLAIN_WEAK = {"lambda0_plain", "plain", "plain_ula"}


def per_class_recall(labels: np.ndarray, predictions: np.ndarray, classes: int) -> list[float]:
    return [float((predictions[labels == k] == k).mean()) for k in range(classes)]


def score(trainer, splits, pool, classes: int) -> dict:
    """Test recalls and the pool's pseudo-label shares of the weights now in the model."""
    from selmix_hf import classification_report

    output = trainer.predict(splits["test"])
    predictions = output.predictions.argmax(-1)
    report = classification_report(output.label_ids, predictions, classes)
    pool_predictions = trainer.predict(pool).predictions.argmax(-1)
    held_out = trainer.predict(splits["validation"])
    validation = classification_report(held_out.label_ids, held_out.predictions.argmax(-1), classes)
    return {
        "validation": {k: validation[k] for k in ("mean_recall", "min_recall")},
        "mean_recall": report["mean_recall"],
        "min_recall": report["min_recall"],
        "recalls": per_class_recall(output.label_ids, predictions, classes),
        "pseudo_label_share": (np.bincount(pool_predictions, minlength=classes) / len(pool_predictions)).tolist(),
    }


def recalibrate_batchnorm(model, dataset) -> None:
    """BatchNorm running statistics recomputed as plain averages over the clean labelled images (no views, no pool):
    the test of whether the statistics FixMatch's joint forward accumulates are what hurts."""
    from torch.utils.data import DataLoader

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=64, collate_fn=lambda items: items):
            model(pixel_values=torch.stack([torch.as_tensor(item["pixel_values"]) for item in batch]))
    model.eval()


def run(variant: str, setting: str, seed: int) -> dict:
    from selmix_hf.ema import WeightAverage
    from selmix_hf.features import unwrap

    budget = quality.BUDGET["fashion"]
    splits, names, model, _ = quality.load_task("fashion", seed)
    counts = np.bincount(splits["train"]["label"], minlength=len(names))
    raw_pool = semi.pool_of(setting, seed, int(counts.sum()))
    pool = semi.prepared_pool(raw_pool, None)
    out = os.path.join(quality.ROOT, "outputs", "fixmatch_probe", variant)
    weak_view = "plain" if variant in PLAIN_WEAK else "published"
    # the grid's FIXMATCH before the probe's choices (tau 0), then the variant's one change
    changes = {"unlabeled_logit_adjustment": 0.0, **VARIANTS[variant]}
    trainer = semi.fixmatch_trainer(out, seed, splits, model, pool, budget["stage1_steps"], weak_view, **changes)
    started = time.time()
    trainer.train()
    seconds = time.time() - started
    cell = {"variant": variant, "setting": setting, "seed": seed, "changes": VARIANTS[variant], "seconds": seconds}
    cell["ema"] = score(trainer, splits, pool, len(names))  # the model holds the EMA after training
    WeightAverage.load_into(unwrap(trainer.model), trainer.raw_weights())
    trainer.average = None  # predict on the weights now in the model
    cell["raw"] = score(trainer, splits, pool, len(names))
    recalibrate_batchnorm(unwrap(trainer.model), splits["train"])
    cell["raw_bn_recalibrated"] = score(trainer, splits, pool, len(names))
    cell["logs"] = [e for e in trainer.state.log_history if "fixmatch/mask_rate" in e]
    return cell


def report() -> None:
    print(
        "| variant | setting, seed | EMA: mean / min recall | raw: mean / min recall | raw, BatchNorm recalibrated "
        "| worst class (raw) | validation mean recall (EMA) | s |"
    )
    print("|---|---|---:|---:|---:|---|---:|---:|")
    for name in sorted(os.listdir(RESULTS)):
        with open(os.path.join(RESULTS, name)) as fh:
            c = json.load(fh)
        worst = int(np.argmin(c["raw"]["recalls"]))
        ema, raw, recal = c["ema"], c["raw"], c.get("raw_bn_recalibrated")
        bn = f"{recal['mean_recall']:.3f} / {recal['min_recall']:.3f}" if recal else ""
        validation = f"{ema['validation']['mean_recall']:.3f}" if "validation" in ema else ""
        print(
            f"| {c['variant']} | {c['setting']}, {c['seed']} | {ema['mean_recall']:.3f} / {ema['min_recall']:.3f}"
            f" | {raw['mean_recall']:.3f} / {raw['min_recall']:.3f} | {bn} | {worst} "
            f"(pool share {c['raw']['pseudo_label_share'][worst]:.3f}) | {validation} | {c['seconds']:.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--setting", default="consistent", choices=["consistent", "uniform", "reversed"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.report:
        for variant in args.variants:
            path = os.path.join(RESULTS, f"{args.setting}_seed{args.seed}_{variant}.json")
            if os.path.exists(path):
                continue
            cell = run(variant, args.setting, args.seed)
            quality.write_json(path, cell)
            print(f"  {variant}: EMA {cell['ema']['min_recall']:.3f} min recall, raw {cell['raw']['min_recall']:.3f}")
    report()


if __name__ == "__main__":
    main()
