"""Semi-supervised SelMix: the pool's labels are never read, pseudo-labels follow the model, partners follow P."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from scipy import stats

sys.path.insert(0, os.path.dirname(__file__))
from test_contract import (  # noqa: E402
    SUBJECTS,
    TRAIN_COUNTS,
    UNLABELED_COUNTS,
    UNTRAINED_CONFIDENCE,
    K,
    build,
    weights,
)
from tiny import ListDataset, gaussian_problem  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from selmix_hf import SelMixConfig  # noqa: E402
from selmix_hf.sampling import PairBatchSampler  # noqa: E402
from selmix_hf.unlabeled import pool_precision  # noqa: E402

PLAIN = SUBJECTS[0]  # SelMix without a pool: the rows below add one through the trainer's keyword
SEMI = {"partners": "unlabeled", "pseudo_label_threshold": UNTRAINED_CONFIDENCE, "unlabeled_anchors": True}


def pool(label_mode: str = "present", seed: int = 3) -> ListDataset:
    """The contract's unlabelled pool with its label column present, permuted or removed."""
    examples = [dict(e) for e in gaussian_problem(UNLABELED_COUNTS, seed=seed).examples]
    if label_mode == "permuted":
        order = np.random.default_rng(0).permutation(len(examples))
        labels = [examples[i]["labels"] for i in order]
        for example, label in zip(examples, labels):
            example["labels"] = label
    elif label_mode == "wrong":
        for example in examples:
            example["labels"] = (example["labels"] + 1) % K
    elif label_mode == "removed":
        for example in examples:
            del example["labels"]
    return ListDataset(examples)


def semi_trainer(out: str, unlabeled: object, **overrides: object):
    """SelMix over the contract's tiny problem with an unlabelled pool."""
    return build(PLAIN, out, trainer_kwargs={"unlabeled_dataset": unlabeled}, **{**SEMI, **overrides})


@pytest.mark.parametrize("label_mode", ["removed", "permuted", "wrong"])
def test_the_pools_labels_are_never_read(label_mode, tmp_path):
    reference = semi_trainer(str(tmp_path / "present"), pool("present"), max_steps=6)
    reference.train()
    trainer = semi_trainer(str(tmp_path / label_mode), pool(label_mode), max_steps=6)
    trainer.train()
    assert torch.equal(reference.pseudo_labels, trainer.pseudo_labels)
    for name, value in weights(reference).items():
        assert torch.equal(value, weights(trainer)[name]), name
    assert reference.state.log_history[-1]["train_loss"] == trainer.state.log_history[-1]["train_loss"]


class CheckPseudoLabels(TrainerCallback):
    """After every refresh, the trainer's pseudo-labels must be the model's argmax on the pool, recomputed."""

    def __init__(self, trainer, every: int) -> None:
        self.trainer, self.every, self.checked, self.changed = trainer, every, [], 0
        self.previous, self.subsets = None, []

    def _check(self, step: int) -> None:
        model = self.trainer.model
        model.eval()
        with torch.no_grad():
            features = torch.stack([e["features"] for e in pool().examples])
            probabilities = model(features=features).logits.softmax(1)
        model.train()
        confidence, argmax = probabilities.max(1)
        current = self.trainer.pseudo_labels
        threshold = self.trainer.args.pseudo_label_threshold or 0.0
        expected = torch.where(confidence >= threshold, argmax, torch.full_like(argmax, -1))
        if self.trainer._pool_sample is not None:  # unlabeled_refresh_size: only this refresh's subset is labelled
            chosen = self.trainer._pool_sample.indices
            self.subsets.append(chosen.tolist())
            outside = torch.ones_like(expected, dtype=torch.bool)
            outside[chosen] = False
            expected = expected.masked_fill(outside, -1)
        assert (current >= 0).any()
        assert torch.equal(current, expected), f"step {step}"  # argmax above the threshold, -1 below
        self.changed += int(self.previous is not None and current is not self.previous)
        self.previous = current
        self.checked.append(step)

    def on_train_begin(self, args, state, control, **kwargs):
        self._check(0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 and state.global_step < state.max_steps:
            self._check(state.global_step)


def test_pseudo_labels_are_refreshed_with_the_gains_and_are_the_models_argmax(tmp_path):
    trainer = semi_trainer(str(tmp_path / "run"), pool(), max_steps=7, gain_refresh_steps=2)
    check = CheckPseudoLabels(trainer, 2)
    trainer.add_callback(check)  # after the refresh callback: it sees the refresh of its step
    trainer.train()
    assert check.checked == [0, 2, 4, 6] and check.changed == 3
    refreshes = [log for log in trainer.state.log_history if "selmix/unlabeled_confident" in log]
    assert len(refreshes) == 4
    last = refreshes[-1]
    shares = [last[f"selmix/unlabeled_share_{k}"] for k in range(K)]
    assert sum(shares) == pytest.approx(1.0)
    expected = torch.bincount(trainer.pseudo_labels[trainer.pseudo_labels >= 0], minlength=K).double()
    assert shares == pytest.approx((expected / expected.sum()).tolist())


@pytest.mark.parametrize("workers", [0, 1])  # a worker must see each refresh's subset, not the first one
def test_a_refresh_size_pseudo_labels_a_fresh_subset_and_only_it(workers, tmp_path):
    trainer = semi_trainer(
        str(tmp_path / "run"),
        pool(),
        max_steps=7,
        gain_refresh_steps=2,
        unlabeled_refresh_size=12,
        pseudo_label_threshold=None,
        unlabeled_anchors=False,
        dataloader_num_workers=workers,
    )
    check = CheckPseudoLabels(trainer, 2)
    trainer.add_callback(check)
    trainer.train()
    assert check.checked == [0, 2, 4, 6]
    assert all(len(subset) == 12 == len(set(subset)) for subset in check.subsets)
    assert len({tuple(subset) for subset in check.subsets}) == 4  # a new subset at every refresh
    assert int((trainer.pseudo_labels >= 0).sum()) == 12  # no threshold: the subset, and only it, is drawable
    assert "a random 12 of them pseudo-labelled per refresh" in trainer.stage_description()


def test_the_card_gives_the_pool_and_its_estimated_class_distribution(tmp_path):
    trainer = semi_trainer(str(tmp_path / "run"), pool(), max_steps=4, partners="mixed", unlabeled_ratio=0.25)
    trainer.train()
    stage = trainer.card_stage()
    assert "25% of partners drawn from an unlabelled pool of 33 samples" in stage["description"]
    assert "estimated class distribution: " in stage["description"]
    assert stage["settings"]["partners"] == "mixed" and stage["settings"]["unlabeled_ratio"] == 0.25
    unmixed = semi_trainer(str(tmp_path / "unmixed"), pool(), max_steps=2)
    unmixed.train()
    assert "unlabeled_ratio" not in unmixed.card_stage()["settings"]


def test_partners_follow_the_conditional_of_p_over_pseudo_classes():
    labels = [0] * 30 + [1] * 20 + [2] * 10
    pseudo = torch.tensor([0] * 5 + [1] * 40 + [2] * 15 + [-1] * 10)  # ten below the threshold: never drawn
    p = torch.tensor([[0.05, 0.30, 0.05], [0.10, 0.02, 0.08], [0.25, 0.05, 0.10]], dtype=torch.float64)
    sampler = PairBatchSampler(labels, 3, 4000, seed=0, pool_size=len(pseudo), pool_fraction=1.0)
    sampler.set_pool(pseudo)
    sampler.set_distribution(p)
    first, second = sampler.draw(60000)
    assert (first < len(labels)).all() and (second >= len(labels)).all()
    first_class = torch.tensor(labels)[first]
    second_class = pseudo[second - len(labels)]
    assert (second_class >= 0).all()
    observed_rows = torch.bincount(first_class, minlength=3).double()
    row = p.sum(1) / p.sum()
    assert stats.chisquare(observed_rows.numpy(), (row * len(first)).numpy()).pvalue > 1e-3
    for i in range(3):
        partners = torch.bincount(second_class[first_class == i], minlength=3).double()
        expected = p[i] / p[i].sum() * partners.sum()
        assert stats.chisquare(partners.numpy(), expected.numpy()).pvalue > 1e-3, f"row {i}"
    # uniform within a pseudo-class: every member of class 1 is drawn about equally often
    members = torch.bincount(second[second_class == 1] - len(labels), minlength=len(pseudo))[5:45].double()
    assert stats.chisquare(members.numpy()).pvalue > 1e-3
    # and a test that can fail: drawing by the pool's class sizes instead of P(j | i) is rejected
    sizes = torch.bincount(pseudo[pseudo >= 0], minlength=3).double()
    partners = torch.bincount(second_class[first_class == 0], minlength=3).double()
    wrong = sizes / sizes.sum() * partners.sum()
    assert stats.chisquare(partners.numpy(), wrong.numpy()).pvalue < 1e-6


def test_mixed_partners_come_from_the_pool_at_the_ratio_and_anchors_from_confident_samples():
    labels = [0] * 30 + [1] * 20 + [2] * 10
    pseudo = torch.tensor([0] * 5 + [1] * 40 + [2] * 15 + [-1] * 10)
    sampler = PairBatchSampler(labels, 3, 10, pool_size=len(pseudo), pool_fraction=0.3, pool_anchors=True)
    sampler.set_pool(pseudo)
    first, second = sampler.draw(20000)
    from_pool = second >= len(labels)
    assert from_pool.double().mean().item() == pytest.approx(0.3, abs=0.015)
    anchors = first[first >= len(labels)] - len(labels)
    assert anchors.numel() > 0 and (pseudo[anchors] >= 0).all()  # no unconfident sample is a first member


def test_pool_precision_recovers_the_pools_prior_and_the_share_of_right_pseudo_labels():
    # validation: 100 per class; class 2 is often predicted as 1, class 0 sometimes as 2
    rates = torch.tensor([[0.8, 0.0, 0.2], [0.0, 0.9, 0.1], [0.0, 0.4, 0.6]], dtype=torch.float64)
    counts = (rates * 100).round().long()
    prior = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)  # the pool's, unlike the balanced validation's
    shares = rates.T @ prior  # the pool's pseudo-label shares this prior gives: 0.08 / 0.51 / 0.41
    pseudo = torch.repeat_interleave(torch.arange(3), (shares * 1000).round().long())
    precision, estimated = pool_precision(counts, pseudo)
    torch.testing.assert_close(estimated, prior)
    # by hand: of the pool's pseudo-label 1 (0.27 + 0.24), 0.27 are class 1; of label 2 (0.02 + 0.03 + 0.36), 0.36
    torch.testing.assert_close(precision, torch.tensor([1.0, 0.27 / 0.51, 0.36 / 0.41], dtype=torch.float64))
    # the balanced validation's own precision of label 2 (0.6 / 0.9) is not the pool's: the prior matters
    assert abs(float(precision[2]) - 0.6 / 0.9) > 0.1
    # a pool that is all one pseudo-class: its prior is clipped to a distribution, precisions stay in [0, 1]
    precision, estimated = pool_precision(counts, torch.zeros(50, dtype=torch.long))
    assert float(estimated.sum()) == pytest.approx(1.0) and ((precision >= 0) & (precision <= 1)).all()


def test_per_class_pool_shares_send_each_partner_class_to_the_pool_at_its_rate():
    labels = [0] * 30 + [1] * 20 + [2] * 10
    pseudo = torch.tensor([0] * 5 + [1] * 40 + [2] * 15)
    p = torch.tensor([[0.05, 0.30, 0.05], [0.10, 0.02, 0.08], [0.25, 0.05, 0.10]], dtype=torch.float64)
    sampler = PairBatchSampler(labels, 3, 10, pool_size=len(pseudo), pool_fraction=0.5)
    sampler.set_pool(pseudo, torch.tensor([0.9, 0.0, 0.3]))
    sampler.set_distribution(p)
    first, second = sampler.draw(60000)
    from_pool = second >= len(labels)
    second_class = torch.cat([torch.tensor(labels), pseudo])[second]
    first_class = torch.tensor(labels)[first]
    for j, share in enumerate([0.9, 0.0, 0.3]):
        assert from_pool[second_class == j].double().mean().item() == pytest.approx(share, abs=0.02)
    for i in range(3):  # the partner class still follows P(j | i), whichever set it comes from
        partners = torch.bincount(second_class[first_class == i], minlength=3).double()
        assert stats.chisquare(partners.numpy(), (p[i] / p[i].sum() * partners.sum()).numpy()).pvalue > 1e-3
    # a class the pool has no sample of comes from the labelled set, whatever its share
    sampler.set_pool(torch.tensor([1] * 60), torch.tensor([0.9, 0.9, 0.9]))
    first, second = sampler.draw(2000)
    partner_class = torch.tensor(labels + [1] * 60)[second]
    assert (second[partner_class != 1] < len(labels)).all() and (second[partner_class == 1] >= len(labels)).any()
    with pytest.raises(ValueError, match=r"pool_fraction must lie in \[0, 1\]"):
        sampler.set_pool(pseudo, torch.tensor([0.5, 1.5, 0.0]))


def test_partners_by_precision_follow_the_estimate_of_the_last_refresh(tmp_path):
    trainer = semi_trainer(str(tmp_path / "run"), pool(), max_steps=4, partners="by_precision", unlabeled_anchors=False)
    logged = []
    trainer.add_callback(
        type("Logs", (TrainerCallback,), {"on_log": lambda s, a, st, c, logs=None, **k: logged.append(logs)})
    )
    trainer.train()
    expected, _ = pool_precision(trainer.last_confusion_counts, trainer.pseudo_labels)
    torch.testing.assert_close(trainer.pool_precision, expected)
    torch.testing.assert_close(trainer.sampler.pool_fraction, expected)
    assert any("selmix/pool_precision_0" in entry for entry in logged)
    assert "with the probability that its pseudo-label is right" in trainer.card_stage()["description"]


def test_accumulation_draws_the_same_pairs_with_a_pool():
    labels = [0] * 30 + [1] * 20 + [2] * 10
    pseudo = torch.tensor([0] * 5 + [1] * 40 + [2] * 15)
    whole, split = (
        PairBatchSampler(labels, 3, b, pool_size=len(pseudo), pool_fraction=0.5, pool_anchors=True) for b in (8, 2)
    )
    for sampler in (whole, split):
        sampler.set_pool(pseudo)
    first, second = whole.draw(8)
    parts = [split.draw(2) for _ in range(4)]
    assert torch.equal(first, torch.cat([a for a, _ in parts])) and torch.equal(
        second, torch.cat([b for _, b in parts])
    )


@pytest.mark.parametrize(
    "settings, unlabeled, message",
    [
        ({}, ListDataset([]), "unlabeled_dataset is empty"),
        ({}, ListDataset([{"pixels": torch.zeros(8)}]), r"columns \['pixels'\] do not give .*\['features'\].*missing"),
        ({"partners": "labeled", "unlabeled_anchors": False}, "pool", "partners='labeled'.*never draw from it"),
        ({"partners": "unlabeled", "pseudo_label_threshold": None, "unlabeled_anchors": False}, None, "none was given"),
        ({"partners": "labeled"}, None, "unlabeled_anchors=True needs"),
    ],
)
def test_bad_pools_are_refused_before_training(settings, unlabeled, message, tmp_path):
    with pytest.raises((ValueError, TypeError), match=message):
        semi_trainer(str(tmp_path / "run"), pool() if unlabeled == "pool" else unlabeled, **settings)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"pseudo_label_threshold": 0.0}, r"pseudo_label_threshold must lie in \(0, 1\]"),
        ({"pseudo_label_threshold": 1.5}, r"pseudo_label_threshold must lie in \(0, 1\]"),
        ({"partners": "mixed", "unlabeled_ratio": 1.0}, "0 < unlabeled_ratio < 1"),
        ({"partners": "pool"}, "unknown partners 'pool'"),
        ({"unlabeled_anchors": True}, "needs a confidence cut"),
        ({"unlabeled_refresh_size": 0}, "unlabeled_refresh_size must be >= 1"),
    ],
)
def test_bad_semi_supervised_settings_fail_when_the_config_is_built(settings, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        SelMixConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **settings)


def test_a_threshold_no_sample_passes_is_a_clear_error(tmp_path):
    trainer = semi_trainer(str(tmp_path / "run"), pool(), pseudo_label_threshold=0.99, unlabeled_anchors=False)
    with pytest.raises(ValueError, match="no unlabelled sample reaches pseudo_label_threshold=0.99 at the first"):
        trainer.train()


def test_train_counts_are_the_labelled_sets_only(tmp_path):
    trainer = semi_trainer(str(tmp_path / "run"), pool())
    assert trainer.class_counts == TRAIN_COUNTS


def test_a_pool_with_columns_the_model_does_not_take_is_accepted(tmp_path):
    examples = [{**e, "id": i, "source": "crawl"} for i, e in enumerate(pool().examples)]
    trainer = semi_trainer(str(tmp_path / "run"), ListDataset(examples), max_steps=2)
    trainer.train()
    assert trainer.pseudo_labels.numel() == sum(UNLABELED_COUNTS)


def test_pool_anchors_keep_the_class_they_were_drawn_as_when_workers_draw_ahead(tmp_path):
    labels = [0] * 30 + [1] * 20 + [2] * 10
    sampler = PairBatchSampler(labels, 3, 6, pool_size=6, pool_fraction=1.0, pool_anchors=True, num_batches=2)
    sampler.set_pool(torch.tensor([0, 1, 2, 0, 1, 2]))
    batches = iter(sampler)
    first = next(batches)  # drawn ahead of a refresh ...
    sampler.set_pool(torch.tensor([-1, -1, -1, 1, 1, 1]))  # ... that relabels the pool
    for index, drawn in first[:6]:
        expected = labels[index] if index < len(labels) else [0, 1, 2, 0, 1, 2][index - len(labels)]
        assert drawn == expected
    assert all(isinstance(i, int) for i in first[6:])
    seen = []
    trainer = semi_trainer(str(tmp_path / "run"), pool(), max_steps=6, gain_refresh_steps=1, dataloader_num_workers=1)
    original = trainer._anchor_labels

    def spy(labels, drawn):
        out = original(labels, drawn)
        seen.append(out[: len(out) // 2].clone())
        return out

    trainer._anchor_labels = spy
    trainer.train()
    assert len(seen) == 6 and all(((x >= 0) & (x < K)).all() for x in seen)


def test_a_later_refresh_with_no_confident_sample_keeps_the_last_pseudo_labels(tmp_path, monkeypatch, caplog):
    import selmix_hf.trainer as trainer_module

    calls = []
    real = trainer_module.pseudo_labels

    def fading(logits, threshold):
        calls.append(1)
        out = real(logits, threshold)
        return out if len(calls) == 1 else torch.full_like(out, -1)

    monkeypatch.setattr(trainer_module, "pseudo_labels", fading)
    trainer = semi_trainer(str(tmp_path / "run"), pool(), max_steps=4, gain_refresh_steps=2, unlabeled_anchors=False)
    first = []
    trainer.add_callback(
        type(
            "First", (TrainerCallback,), {"on_train_begin": lambda *a, **k: first.append(trainer.pseudo_labels.clone())}
        )
    )
    with caplog.at_level("WARNING"):
        trainer.train()
    assert len(calls) == 2 and torch.equal(trainer.pseudo_labels, first[0])
    assert "keeps the pseudo-labels of the last refresh" in caplog.text


def test_a_datasets_pool_with_a_transform_that_reads_its_label_column(tmp_path):
    from datasets import Dataset

    rows = [{"x": e["features"].tolist(), "label": e["labels"]} for e in pool().examples]
    hf_pool = Dataset.from_list(rows)
    hf_pool.set_transform(lambda b: {"features": torch.tensor(b["x"]), "label": b["label"]})
    assert hf_pool[0]["label"] in range(K)
    trainer = semi_trainer(str(tmp_path / "run"), hf_pool, max_steps=2)
    assert all(v == -100 for v in trainer.unlabeled_dataset.dataset["label"])  # replaced before any transform
    trainer.train()
    assert trainer.pseudo_labels.numel() == sum(UNLABELED_COUNTS)
