"""Real long-tailed benchmarks that need no Hub: WordNet noun supersenses and WordNet hypernym classes (text),
and Fashion-MNIST-LT (images).

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
WORDNET_ROOT = "00001740"  # entity.n.01, the one root of the WordNet 3.0 noun hierarchy
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


def _read_noun_synsets(path: str) -> dict[str, tuple[str, str | None, str]]:
    """offset -> (first lemma, first hypernym offset or None, gloss) of every noun synset with a gloss.

    The first hypernym is the first pointer of the line whose symbol is ``@`` (hypernym) or ``@i`` (instance
    hypernym) and whose target is a noun: data.noun lists a synset's pointers in a fixed order, so the choice is
    deterministic. Line format (wndb(5WN)):
    ``offset lex_filenum ss_type w_cnt [word lex_id]... p_cnt [symbol offset pos source_target]... | gloss``.
    """
    _require(path, "wordnet-base")
    synsets = {}
    with open(path, encoding="latin-1") as fh:
        for line in fh:
            if line.startswith("  "):  # licence header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            words = int(fields[3], 16)
            pointers = int(fields[4 + 2 * words])
            start = 5 + 2 * words
            hypernyms = [
                fields[start + 4 * i + 1]
                for i in range(pointers)
                if fields[start + 4 * i] in ("@", "@i") and fields[start + 4 * i + 2] == "n"
            ]
            if gloss.strip():
                synsets[fields[0]] = (fields[4], hypernyms[0] if hypernyms else None, gloss.strip())
    return synsets


def load_wordnet_hypernym_classes(depth: int = 4, min_glosses: int = 35, path: str = WORDNET_NOUNS) -> Dataset:
    """Every noun synset's gloss (text) labelled by its hypernym ancestor ``depth`` steps below entity.n.01.

    Each synset's path to the root follows its first hypernym pointer at every step (``@``, or ``@i`` for an
    instance such as a city or a person; synsets with several hypernyms, e.g. dog.n.01 -> canine.n.02 and
    domestic_animal.n.01, take the first one data.noun lists). The class of a synset is the synset at ``depth`` on
    that path (entity.n.01 has depth 0), so a synset at exactly ``depth`` is a member of its own class (its gloss
    defines the class); synsets shallower than ``depth`` are dropped. A gloss that several synsets share (WordNet
    3.0 has 605 extra copies, e.g. "a family of bacteria") is kept once, for its first synset in data.noun, so that
    no text is in two splits; then the classes with fewer than ``min_glosses`` glosses are dropped. Classes are
    ordered by offset and named by the ancestor's first lemma, with ``.<offset>`` appended to every lemma that two
    kept classes share (food.00021265, food.07555863).

    The defaults (depth 4, at least 35 glosses: 10 validation + 20 test + 5 train) keep 128 classes, 75,880
    glosses, from living_thing (19,479) down to 35 glosses per class: the natural long tail of WordNet.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1 (depth 0 is the root alone), got {depth}")
    synsets = _read_noun_synsets(path)
    depths = _depths(synsets, path)
    ancestor: dict[str, str | None] = {}  # synset -> its ancestor at `depth` (None: shallower than depth)
    for offset in synsets:
        node: str = offset
        for _ in range(depths[offset] - depth):
            node = synsets[node][1]  # type: ignore[assignment]
        ancestor[offset] = node if depths[offset] >= depth else None
    members: dict[str, list[str]] = {}
    seen: set[str] = set()
    for offset, top in ancestor.items():  # data.noun's order
        gloss = synsets[offset][2]
        if top is not None and gloss not in seen:
            members.setdefault(top, []).append(offset)
            seen.add(gloss)
    kept = sorted(top for top, items in members.items() if len(items) >= min_glosses)
    if not kept:
        raise ValueError(f"no class at depth {depth} has {min_glosses} glosses")
    lemmas = [synsets[top][0] for top in kept]
    names = [f"{lemma}.{top}" if lemmas.count(lemma) > 1 else lemma for lemma, top in zip(lemmas, kept)]
    index = {top: k for k, top in enumerate(kept)}
    texts, labels = [], []
    for top in kept:
        for offset in members[top]:
            texts.append(synsets[offset][2])
            labels.append(index[top])
    features = Features(text=Value("string"), label=ClassLabel(names=names))
    return Dataset.from_dict({"text": texts, "label": labels}, features=features)


def _depths(synsets: dict[str, tuple[str, str | None, str]], path: str) -> dict[str, int]:
    """Steps from each synset to entity.n.01 along its first hypernyms."""
    depths = {WORDNET_ROOT: 0}
    for offset in synsets:
        chain = []
        node: str | None = offset
        while node not in depths:
            if node is None or node not in synsets or len(chain) > len(synsets):
                raise ValueError(f"{path}: the first-hypernym path of {offset} does not reach entity.n.01")
            chain.append(node)
            node = synsets[node][1]
        for i, item in enumerate(reversed(chain), start=1):
            depths[item] = depths[node] + i
    return depths


def wordnet_many_lt(
    *,
    validation_per_class: int = 10,
    test_per_class: int = 20,
    max_per_class: int = 1280,
    seed: int = 0,
    depth: int = 4,
    min_glosses: int = 35,
    path: str = WORDNET_NOUNS,
) -> DatasetDict:
    """WordNet-many-LT: :func:`load_wordnet_hypernym_classes`, balanced validation / test held out per class, the
    rest capped at max_per_class for training. The defaults give 128 classes with 1,280 ... 5 training glosses
    (imbalance 256, ImageNet-LT's extremes), 1,280 validation and 2,560 test glosses."""
    return long_tailed_splits(
        load_wordnet_hypernym_classes(depth, min_glosses, path),
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


# ten well-separated RGB tints (0-1), one per Fashion-MNIST class: colour k is class k's majority colour
TINTS = [
    (1.0, 0.2, 0.2),
    (0.2, 1.0, 0.2),
    (0.2, 0.4, 1.0),
    (1.0, 1.0, 0.2),
    (1.0, 0.2, 1.0),
    (0.2, 1.0, 1.0),
    (1.0, 0.6, 0.1),
    (0.6, 0.2, 1.0),
    (0.6, 0.6, 0.6),
    (0.5, 1.0, 0.6),
]


def _balanced_per_class(dataset: Dataset, per_class: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """per_class indices of every class (shuffled), and the rest."""
    labels = np.asarray(dataset["label"])
    chosen: list[int] = []
    for k in range(int(labels.max()) + 1):
        members = np.flatnonzero(labels == k)
        if len(members) < per_class:
            raise ValueError(f"class {k} has {len(members)} samples, fewer than the {per_class} asked for")
        chosen.extend(rng.choice(members, per_class, replace=False).tolist())
    rest = sorted(set(range(len(labels))) - set(chosen))
    return chosen, rest


def _with_colours(dataset: Dataset, colours: np.ndarray) -> Dataset:
    features = dataset.features.copy()
    features["group"] = ClassLabel(names=[f"tint{k}" for k in range(len(TINTS))])
    return dataset.add_column("group", colours.tolist(), feature=features["group"])


def colored_fashion_mnist(
    *,
    train_per_class: int = 1000,
    validation_per_class: int = 100,
    test_per_class: int = 500,
    agreement: float = 0.9,
    seed: int = 0,
    root: str = FASHION_MNIST_ROOT,
) -> DatasetDict:
    """Colored Fashion-MNIST, a spurious-attribute benchmark with groups: the ``group`` column is the tint of each
    grey image (apply `TINTS`, e.g. pixel x tint). Training images of class k get tint k with probability
    ``agreement`` and one of the other nine otherwise; validation and test cycle through the ten tints within each
    class, so tint and class are independent and every (class, tint) cell has the same size."""
    if not 0.0 <= agreement <= 1.0:
        raise ValueError(f"agreement must lie in [0, 1], got {agreement}")
    rng = np.random.default_rng(seed)
    source = load_fashion_mnist("train", root)
    validation_idx, rest = _balanced_per_class(source, validation_per_class, rng)
    rest_set = source.select(rest)
    train_idx, _ = _balanced_per_class(rest_set, train_per_class, rng)
    train = rest_set.select(sorted(train_idx))
    labels = np.asarray(train["label"])
    other = (labels + rng.integers(1, len(TINTS), size=len(labels))) % len(TINTS)  # one of the other nine
    train = _with_colours(train, np.where(rng.random(len(labels)) < agreement, labels, other))

    def cycled(dataset: Dataset) -> Dataset:
        labels = np.asarray(dataset["label"])
        colours = np.zeros(len(labels), dtype=np.int64)
        for k in np.unique(labels):
            members = np.flatnonzero(labels == k)
            colours[members] = np.arange(len(members)) % len(TINTS)
        return _with_colours(dataset, colours)

    test_source = load_fashion_mnist("test", root)
    test_idx, _ = _balanced_per_class(test_source, test_per_class, rng)
    return DatasetDict(
        train=train,
        validation=cycled(source.select(sorted(validation_idx))),
        test=cycled(test_source.select(sorted(test_idx))),
    )
