"""One leg of benchmarks/gpu_check.sh: a short Trainer run and a short SelMix run of a small ViT under one engine.

    accelerate launch --config_file recipes/configs/accelerate/fsdp2.yaml benchmarks/gpu_check.py --out fsdp2.json
    python benchmarks/gpu_check.py --out single.json --cpu          # one process on CPU (how it is tried here)
    python benchmarks/gpu_check.py --compare ddp.json fsdp2.json zero3.json bf16.json

The engine (DDP, FSDP2, DeepSpeed ZeRO-3) comes from the accelerate config; ``--bf16`` adds bf16 mixed precision.
Both runs start from the same weights (seeded init) and train on the same synthetic long-tailed images, so the gain
matrix of SelMix's first refresh (before any step) depends on the engine only through its numerics. Rank 0 writes
the first gain matrix, the head read whole at that refresh, and both runs' seconds per step (first steps excluded)
to ``--out``. ``--compare`` checks the gain matrices agree (relative to the largest gain) and prints the step-time
ratios against `Trainer`; it exits 1 when they disagree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

K = 10
COUNTS = [int(400 * 0.7**k) for k in range(K)]  # 400 ... 16: long-tailed
WARMUP_STEPS = 5
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}  # max |G - G_ref| / max |G_ref|


def images(counts: list[int], seed: int):
    """Images with a class signal (a per-class mean pattern plus noise), as a `datasets.Dataset`."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(1234)
    patterns = torch.randn(K, 3, 32, 32, generator=g)
    g.manual_seed(seed)
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    pixels = 0.5 * patterns[labels] + torch.randn(len(labels), 3, 32, 32, generator=g)
    return Dataset.from_dict({"pixel_values": pixels.numpy(), "labels": labels.tolist()}).with_format("torch")


def small_vit():
    """A 6-layer ViT with hidden size 192 on 32 px images (4 px patches), seeded: every engine starts from it."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=4,
        hidden_size=192,
        num_hidden_layers=6,
        num_attention_heads=3,
        intermediate_size=768,
        num_labels=K,
    )
    return ViTForImageClassification(config)


class StepClock:
    """Seconds per optimiser step after the first WARMUP_STEPS (compilation, allocator and NCCL warm-up)."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.steps = 0

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if state.global_step == WARMUP_STEPS:
                    clock.start = time.perf_counter()
                elif state.global_step > WARMUP_STEPS:
                    clock.steps = state.global_step - WARMUP_STEPS
                    clock.seconds = time.perf_counter() - clock.start

        return Clock()

    def per_step(self) -> float:
        return self.seconds / max(self.steps, 1)


def run(args: argparse.Namespace) -> None:
    from transformers import Trainer, TrainingArguments

    from selmix_hf import SelMixConfig, SelMixTrainer

    train, validation = images(COUNTS, seed=1), images([20] * K, seed=2)
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="gpu_check_"),
        per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=128,
        max_steps=args.steps,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        bf16=args.bf16,
        use_cpu=args.cpu,
        seed=0,
    )
    clock = StepClock()
    # Trainer forwards 2B samples per step, as SelMix does with B pairs
    baseline = Trainer(
        model=small_vit(),
        args=TrainingArguments(**{**common, "per_device_train_batch_size": 2 * args.batch}),
        train_dataset=train,
        callbacks=[clock.callback()],
    )
    baseline.train()
    trainer_seconds = clock.per_step()

    first: dict = {}
    selmix_clock = StepClock()
    trainer = SelMixTrainer(
        model=small_vit(),
        args=SelMixConfig(**common, objective="min_recall", gain_refresh_steps=10, backbone_lr_ratio=0.1),
        train_dataset=train,
        validation_dataset=validation,
        callbacks=[selmix_clock.callback()],
    )

    from transformers import TrainerCallback

    from selmix_hf.sharding import whole_head

    class FirstRefresh(TrainerCallback):
        """The gain matrix and the whole head at the refresh before the first step (a collective: every rank)."""

        def on_step_begin(self, args_, state, control, **kwargs):
            if state.global_step == 0 and not first:
                with whole_head(trainer.pooled.head, trainer.model_wrapped) as (weight, bias):
                    first["head_weight_norm"] = float(weight.float().norm())
                first["gains"] = trainer.gains.float().cpu().tolist()

    trainer.add_callback(FirstRefresh())
    trainer.train()
    if trainer.args.process_index == 0:
        result = {
            "engine": args.name,
            "precision": "bf16" if args.bf16 else "fp32",
            "world_size": trainer.args.world_size,
            "trainer_seconds_per_step": trainer_seconds,
            "selmix_seconds_per_step": selmix_clock.per_step(),
            "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
            **first,
        }
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
        print(json.dumps({k: v for k, v in result.items() if k != "gains"}))


def compare(paths: list[str]) -> int:
    """Print the step-time table; 1 when a gain matrix differs from the first file's beyond its tolerance."""
    results = []
    for path in paths:
        with open(path) as fh:
            results.append(json.load(fh))
    reference = torch.tensor(results[0]["gains"])
    scale = float(reference.abs().max()) or 1.0
    status = 0
    print(f"{'engine':<10} {'ranks':>5} {'Trainer s/step':>14} {'SelMix s/step':>13} {'ratio':>6} {'gain diff':>9}")
    for r in results:
        diff = float((torch.tensor(r["gains"]) - reference).abs().max()) / scale
        ok = diff <= TOLERANCE[r["precision"]]
        status |= not ok
        ratio = r["selmix_seconds_per_step"] / r["trainer_seconds_per_step"]
        print(
            f"{r['engine']:<10} {r['world_size']:>5} {r['trainer_seconds_per_step']:>14.4f} "
            f"{r['selmix_seconds_per_step']:>13.4f} {ratio:>5.2f}x {diff:>9.1e}{'' if ok else '  DISAGREES'}"
        )
    print("gain matrices agree" if status == 0 else "a gain matrix disagrees with the first engine's")
    return status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="where rank 0 writes this leg's JSON")
    parser.add_argument("--name", default=os.environ.get("GPU_CHECK_ENGINE", "ddp"), help="the engine's name")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    parser.add_argument("--cpu", action="store_true", help="run on CPU (a functional check, not a timing)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32, help="pairs per process and step (Trainer: 2x samples)")
    parser.add_argument("--compare", nargs="+", metavar="JSON", help="compare legs' results instead of running")
    args = parser.parse_args()
    if args.compare:
        sys.exit(compare(args.compare))
    if not args.out:
        parser.error("--out is required to run a leg")
    run(args)


if __name__ == "__main__":
    main()
