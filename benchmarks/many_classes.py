"""K = 1,000: recipes/vit_imagenet_lt.py on a generated ImageNet-LT-format folder, on CPU.

    .venv/bin/python benchmarks/many_classes.py                  # generate (once), run, write the JSON and report
    .venv/bin/python benchmarks/many_classes.py --steps 100 --refresh 50
    .venv/bin/python benchmarks/many_classes.py --validation-refresh-per-class 1   # a sample per refresh: own JSON

The folder (outputs/many_classes/data) holds 1,000 classes of 16 px PNGs whose colour pattern is their class,
long-tailed training counts (40 * 0.996^k, 40 ... 2 images per class), 20 validation and 5 test images per class,
and the three ImageNet_LT_*.txt split files; the model is a 2-layer ViT (hidden size 64) built from a config and
saved like a Hub checkpoint. The recipe runs in this process (stage 1: logit-adjusted fine-tuning; stage 2: SelMix
for min recall, a refresh every --refresh steps), so its trainer's log gives each refresh's wall time
(``refresh/seconds``) and its validation pass's (``refresh/validation_seconds``). Written to
benchmarks/results/many_classes.json: the gain refresh without the validation pass, the pass itself, the training
step without refreshes, the refresh overhead amortised over --refresh steps, the time the validation pass spends
loading images (its loader iterated alone after the run), and the peak memory growth of the run;
the card and figures stay in outputs/many_classes/run. With --validation-refresh-per-class n, each refresh passes
over n validation images per class (``validation_refresh_per_class``) and the result goes to
benchmarks/results/many_classes_sample{n}.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import current_rss_kib  # noqa: E402

from selmix_hf._compat import validation_dataloader  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "outputs", "many_classes")
RESULT = os.path.join(ROOT, "benchmarks", "results", "many_classes.json")
K, SIZE, VALIDATION, TEST = 1000, 16, 20, 5
SHOWN = ("mean_recall", "min_recall", "min_head_tail_recall", "medium_shot_recall", "few_shot_recall")


def train_counts() -> list[int]:
    return [max(2, round(40 * 0.996**k)) for k in range(K)]


def generate(root: str) -> str:
    """The ImageNet-LT-format folder: per class a fixed random 4 x 4 colour pattern, upsampled, plus noise."""
    from PIL import Image

    if os.path.exists(os.path.join(root, "ImageNet_LT_test.txt")):
        return root
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 256, (K, 4, 4, 3)).repeat(SIZE // 4, 1).repeat(SIZE // 4, 2)
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for k, n in enumerate(train_counts()):
        os.makedirs(os.path.join(root, "images", f"n{k:04d}"), exist_ok=True)
        for split, amount in (("train", n), ("val", VALIDATION), ("test", TEST)):
            for i in range(amount):
                pixels = np.clip(patterns[k] + rng.normal(0, 30, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
                rel = f"images/n{k:04d}/{split}_{i}.png"
                Image.fromarray(pixels).save(os.path.join(root, rel))
                lines[split].append(f"{rel} {k}")
    for split, rows in lines.items():
        with open(os.path.join(root, f"ImageNet_LT_{split}.txt"), "w") as fh:
            fh.write("\n".join(rows) + "\n")
    return root


def tiny_vit(folder: str) -> str:
    """A 2-layer ViT for 16 px images with its image processor, saved like a Hub checkpoint."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=SIZE,
        patch_size=4,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        num_labels=K,
    )
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": SIZE, "width": SIZE}, do_resize=True).save_pretrained(folder)
    return folder


def run(args: argparse.Namespace) -> dict:
    spec = importlib.util.spec_from_file_location(
        "vit_imagenet_lt", os.path.join(ROOT, "recipes", "vit_imagenet_lt.py")
    )
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe
    spec.loader.exec_module(recipe)
    data, vit = generate(os.path.join(WORK, "data")), tiny_vit(os.path.join(WORK, "vit"))
    out = os.path.join(WORK, "run")
    argv = [
        "--image_root", data, "--model_name_or_path", vit, "--num_labels", str(K), "--output_dir", out,
        "--use_cpu", "true", "--bf16", "false", "--dataloader_num_workers", "0", "--report_to", "none",
        "--save_strategy", "no", "--logging_steps", "10", "--disable_tqdm", "true",
        "--stage1_max_steps", str(args.stage1_steps), "--stage1_learning_rate", "1e-3",
        "--stage1_per_device_train_batch_size", "128", "--per_device_eval_batch_size", "500",
        "--max_steps", str(args.steps), "--gain_refresh_steps", str(args.refresh),
        "--per_device_train_batch_size", "64", "--early_stop_on_gain_plateau", "false",
        "--warmup_steps", "0", "--check_images", "false",
    ]  # fmt: skip
    if args.validation_refresh_per_class is not None:
        argv += ["--validation_refresh_per_class", str(args.validation_refresh_per_class)]
    before = current_rss_kib()
    started = time.time()
    result = recipe.main(argv)
    seconds = time.time() - started
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    trainer = result["trainer"]
    logs = trainer.state.log_history
    refreshes = [e for e in logs if "refresh/seconds" in e]
    runtime = next(e["train_runtime"] for e in logs if "train_runtime" in e)
    steps = trainer.state.global_step
    loading_started = time.perf_counter()  # the validation pass's image loading alone: decode, transform, collate
    for _ in validation_dataloader(trainer, trainer.validation_dataset):
        pass
    loading = time.perf_counter() - loading_started
    refresh_total = sum(e["refresh/seconds"] for e in refreshes)
    step = (runtime - refresh_total) / steps
    refresh = statistics.median(e["refresh/seconds"] for e in refreshes)
    validation = statistics.median(e["refresh/validation_seconds"] for e in refreshes)
    return {
        "classes": K,
        "train_images": sum(train_counts()),
        "validation_images": K * VALIDATION,
        "stage2_steps": steps,
        "refresh_every": args.refresh,
        "validation_refresh_per_class": args.validation_refresh_per_class,
        "validation_images_per_refresh": len(trainer.refresh_validation_set()),
        "refreshes": len(refreshes),
        "refresh_seconds_median": refresh,
        "validation_pass_seconds_median": validation,
        "gain_refresh_seconds_median": refresh - validation,
        "validation_loading_seconds": loading,
        "step_seconds_without_refresh": step,
        "refresh_overhead_amortised": refresh / (args.refresh * step),
        "peak_rss_growth_mib": peak_mib,
        "run_seconds": seconds,
        "test_after": {k: result["after"].get(k) for k in SHOWN},
        "test_before": {k: result["before"].get(k) for k in SHOWN},
        "load_average": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="stage-2 (SelMix) steps")
    parser.add_argument("--refresh", type=int, default=50, help="gain_refresh_steps")
    parser.add_argument("--stage1-steps", type=int, default=300)
    parser.add_argument(
        "--validation-refresh-per-class", type=int, default=None, help="validation images per class per refresh"
    )
    args = parser.parse_args()
    summary = run(args)
    n = args.validation_refresh_per_class
    result = RESULT if n is None else RESULT.replace(".json", f"_sample{n}.json")
    os.makedirs(os.path.dirname(result), exist_ok=True)
    with open(result, "w") as fh:
        json.dump(summary, fh, indent=2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
