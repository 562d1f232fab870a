"""LoRA + SelMix against full fine-tuning + SelMix on WordNet-LT: quality, step time, peak memory.

    .venv/bin/python benchmarks/lora.py                  # seeds 0 1 2, both variants, resumable; then the table
    .venv/bin/python benchmarks/lora.py --report         # only the table from the finished cells

Both variants start from the quality grid's stage-1 (logit-adjusted) MiniLM-L6 of the seed and run SelMix for mean
recall with the grid's budget (100 steps, 16 pairs, a refresh every 25 steps, scale-free temperature). ``full``
trains every weight (head lr 3e-4, backbone 0.1 x that, as in the grid); ``lora`` wraps the model with a rank-8
LoRA adapter on the attention's query and value layers plus a trained copy of the head (`selmix_hf.adapters`), the
adapter at the head's learning rate (backbone_lr_ratio 1: LoRA's zero-initialised update needs it). Each cell runs in
a fresh process; its peak memory is the growth of the process's maximum resident set during `train()`. Cells:
benchmarks/results/lora/seed<k>/<variant>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402
from _common import current_rss_kib  # noqa: E402

RESULTS = os.path.join(quality.ROOT, "benchmarks", "results", "lora")
VARIANTS = ["full", "lora"]
DATASET = "wordnet"
METRICS = ["mean_recall", "min_head_tail_recall", "h_mean", "few_shot_recall"]


def cell_path(seed: int, variant: str) -> str:
    return os.path.join(RESULTS, f"seed{seed}", f"{variant}.json")


def run_cell(seed: int, variant: str) -> dict:
    """One variant's SelMix stage from the seed's stage-1 model (in this process)."""
    from selmix_hf import SelMixConfig, SelMixTrainer, classification_report
    from selmix_hf.adapters import AdapterArguments, wrap_with_lora

    splits, names, model, _ = quality.load_task(DATASET, seed)
    counts = np.bincount(splits["train"]["label"], minlength=len(names)).tolist()
    model = quality.stage1_model(DATASET, seed, splits, model, True)
    ratio = 0.1
    if variant == "lora":
        model, ratio = wrap_with_lora(model, AdapterArguments(lora_r=8, lora_alpha=16.0)), 1.0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    budget = quality.BUDGET[DATASET]
    args = quality.common_args(os.path.join(quality.ROOT, "outputs", "lora_runs", f"seed{seed}", variant), seed, True)
    trainer = SelMixTrainer(
        model=model,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        args=SelMixConfig(
            objective="mean_recall",
            learning_rate=3e-4,
            backbone_lr_ratio=ratio,
            per_device_train_batch_size=budget["batch"] // 2,
            gain_refresh_steps=budget["refresh"],
            max_steps=budget["stage2_steps"],
            **quality.SCALE_FREE_T,
            **args,
        ),
    )
    before = current_rss_kib()
    started = time.time()
    output = trainer.train()
    seconds = time.time() - started
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    reports = {}
    for split in ("test", "validation"):
        predicted = trainer.predict(splits[split])
        reports[split] = classification_report(
            predicted.label_ids, predicted.predictions.argmax(-1), len(counts), class_counts=counts
        )
    return {
        "seed": seed,
        "variant": variant,
        "trainable_parameters": trainable,
        "train_seconds": seconds,
        "seconds_per_step": output.metrics["train_runtime"] / trainer.state.global_step,
        "peak_rss_growth_mib": peak,
        "metrics": reports["test"],
        "validation_metrics": reports["validation"],
        "load_average": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d"),
    }


def report() -> str:
    """Mean +- std over the finished seeds per variant."""
    rows = ["| variant | trainable parameters | " + " | ".join(METRICS) + " | s / step | peak MiB | seeds |"]
    rows.append("|---|---:|" + "---:|" * (len(METRICS) + 3))
    for variant in VARIANTS:
        cells = []
        for seed in range(3):
            if os.path.exists(cell_path(seed, variant)):
                with open(cell_path(seed, variant)) as fh:
                    cells.append(json.load(fh))
        if not cells:
            continue

        def stat(values: list[float], digits: int = 3) -> str:
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"

        metrics = [stat([c["metrics"][m] for c in cells]) for m in METRICS]
        step = stat([c["seconds_per_step"] for c in cells], 2)
        peak = stat([c["peak_rss_growth_mib"] for c in cells], 0)
        parameters = f"{cells[0]['trainable_parameters']:,}"
        rows.append(f"| {variant} | {parameters} | " + " | ".join(metrics) + f" | {step} | {peak} | {len(cells)} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--report", action="store_true", help="only print the table from the finished cells")
    parser.add_argument("--cell", nargs=2, metavar=("SEED", "VARIANT"), help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--stage1", type=int, help=argparse.SUPPRESS)  # a child process: the seed's stage 1
    args = parser.parse_args()
    if args.stage1 is not None:
        splits, _, model, _ = quality.load_task(DATASET, args.stage1)
        quality.stage1_model(DATASET, args.stage1, splits, model, True)
        return
    if args.cell:
        cell = run_cell(int(args.cell[0]), args.cell[1])
        quality.write_json(cell_path(cell["seed"], cell["variant"]), cell)
        return
    if not args.report:
        for seed in args.seeds:
            # the stage-1 model first, in its own process: trained inside a cell it would raise the cell's peak
            subprocess.run([sys.executable, __file__, "--stage1", str(seed)], check=True)
            for variant in args.variants:
                if not os.path.exists(cell_path(seed, variant)):
                    subprocess.run([sys.executable, __file__, "--cell", str(seed), variant], check=True)
                    with open(cell_path(seed, variant)) as fh:
                        cell = json.load(fh)
                    print(
                        f"  seed {seed} {variant}: mean recall {cell['metrics']['mean_recall']:.3f}, "
                        f"{cell['seconds_per_step']:.2f} s/step, peak {cell['peak_rss_growth_mib']:.0f} MiB",
                        flush=True,
                    )
    print(report())


if __name__ == "__main__":
    main()
