"""Real long-tailed benchmarks that need no Hub: WordNet noun supersenses (text) and Fashion-MNIST-LT (images).

Both read files that Debian packages install (`wordnet-base`, `dataset-fashion-mnist`); a missing file is an
error that gives the install command.
"""

from __future__ import annotations

import gzip
import os

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

from .data import balanced_split, long_tailed_splits, make_long_tailed

WORDNET_NOUNS = "/usr/share/wordnet/data.noun"
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"

# lexicographer files 03..28 of WordNet 3.0 (lexnames(5WN)): the 26 noun supersenses
NOUN_SUPERSENSES = [
    "Tops",
    "act",
    "animal",
    "artifact",
    "attribute",
    "body",
    "cognition",
    "communication",
    "event",
    "feeling",
    "food",
    "group",
    "location",
    "motive",
    "object",
    "person",
    "phenomenon",
    "plant",
    "possession",
    "process",
    "quantity",
    "relation",
    "shape",
    "state",
    "substance",
    "time",
]
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def _require(path: str, package: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: it comes with the Debian package {package}. Install it with "
            f"`sudo apt-get update && sudo apt-get install -y {package}` (or `make assets` as root)."
        )


def load_wordnet_supersenses(path: str = WORDNET_NOUNS) -> Dataset:
    """Every noun synset's gloss (text) labelled by its supersense (26 classes, naturally long-tailed)."""
    _require(path, "wordnet-base")
    texts, labels = [], []
    with open(path, encoding="latin-1") as fh:
        for line in fh:
            if line.startswith("  "):  # licence header
                continue
            fields = line.split(" ", 3)
            gloss = line.split(" | ", 1)[1].strip() if " | " in line else ""
            if len(fields) < 3 or not gloss:
                continue
            texts.append(gloss)
            labels.append(int(fields[1]) - 3)
    features = Features(text=Value("string"), label=ClassLabel(names=NOUN_SUPERSENSES))
    return Dataset.from_dict({"text": texts, "label": labels}, features=features)


def wordnet_lt(
    *,
    validation_per_class: int = 10,
    test_per_class: int = 20,
    max_per_class: int = 300,
    seed: int = 0,
    path: str = WORDNET_NOUNS,
) -> DatasetDict:
    """WordNet-LT: balanced validation / test held out per class, the rest capped at max_per_class for training."""
    return long_tailed_splits(
        load_wordnet_supersenses(path),
        validation_per_class=validation_per_class,
        test_per_class=test_per_class,
        max_train_per_class=max_per_class,
        seed=seed,
    )


def _read_idx(path: str, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        return np.frombuffer(fh.read(), dtype=np.uint8, offset=header)


def load_fashion_mnist(split: str = "train", root: str = FASHION_MNIST_ROOT) -> Dataset:
    """Fashion-MNIST's official train (60,000) or test (10,000) split: 28 x 28 grey images and labels."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    images_path = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
    _require(images_path, "dataset-fashion-mnist")
    images = _read_idx(images_path, 16).reshape(-1, 28, 28)
    labels = _read_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"), 8).astype(np.int64)
    features = Features(image=Image(), label=ClassLabel(names=FASHION_MNIST_CLASSES))
    return Dataset.from_dict({"image": list(images), "label": labels}, features=features)


def fashion_mnist_lt(
    *,
    n_max: int = 1000,
    imbalance_ratio: float = 100.0,
    validation_per_class: int = 100,
    seed: int = 0,
    root: str = FASHION_MNIST_ROOT,
) -> DatasetDict:
    """Fashion-MNIST-LT: exponential profile from the train set (1000 ... 10), balanced validation, official test."""
    validation, rest = balanced_split(load_fashion_mnist("train", root), validation_per_class, seed=seed)
    train = make_long_tailed(rest, imbalance_ratio, n_max=n_max, seed=seed + 1)
    return DatasetDict(train=train, validation=validation, test=load_fashion_mnist("test", root))
