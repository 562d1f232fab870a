"""Long-tailed subsampling and balanced splits: exact counts, determinism, disjointness, clear errors."""

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Value

from selmix_hf.data import (
    balanced_split,
    class_counts,
    long_tailed_counts,
    long_tailed_splits,
    make_long_tailed,
)


def balanced_dataset(num_classes: int, per_class: int) -> Dataset:
    labels = np.repeat(np.arange(num_classes), per_class)
    features = Features(id=Value("int64"), label=ClassLabel(num_classes=num_classes))
    return Dataset.from_dict({"id": np.arange(labels.size), "label": labels}, features=features)


def test_cifar10_lt_profile_counts():
    counts = long_tailed_counts(5000, 10, 100)
    assert sum(counts) == 12406
    assert counts[0] == 5000 and counts[-1] == 50
    assert counts == sorted(counts, reverse=True)


def test_step_profile_counts():
    assert long_tailed_counts(1000, 6, 10, profile="step") == [1000, 1000, 1000, 100, 100, 100]


def test_make_long_tailed_gives_exact_counts_and_is_seeded():
    data = balanced_dataset(10, 5000)
    lt = make_long_tailed(data, 100, seed=3)
    assert class_counts(lt) == long_tailed_counts(5000, 10, 100)
    assert len(lt) == 12406
    assert make_long_tailed(data, 100, seed=3)["id"] == lt["id"]
    assert make_long_tailed(data, 100, seed=4)["id"] != lt["id"]


def test_class_order_decides_which_class_is_the_head():
    lt = make_long_tailed(balanced_dataset(4, 100), 10, n_max=100, class_order=[3, 2, 1, 0])
    assert class_counts(lt) == long_tailed_counts(100, 4, 10)[::-1]


def test_balanced_split_is_balanced_disjoint_and_complete():
    data = make_long_tailed(balanced_dataset(5, 200), 10)
    part, rest = balanced_split(data, 7, seed=1)
    assert class_counts(part) == [7] * 5
    assert not set(part["id"]) & set(rest["id"])
    assert len(part) + len(rest) == len(data)


def test_long_tailed_splits_hold_out_balanced_validation_and_test():
    data = make_long_tailed(balanced_dataset(6, 400), 10)  # smallest class 40
    splits = long_tailed_splits(data, validation_per_class=10, test_per_class=20, max_train_per_class=150, seed=5)
    assert class_counts(splits["validation"]) == [10] * 6
    assert class_counts(splits["test"]) == [20] * 6
    available = np.array(class_counts(data)) - 30
    assert class_counts(splits["train"]) == np.minimum(available, 150).tolist()
    ids = [set(splits[name]["id"]) for name in ("train", "validation", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    again = long_tailed_splits(data, validation_per_class=10, test_per_class=20, max_train_per_class=150, seed=5)
    assert again["train"]["id"] == splits["train"]["id"]


def test_missing_label_column_names_the_columns():
    with pytest.raises(ValueError, match=r"no label column 'target'.*\['id', 'label'\]"):
        class_counts(balanced_dataset(3, 4), label_column="target")


def test_class_with_too_few_samples_is_named():
    data = make_long_tailed(balanced_dataset(4, 50), 10, n_max=50)  # class 3 keeps 5
    with pytest.raises(ValueError, match="class 3 has 5 samples, fewer than the 8"):
        balanced_split(data, 8)


def test_string_labels_are_rejected_with_a_fix():
    data = Dataset.from_dict({"label": ["a", "b", "a"]})
    with pytest.raises(ValueError, match="class_encode_column"):
        class_counts(data)


def test_unknown_profile_lists_valid_ones():
    with pytest.raises(ValueError, match="exponential, step"):
        long_tailed_counts(100, 5, 10, profile="linear")


def test_labels_are_read_past_a_transform():
    from selmix_hf.data import dataset_labels

    data = balanced_dataset(3, 4).select([11, 0, 5])
    data.set_transform(lambda batch: {"pixel_values": [[float(i)] for i in batch["id"]]})
    assert dataset_labels(data).tolist() == [2, 0, 1]
