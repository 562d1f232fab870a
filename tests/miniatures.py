"""Generated miniatures for the recipe tests: an ImageNet-LT-format folder, a text csv, tiny models saved to disk."""

from __future__ import annotations

import os

import numpy as np

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40), (200, 40, 200), (40, 200, 200)]
WORDS = [["apple", "pear", "plum"], ["car", "bus", "train"], ["red", "blue", "green"], ["dog", "cat", "cow"]]


def imagenet_lt_folder(root: str, counts: list[int], per_class_holdout: int = 3, size: int = 16, seed: int = 0) -> str:
    """Small PNGs whose colour is their class, in class folders, with ImageNet_LT_{train,val,test}.txt."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for k, n in enumerate(counts):
        os.makedirs(os.path.join(root, "images", f"n{k:03d}"), exist_ok=True)
        for split, amount in (("train", n), ("val", per_class_holdout), ("test", per_class_holdout)):
            for i in range(amount):
                pixels = np.clip(np.array(COLOURS[k]) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                rel = f"images/n{k:03d}/{split}_{i}.png"
                Image.fromarray(pixels).save(os.path.join(root, rel))
                lines[split].append(f"{rel} {k}")
    for split, rows in lines.items():
        with open(os.path.join(root, f"ImageNet_LT_{split}.txt"), "w") as fh:
            fh.write("\n".join(rows) + "\n")
    return root


def tiny_vit(folder: str, num_labels: int = 4, size: int = 16) -> str:
    """A 1-layer ViT with its image processor, saved like a Hub checkpoint."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=size,
        patch_size=4,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=num_labels,
    )
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        folder
    )
    return folder


def text_csv(path: str, counts: list[int], seed: int = 0) -> str:
    """A csv with `sentence` and `topic` (string labels) columns; each topic has its own words."""
    import csv

    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["sentence", "topic"])
        for k, n in enumerate(counts):
            for _ in range(n):
                words = list(rng.choice(WORDS[k], size=4)) + list(rng.choice(sum(WORDS, []), size=1))
                writer.writerow([" ".join(words), f"topic_{'abcd'[k]}"])
    return path


def tiny_bert(folder: str, num_labels: int = 4) -> str:
    """A 1-layer BERT and a word-level tokenizer over the miniature's words, saved like a Hub checkpoint."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    os.makedirs(folder, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sum(WORDS, [])]
    BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def tiny_timm(folder: str, num_labels: int = 4, size: int = 16) -> str:
    """A timm ResNet-10t through transformers' TimmWrapper, with timm's own transforms in its image processor."""
    import torch
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    torch.manual_seed(0)
    data = {
        "input_size": (3, size, size),
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
    }  # timm's data config: the processor is built from it, as for Hub timm repos
    config = TimmWrapperConfig(architecture="resnet10t", num_labels=num_labels, pretrained_cfg=data)
    TimmWrapperForImageClassification(config).save_pretrained(folder)
    return folder
