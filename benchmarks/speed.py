"""Step time and peak memory of SelMixTrainer (B pairs) against transformers.Trainer (2B samples), same model.

    .venv/bin/python benchmarks/speed.py                                   # MiniLM-shaped BERT and a small ViT
    .venv/bin/python benchmarks/speed.py --models minilm efficientnet      # the real pretrained models
    .venv/bin/python benchmarks/speed.py --models bert --steps 100 --pairs 16
    .venv/bin/python benchmarks/speed.py --models efficientnet --repeats 5  # alternate, report medians

Both forward 2B samples per step. SelMix's time includes its gain refreshes (every --refresh steps, a full
pass over a validation set of --val-per-class x K samples), amortised over the run; the "without refresh" ratio
takes the refreshes' measured wall time out (the pair steps alone). Each run is a fresh
process; peak memory is the growth of its maximum resident set during `train()`. Models are built from
configs (random weights; speed does not depend on the weights), or loaded from the packaged real weights
(`minilm`: MiniLM-L6, 26 classes; `efficientnet`: EfficientNet-Lite0 with ImageNet weights, 10 classes, 32 px).
With --repeats N the Trainer and SelMix runs alternate N times; the table gives the medians (the ratio column is the
median of the N paired ratios) and each pair's ratio and 1-minute load average are printed below it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import current_rss_kib  # noqa: E402

K = 26


MODELS = ["bert", "vit", "minilm", "efficientnet"]


def text_inputs(g: torch.Generator) -> dict:
    """A random 32-token sequence, the text models' input."""
    return {
        "input_ids": torch.randint(1000, 30000, (32,), generator=g),
        "attention_mask": torch.ones(32, dtype=torch.long),
    }


def image_inputs(g: torch.Generator) -> dict:
    """A random 32 px image, the image models' input."""
    return {"pixel_values": torch.randn(3, 32, 32, generator=g)}


def build(model_name: str):
    from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification

    from selmix_hf.pretrained import load_efficientnet_lite0_classifier, load_minilm_classifier

    if model_name == "minilm":
        model = load_minilm_classifier(K)[1]
        make = text_inputs
    elif model_name == "efficientnet":
        model = load_efficientnet_lite0_classifier(K)
        make = image_inputs
    elif model_name == "bert":  # the shape of MiniLM-L6 (all-MiniLM-L6-v2)
        model = BertForSequenceClassification(
            BertConfig(
                vocab_size=30522,
                hidden_size=384,
                num_hidden_layers=6,
                num_attention_heads=12,
                intermediate_size=1536,
                num_labels=K,
            )
        )
        make = text_inputs
    else:  # a small ViT on 32 px images
        model = ViTForImageClassification(
            ViTConfig(
                image_size=32,
                patch_size=4,
                hidden_size=192,
                num_hidden_layers=6,
                num_attention_heads=3,
                intermediate_size=768,
                num_labels=K,
            )
        )
        make = image_inputs
    return model, make


def dataset(make, per_class: list[int], seed: int):
    from torch.utils.data import Dataset

    gen = torch.Generator().manual_seed(seed)
    examples = [{**make(gen), "labels": k} for k, n in enumerate(per_class) for _ in range(n)]

    class Examples(Dataset):
        def __len__(self):
            return len(examples)

        def __getitem__(self, i):
            return examples[i]

    return Examples()


def run(model_name: str, method: str, pairs: int, steps: int, refresh: int, val_per_class: int) -> dict:
    from transformers import Trainer, TrainingArguments

    from selmix_hf import SelMixConfig, SelMixTrainer

    torch.manual_seed(0)
    refresh_seconds: list[float] = []
    model, make = build(model_name)
    train = dataset(make, [max(4, 200 // (k + 1)) for k in range(K)], seed=1)
    common = dict(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        logging_strategy="no",
        per_device_eval_batch_size=64,
    )
    if method == "trainer":
        trainer = Trainer(
            model=model, args=TrainingArguments(per_device_train_batch_size=2 * pairs, **common), train_dataset=train
        )
    else:
        args = SelMixConfig(per_device_train_batch_size=pairs, gain_refresh_steps=refresh, **common)
        trainer = SelMixTrainer(
            model=model, args=args, train_dataset=train, eval_dataset=dataset(make, [val_per_class] * K, seed=2)
        )
        trainer.refresh = timed(trainer.refresh, refresh_seconds)
    baseline = current_rss_kib()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    excluded = seconds - sum(refresh_seconds)
    return {
        "model": model_name,
        "method": method,
        "pairs": pairs,
        "steps": steps,
        "seconds_per_step": seconds / steps,
        "seconds_per_step_without_refresh": excluded / steps,
        "peak_mib": (peak - baseline) / 1024,
    }


def timed(fn, record: list[float]):
    """``fn`` that appends each call's wall time to ``record`` (to report SelMix's step time without its refreshes)."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record.append(time.perf_counter() - start)

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["bert", "vit"], choices=MODELS)
    parser.add_argument("--pairs", type=int, default=16, help="B: pairs per SelMix step (Trainer gets 2B samples)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--refresh", type=int, default=50)
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="alternate Trainer / SelMix runs this many times")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run(*args.child, args.pairs, args.steps, args.refresh, args.val_per_class)))
        return
    print(
        f"{args.steps} steps, B = {args.pairs} pairs (Trainer: {2 * args.pairs} samples), refresh every "
        f"{args.refresh} steps over {args.val_per_class * K} validation samples, "
        f"torch threads {torch.get_num_threads()}\n"
    )
    print(
        "| model | Trainer s/step | SelMixTrainer s/step | time ratio | ratio without refresh | Trainer peak MiB | "
        "SelMix peak MiB | memory ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    notes = []
    for model_name in args.models:
        runs: dict[str, list[dict]] = {"trainer": [], "selmix": []}
        for repeat in range(args.repeats):
            for method in ("trainer", "selmix"):
                load = os.getloadavg()[0]
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    model_name,
                    method,
                    "--pairs",
                    str(args.pairs),
                    "--steps",
                    str(args.steps),
                    "--refresh",
                    str(args.refresh),
                    "--val-per-class",
                    str(args.val_per_class),
                ]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                runs[method].append({**json.loads(out.strip().splitlines()[-1]), "load": load})
            t, s = runs["trainer"][-1], runs["selmix"][-1]
            notes.append(
                f"{model_name} run {repeat + 1}: Trainer {t['seconds_per_step']:.3f} s/step (load {t['load']:.1f}), "
                f"SelMix {s['seconds_per_step']:.3f} s/step (load {s['load']:.1f}), ratio "
                f"{s['seconds_per_step'] / t['seconds_per_step']:.2f}x"
            )
        med = {
            m: {k: statistics.median(r[k] for r in rs) for k in ("seconds_per_step", "peak_mib")}
            for m, rs in runs.items()
        }
        ratio, bare = (
            statistics.median(s[key] / t["seconds_per_step"] for t, s in zip(runs["trainer"], runs["selmix"]))
            for key in ("seconds_per_step", "seconds_per_step_without_refresh")
        )
        t, s = med["trainer"], med["selmix"]
        print(
            f"| {model_name} | {t['seconds_per_step']:.3f} | {s['seconds_per_step']:.3f} | {ratio:.2f}x "
            f"| {bare:.2f}x | "
            f"{t['peak_mib']:.0f} | {s['peak_mib']:.0f} | {s['peak_mib'] / t['peak_mib']:.2f}x |",
            flush=True,
        )
    if args.repeats > 1:
        print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
