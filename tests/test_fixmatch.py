"""FixMatchTrainer: the unlabelled loss and its mask, the views, the EMA that evaluation uses, bad input."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(__file__))
from test_contract import (  # noqa: E402
    SUBJECTS,
    UNLABELED_COUNTS,
    UNTRAINED_CONFIDENCE,
    VALIDATION_COUNTS,
    assert_same,
    build,
    weights,
)
from tiny import (  # noqa: E402
    ARCHITECTURES,
    ListDataset,
    class_signal_dataset,
    gaussian_problem,
)

from selmix_hf import FixMatchConfig, FixMatchTrainer, ImageViews  # noqa: E402
from selmix_hf.checkpoint_state import load_state  # noqa: E402
from selmix_hf.views import TokenMasking, flip_and_crop  # noqa: E402

FIXMATCH = next(s for s in SUBJECTS if s.name == "fixmatch")
LONGTAIL = next(s for s in SUBJECTS if s.name == "longtail-cost-sensitive")
LA = {"loss_type": "logit_adjusted", "ema_decay": None, "lambda_u": 1.0}


def fixmatch(out: str, **overrides: object):
    return build(FIXMATCH, out, **overrides)


def test_no_confident_prediction_means_no_unlabelled_loss_and_the_supervised_loss_is_the_zoos(tmp_path):
    masked = fixmatch(
        str(tmp_path / "masked"), confidence_threshold=1.0, logging_strategy="steps", logging_steps=2, **LA
    )
    masked.train()
    assert all(log["fixmatch/mask_rate"] == 0 for log in masked.state.log_history if "fixmatch/mask_rate" in log)
    assert all(log["fixmatch/unlabeled_loss"] == 0 for log in masked.state.log_history if "loss" in log)
    longtail = build(LONGTAIL, str(tmp_path / "longtail"), loss_type="logit_adjusted")
    longtail.train()
    # the same labelled batches, the zoo's logit-adjusted loss, nothing from the pool: the same weights
    assert_same(weights(masked), weights(longtail), "weights", rtol=1e-5, atol=1e-6)
    unmasked = fixmatch(str(tmp_path / "unmasked"), **LA)
    unmasked.train()
    with pytest.raises(AssertionError):  # with confident pseudo-labels the pool does change the weights
        assert_same(weights(masked), weights(unmasked), "weights", rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tau", [0.0, 1.0, 2.0])
def test_the_unlabelled_loss_is_ce_of_the_strong_views_logit_adjusted_by_the_labelled_prior(tau, tmp_path):
    trainer = fixmatch(
        str(tmp_path / "run"), unlabeled_logit_adjustment=tau, confidence_threshold=UNTRAINED_CONFIDENCE, **LA
    )
    seen = []
    forward = trainer.forward_views

    def spy(model, batches):
        logits, outputs = forward(model, batches)
        seen.append((logits.detach(), [len(next(iter(b.values()))) for b in batches]))
        return logits, outputs

    trainer.forward_views = spy
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)
    ((logits, sizes),) = seen
    _, weak, strong = logits.split(sizes)
    confidence, pseudo = weak.softmax(1).max(1)
    counts = torch.tensor(trainer.class_counts, dtype=torch.float64)
    adjusted = strong + (tau * torch.log(counts / counts.sum())).float()
    expected = (
        F.cross_entropy(adjusted, pseudo, reduction="none") * (confidence >= UNTRAINED_CONFIDENCE).float()
    ).mean()
    assert (confidence >= UNTRAINED_CONFIDENCE).any() and not (
        confidence >= UNTRAINED_CONFIDENCE
    ).all()  # the mask acts on this batch
    assert float(trainer._stats[0]) == pytest.approx(float(expected), rel=1e-6)


def test_evaluation_and_the_saved_model_use_the_ema_weights(tmp_path):
    out = str(tmp_path / "run")
    trainer = fixmatch(out, max_steps=6, save_strategy="steps", save_steps=3, ema_decay=0.5)
    trainer.train()
    average = trainer.average.weights
    for name, param in trainer.model.named_parameters():  # after training the model IS the average
        torch.testing.assert_close(param.detach(), average[name])
    raw = trainer.method_state()["raw"]
    assert any(not torch.equal(raw[name], average[name]) for name in average)
    validation = gaussian_problem(VALIDATION_COUNTS, seed=2)
    x = torch.stack([e["features"] for e in validation.examples])
    y = torch.tensor([e["labels"] for e in validation.examples])

    def loss_with(tensors: dict) -> float:
        model = trainer.model
        saved = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(tensors[n])
            value = float(F.cross_entropy(model(features=x).logits, y))
            for n, p in model.named_parameters():
                p.copy_(saved[n])
        return value

    assert trainer.evaluate()["eval_loss"] == pytest.approx(loss_with(average), rel=1e-5)
    assert loss_with(raw) != pytest.approx(loss_with(average), rel=1e-5)
    # a checkpoint's model file is its average; the raw weights are in its state, for resuming
    checkpoint = os.path.join(out, "checkpoint-3")
    state = load_state(checkpoint, "fixmatch_state_rank0")["method"]
    saved = load_file(os.path.join(checkpoint, "model.safetensors"))
    for name in saved:
        torch.testing.assert_close(saved[name], state["ema"]["weights"][name])
    assert any(not torch.equal(saved[name], state["raw"][name]) for name in saved)


def test_evaluation_during_training_sees_the_average_and_training_steps_on_the_raw_weights(tmp_path):
    trainer = fixmatch(str(tmp_path / "run"), max_steps=4, eval_strategy="steps", eval_steps=2, ema_decay=0.5)
    seen = []
    original = trainer.evaluation_loss

    def spy(model, inputs, return_outputs):
        average = trainer.average.weights
        seen.append(all(torch.equal(p, average[n]) for n, p in model.named_parameters()))
        seen.append(any(not torch.equal(p, raw[-1][n]) for n, p in model.named_parameters()))
        return original(model, inputs, return_outputs)

    class RawAfterStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raw.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})

    raw: list[dict] = []
    trainer.evaluation_loss = spy
    trainer.add_callback(RawAfterStep())
    trainer.train()
    assert len(seen) >= 4 and all(seen)


def test_image_views_differ_are_seeded_per_sample_and_keep_the_shape():
    images = torch.rand(3, 3, 16, 16)
    batch = {"pixel_values": (images - 0.5) / 0.25}
    views = ImageViews(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    seeds = torch.tensor([11, 12, 13])
    weak, strong = views.weak(batch, seeds), views.strong(batch, seeds)
    assert weak["pixel_values"].shape == strong["pixel_values"].shape == (3, 3, 16, 16)
    assert not torch.equal(weak["pixel_values"], strong["pixel_values"])
    assert not torch.equal(weak["pixel_values"], batch["pixel_values"])
    again = views.strong(batch, seeds)
    assert torch.equal(strong["pixel_values"], again["pixel_values"])  # a function of the seeds
    alone = views.strong({"pixel_values": batch["pixel_values"][1:2]}, seeds[1:2])
    assert torch.equal(alone["pixel_values"][0], strong["pixel_values"][1])  # sample i depends on seeds[i] only
    other = views.strong(batch, seeds + 100)
    assert not torch.equal(other["pixel_values"], strong["pixel_values"])
    # the weak view is a flip and a shift: every output pixel is an input pixel of the same channel
    crop = flip_and_crop(images, seeds)
    for i in range(3):
        assert set(crop[i, 0].flatten().tolist()) <= set(images[i, 0].flatten().tolist())
    with pytest.raises(ValueError, match="pixel_values"):
        views.weak({"input_ids": torch.zeros(2, 4, dtype=torch.long)}, seeds[:2])
    many = views.strong({"pixel_values": torch.rand(128, 3, 16, 16)}, torch.arange(128))  # every op, many magnitudes
    assert torch.isfinite(many["pixel_values"]).all()


def test_fixmatch_runs_on_images_with_the_default_views(tmp_path):
    arch = next(a for a in ARCHITECTURES if a.name == "vit")
    torch.manual_seed(0)
    model = arch.build()
    train = class_signal_dataset("image", [12, 6, 3], seed=0)
    validation = class_signal_dataset("image", [3, 3, 3], seed=1)
    pool = class_signal_dataset("image", [6, 6, 6], seed=2)
    args = FixMatchConfig(
        output_dir=str(tmp_path / "run"),
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        per_device_train_batch_size=3,
        max_steps=2,
        confidence_threshold=0.3,
        logging_strategy="steps",
        logging_steps=1,
    )
    trainer = FixMatchTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=validation, unlabeled_dataset=pool
    )
    assert isinstance(trainer.views, ImageViews)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert any("fixmatch/mask_rate" in log for log in trainer.state.log_history)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"unlabeled_dataset": None}, "needs unlabeled_dataset="),
        ({"unlabeled_dataset": ListDataset([])}, "unlabeled_dataset is empty"),
        ({"unlabeled_dataset": ListDataset([{"pixels": torch.zeros(8)}])}, r"columns \['pixels'\] do not give"),
        ({"views": None}, r"default views for images \(pixel_values\) and tokenised text"),
        ({"views": "flip"}, "views must be Views"),
    ],
)
def test_bad_pools_and_views_are_refused_before_training(kwargs, message, tmp_path):
    with pytest.raises((ValueError, TypeError), match=message):
        build(FIXMATCH, str(tmp_path / "run"), trainer_kwargs=kwargs)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"confidence_threshold": 0.0}, r"confidence_threshold must lie in \(0, 1\]"),
        ({"confidence_threshold": 1.2}, r"confidence_threshold must lie in \(0, 1\]"),
        ({"mu": 0}, "mu must be >= 1"),
        ({"lambda_u": -1.0}, "lambda_u must be >= 0"),
        ({"ema_decay": 1.0}, r"ema_decay must lie in \[0, 1\)"),
        ({"unlabeled_logit_adjustment": -1.0}, "unlabeled_logit_adjustment must be >= 0"),
    ],
)
def test_bad_fixmatch_settings_fail_when_the_config_is_built(settings, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        FixMatchConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **settings)


def test_the_pool_labels_are_never_read(tmp_path):
    def pool(mode: str) -> ListDataset:
        examples = [dict(e) for e in gaussian_problem(UNLABELED_COUNTS, seed=3).examples]
        for e in examples:
            if mode == "removed":
                del e["labels"]
            else:
                e["labels"] = 0
        return ListDataset(examples)

    runs = []
    for mode in ("removed", "constant"):
        trainer = build(FIXMATCH, str(tmp_path / mode), trainer_kwargs={"unlabeled_dataset": pool(mode)})
        trainer.train()
        runs.append(weights(trainer))
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


class StubTokenizer:
    """What TokenMasking reads of a tokenizer: pad 0, unknown 1, [CLS] 2, [MASK] 3."""

    mask_token_id, unk_token_id, all_special_ids = 3, 1, [0, 1, 2, 3]


def test_token_masking_masks_only_real_tokens_from_the_seeds():
    tokenizer = StubTokenizer()
    ids = torch.zeros(2, 31, dtype=torch.long)
    ids[:, 0] = 2
    ids[0, 1:] = torch.arange(1, 31) % 20 + 10
    ids[1, 1:3] = torch.tensor([11, 12])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    views = TokenMasking(tokenizer, fraction=0.3)
    seeds = torch.tensor([5, 6])
    strong = views.strong(dict(batch), seeds)["input_ids"]
    assert torch.equal(views.weak(dict(batch), seeds)["input_ids"], batch["input_ids"])
    masked = strong == tokenizer.mask_token_id
    special = torch.isin(batch["input_ids"], torch.tensor(tokenizer.all_special_ids))
    assert not (masked & special).any() and not (masked & ~batch["attention_mask"].bool()).any()
    assert 0.1 < masked[0].sum().item() / 30 < 0.5
    assert torch.equal(strong, views.strong(dict(batch), seeds)["input_ids"])
    assert not torch.equal(strong, views.strong(dict(batch), seeds + 1)["input_ids"])
    assert torch.equal(strong[~masked], batch["input_ids"][~masked])
    left = torch.cat([torch.zeros(2, 5, dtype=torch.long), ids], 1)  # the same texts, padded on the left
    shifted = views.strong({"input_ids": left, "attention_mask": (left != 0).long()}, seeds)["input_ids"]
    assert torch.equal(shifted[:, 5:], strong)


def test_fixmatch_runs_on_text_with_the_default_views(tmp_path):
    arch = next(a for a in ARCHITECTURES if a.name == "bert")
    torch.manual_seed(0)
    model = arch.build()

    train = class_signal_dataset("text", [12, 6, 3], seed=0)
    args = FixMatchConfig(
        output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True, save_strategy="no", max_steps=2,
        per_device_train_batch_size=3, confidence_threshold=0.3,
    )  # fmt: skip
    trainer = FixMatchTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=class_signal_dataset("text", [3, 3, 3], seed=1),
        unlabeled_dataset=class_signal_dataset("text", [6, 6, 6], seed=2),
        processing_class=StubTokenizer(),
    )
    assert isinstance(trainer.views, TokenMasking)
    trainer.train()
    assert trainer.state.global_step == 2


def test_an_ema_over_sharded_parameters_is_refused_with_the_alternatives(tmp_path):
    trainer = fixmatch(str(tmp_path / "run"))
    trainer.require_whole_parameters("averages the full weights (ema_decay)", ", or set ema_decay=None")  # fine here
    trainer.is_fsdp_enabled = True
    with pytest.raises(ValueError, match=r"averages the full weights \(ema_decay\), which FSDP .*ema_decay=None"):
        trainer.require_whole_parameters("averages the full weights (ema_decay)", ", or set ema_decay=None")
