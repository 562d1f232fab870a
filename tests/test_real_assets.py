"""Smoke tests on the real offline assets: WordNet, Fashion-MNIST, MiniLM-L6 and EfficientNet-Lite0 weights.

`make test` installs the assets first, so these run in CI; run alone they need `make assets`.
"""

import numpy as np
import pytest
import torch

from selmix_hf import SelMixConfig, SelMixTrainer, classification_report
from selmix_hf.data import long_tailed_splits
from selmix_hf.local_datasets import (
    NOUN_SUPERSENSES,
    fashion_mnist_lt,
    load_wordnet_hypernym_classes,
    load_wordnet_supersenses,
    wordnet_many_lt,
)
from selmix_hf.pretrained import efficientnet_lite0_state_dict, load_minilm_classifier

pytestmark = pytest.mark.slow


def test_wordnet_supersenses_are_read_as_published():
    data = load_wordnet_supersenses()
    counts = np.bincount(data["label"], minlength=26)
    assert len(data) == 82115 and data.features["label"].names == NOUN_SUPERSENSES
    assert counts[NOUN_SUPERSENSES.index("artifact")] == 11587
    assert counts[NOUN_SUPERSENSES.index("person")] == 11087
    assert counts[NOUN_SUPERSENSES.index("motive")] == 42 and counts[NOUN_SUPERSENSES.index("Tops")] == 51


def test_wordnet_hypernym_classes_are_the_ancestors_at_depth_4():
    data = load_wordnet_hypernym_classes()  # depth 4 below entity.n.01, classes with >= 35 glosses
    names = data.features["label"].names
    counts = np.bincount(data["label"], minlength=len(names))
    assert len(names) == 128 and len(data) == 75880 and len(set(names)) == len(names)
    assert counts.min() == 35 and counts[names.index("living_thing")] == 19479
    assert {"food.00021265", "food.07555863"} <= set(names) and "food" not in names  # shared lemmas: offsets
    texts = data["text"]

    def label_of(gloss_start: str) -> str:
        found = [i for i, text in enumerate(texts) if text.startswith(gloss_start)]
        assert len(found) == 1, gloss_start
        return names[data[found[0]]["label"]]

    # dog.n.01 -> canine -> carnivore -> ... -> organism -> living_thing (depth 4) -> whole -> object -> ... -> entity
    assert label_of("a member of the genus Canis (probably descended from the common wolf)") == "living_thing"
    assert label_of("a living (or once living) entity") == "living_thing"  # living_thing.n.01 is its own class
    # instances follow their instance hypernym (@i): Einstein -> physicist -> ... -> living_thing; the tail classes
    assert label_of("physicist born in Germany who formulated the special theory of relativity") == "living_thing"
    assert label_of("a peninsula in southwestern Europe") == "peninsula"  # Iberian_Peninsula
    assert label_of("a large inlet of the North Atlantic between Virginia and Maryland") == "bay"  # Chesapeake_Bay
    assert label_of("the capital and largest city of France") == "region.08630985"  # Paris -> ... -> region
    assert not any(t.startswith("a tangible and visible entity; an entity that can cast a shadow") for t in texts)


def test_wordnet_many_lt_splits():
    splits = wordnet_many_lt(seed=0)
    k = splits["train"].features["label"].num_classes
    train = np.bincount(splits["train"]["label"], minlength=k)
    assert k == 128 and len(splits["train"]) == 31186
    assert train.max() == 1280 and train.min() == 5  # imbalance 256: ImageNet-LT's extremes
    assert np.bincount(splits["validation"]["label"], minlength=k).tolist() == [10] * k
    assert np.bincount(splits["test"]["label"], minlength=k).tolist() == [20] * k
    held_out = set(splits["validation"]["text"]) | set(splits["test"]["text"])
    assert not held_out & set(splits["train"]["text"])  # each gloss once: no text in two splits
    again = wordnet_many_lt(seed=0)
    assert again["validation"]["text"] == splits["validation"]["text"]
    assert again["train"]["text"] == splits["train"]["text"]
    assert wordnet_many_lt(seed=1)["validation"]["text"] != splits["validation"]["text"]


def test_fashion_mnist_lt_profile():
    splits = fashion_mnist_lt(seed=0)
    assert np.bincount(splits["train"]["label"]).tolist() == [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
    assert np.bincount(splits["validation"]["label"]).tolist() == [100] * 10
    assert len(splits["test"]) == 10000
    assert np.asarray(splits["train"][0]["image"]).shape == (28, 28)


def test_efficientnet_weights_are_genuine_imagenet_weights():
    import timm
    from skimage import data

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    model.load_state_dict(efficientnet_lite0_state_dict(), strict=True)
    image = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float() / 255.0  # a cat photo
    image = torch.nn.functional.interpolate(image.unsqueeze(0), size=(224, 224), mode="bilinear")
    with torch.no_grad():
        probs = torch.softmax(model.eval()((image - 0.5) / 0.5), dim=1)[0]
    assert int(probs.argmax()) == 285 and float(probs.max()) > 0.5  # ImageNet 285: Egyptian cat


def test_selmix_refresh_on_real_minilm_features(tmp_path):
    data = load_wordnet_supersenses()
    splits = long_tailed_splits(data, validation_per_class=2, test_per_class=2, max_train_per_class=6, seed=0)
    tokenizer, model = load_minilm_classifier(26)
    splits = splits.map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=16, padding="max_length"),
        batched=True,
        remove_columns=["text"],
    )
    args = SelMixConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        gain_refresh_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        per_device_eval_batch_size=32,
    )
    trainer = SelMixTrainer(model=model, args=args, train_dataset=splits["train"], eval_dataset=splits["validation"])
    trainer.train()
    assert trainer.gains.shape == (26, 26) and torch.isfinite(trainer.gains).all()
    assert torch.isfinite(trainer.distribution).all() and float(trainer.distribution.sum()) == pytest.approx(1.0)
    output = trainer.predict(splits["test"])
    report = classification_report(
        output.label_ids,
        output.predictions.argmax(-1),
        26,
        class_counts=np.bincount(splits["train"]["label"], minlength=26),
    )
    assert {"mean_recall", "min_recall", "h_mean", "min_coverage", "few_shot_recall"} <= set(report)
