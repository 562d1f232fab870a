"""The main job: SelMix on real data and real pretrained weights, offline, at demo size.

Text (default): MiniLM-L6 (BERT) on WordNet noun supersenses, 26 naturally long-tailed classes.
Image (--task image): EfficientNet-Lite0 (ImageNet weights, timm) on Fashion-MNIST-LT (rho = 100).
Stage 1 fine-tunes the pretrained model with the logit-adjusted loss; stage 2 runs SelMix for min recall from that
checkpoint. Prints the test metrics before and after, and writes a per-class recall plot, the model and its card
into --output-dir. Run with `make demo` (or `make demo DEMO_ARGS="--task image"`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np
import torch

from selmix_hf import LongTailConfig, LongTailTrainer, SelMixConfig, SelMixTrainer, classification_report
from selmix_hf.local_datasets import fashion_mnist_lt, wordnet_lt
from selmix_hf.plots import save_run_figures
from selmix_hf.pretrained import (
    EFFICIENTNET_MEAN,
    EFFICIENTNET_STD,
    load_efficientnet_lite0_classifier,
    load_minilm_classifier,
)

MODEL_NAMES = {
    "text": "MiniLM-L6 (all-MiniLM-L6-v2 weights) on WordNet-LT",
    "image": "EfficientNet-Lite0 (ImageNet weights) on Fashion-MNIST-LT",
}
DATASET_NAMES = {
    "text": "WordNet-LT (WordNet 3.0 noun glosses labelled by their 26 supersenses; demo-size split)",
    "image": "Fashion-MNIST-LT (imbalance ratio 100, images at 32 px)",
}
# How to load the image model (the card's code): no image processor is saved, the inputs are prepared as in training.
IMAGE_LOADING = """import numpy as np
import torch
from transformers import AutoModelForImageClassification
from selmix_hf.pretrained import EFFICIENTNET_MEAN, EFFICIENTNET_STD

model = AutoModelForImageClassification.from_pretrained("{path}")
# as in training: a 28 x 28 grey Fashion-MNIST image (PIL or uint8 array), scaled to [0, 1], resized to 32 px,
# 3 channels
image = torch.from_numpy(np.asarray(grey_image, dtype=np.float32) / 255.0)
pixels = torch.nn.functional.interpolate(image[None, None], size=(32, 32), mode="bilinear").repeat(1, 3, 1, 1)
pixels = (pixels - torch.tensor(EFFICIENTNET_MEAN).view(1, 3, 1, 1)) / torch.tensor(EFFICIENTNET_STD).view(1, 3, 1, 1)
print(model.config.id2label[model(pixel_values=pixels).logits.argmax(-1).item()])"""
SHOWN = [
    "mean_recall",
    "min_recall",
    "h_mean",
    "g_mean",
    "min_coverage",
    "many_shot_recall",
    "medium_shot_recall",
    "few_shot_recall",
]


def text_task(seed: int, max_length: int, splits=None):
    """WordNet-LT (or the given text splits) tokenized for MiniLM-L6, and the model with a head for its classes."""
    splits = wordnet_lt(seed=seed) if splits is None else splits
    names = splits["train"].features["label"].names
    tokenizer, model = load_minilm_classifier(len(names), dict(enumerate(names)))

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=max_length, padding="max_length")

    splits = splits.map(tokenize, batched=True, remove_columns=["text"], desc="tokenizing")
    return splits, names, model, tokenizer


def image_task(seed: int, size: int):
    splits = fashion_mnist_lt(seed=seed)
    names = splits["train"].features["label"].names
    model = load_efficientnet_lite0_classifier(len(names), dict(enumerate(names)))
    mean = torch.tensor(EFFICIENTNET_MEAN).view(3, 1, 1)
    std = torch.tensor(EFFICIENTNET_STD).view(3, 1, 1)

    def to_pixels(batch):
        images = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)) for im in batch["image"]]) / 255.0
        images = torch.nn.functional.interpolate(images.unsqueeze(1), size=(size, size), mode="bilinear")
        return {"pixel_values": (images.repeat(1, 3, 1, 1) - mean) / std, "label": batch["label"]}

    for split in splits.values():
        split.set_transform(to_pixels)
    return splits, names, model, None


def test_report(trainer, test, names: list[str], counts: list[int]) -> dict[str, float]:
    output = trainer.predict(test)
    return classification_report(
        output.label_ids,
        output.predictions.argmax(-1),
        len(names),
        class_counts=counts,
        per_class=True,
        class_names=names,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["text", "image"], default="text")
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--stage1-steps", type=int, default=300)
    parser.add_argument("--stage1-lr", type=float, default=3e-4)
    parser.add_argument(
        "--stage2-steps",
        type=int,
        default=None,
        help="default 300 for text (it takes that long to reach the class Tops, see docs/benchmarks.md), 150 for image",
    )
    parser.add_argument("--refresh-steps", type=int, default=25)
    parser.add_argument("--gain-estimator", choices=["selmix", "exact"], default="selmix")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="stage 1 samples per step; stage 2 uses half as pairs"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.stage2_steps is None:
        args.stage2_steps = 300 if args.task == "text" else 150
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(args.seed)
    started = time.time()
    splits, names, model, tokenizer = text_task(args.seed, 32) if args.task == "text" else image_task(args.seed, 32)
    counts = np.bincount(splits["train"]["label"], minlength=len(names)).tolist()
    print(
        f"{args.task}: {len(names)} classes, train {len(splits['train'])} (largest {max(counts)}, smallest "
        f"{min(counts)}), validation {len(splits['validation'])}, test {len(splits['test'])}"
    )
    common = dict(
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=25,
        seed=args.seed,
        per_device_eval_batch_size=64,
        remove_unused_columns=args.task == "text",
    )

    stage1 = LongTailTrainer(
        model=model,
        train_dataset=splits["train"],
        args=LongTailConfig(
            output_dir=os.path.join(args.output_dir, "stage1"),
            loss_type="logit_adjusted",
            max_steps=args.stage1_steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.stage1_lr,
            warmup_steps=0.1,
            **common,
        ),
    )
    print("\n== stage 1: logit-adjusted fine-tuning")
    stage1.train()
    before = test_report(stage1, splits["test"], names, counts)

    final = os.path.join(args.output_dir, "model")
    settings = dict(
        objective="min_recall",
        max_steps=args.stage2_steps,
        per_device_train_batch_size=args.batch_size // 2,
        gain_refresh_steps=args.refresh_steps,
        learning_rate=3e-4,
        backbone_lr_ratio=0.1,
        gain_estimator=args.gain_estimator,
    )
    stage2 = SelMixTrainer(
        model=stage1.model,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        args=SelMixConfig(output_dir=final, **settings, **common),
    )
    print("\n== stage 2: SelMix for min recall")
    stage2.train()
    after = test_report(stage2, splits["test"], names, counts)

    print(f"\ntest metrics ({args.task}, balanced test split)   stage 1 (LA)   stage 2 (SelMix)")
    for key in SHOWN:
        if key in before:
            print(f"{key:40s} {before[key]:12.3f} {after[key]:17.3f}")
    stage2.save_model(final)
    if tokenizer is not None:
        tokenizer.save_pretrained(final)
    # the library's figures and card (model_cards/model_card.md), as the recipes write them
    save_run_figures(stage2, final, names, after, before, ("stage 1 (logit adjusted)", "stage 2 (SelMix, min recall)"))
    shutil.copy(os.path.join(final, "per_class_recall.png"), os.path.join(args.output_dir, "per_class_recall.png"))
    stage2.create_model_card(
        model_name=f"{MODEL_NAMES[args.task]}, SelMix for min recall (selmix-hf demo)",
        results=after,
        before=before,
        eval_split="test",
        eval_counts=np.bincount(splits["test"]["label"], minlength=len(names)).tolist(),
        dataset_name=DATASET_NAMES[args.task],
        plot_file="per_class_recall.png",
        how_to_load=IMAGE_LOADING.format(path="path/to/this/model") if args.task == "image" else None,
    )
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as fh:
        json.dump({"before": before, "after": after}, fh, indent=2)
    print(
        f"\nwrote {final} (model + card), per_class_recall.png and metrics.json to {args.output_dir} "
        f"in {time.time() - started:.0f} s"
    )
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
