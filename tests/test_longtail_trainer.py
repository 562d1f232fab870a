"""LongTailTrainer: losses in the loop, cost-sensitive refreshes, DRW, post-hoc adjustment, accumulation, resume."""

import numpy as np
import pytest
import torch
from tiny import TinyMLPConfig, TinyMLPForClassification, gaussian_problem, per_class_recall

from selmix_hf.longtail_trainer import LongTailConfig, LongTailTrainer
from selmix_hf.losses import LogitAdjustedLoss

K = 4
COUNTS = [200, 60, 15, 5]


def config(tmp_path, **overrides) -> LongTailConfig:
    base = dict(
        output_dir=str(tmp_path / "out"),
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        logging_strategy="no",
        per_device_train_batch_size=16,
        max_steps=4,
        optim="sgd",
        learning_rate=0.1,
        lr_scheduler_type="constant",
    )
    return LongTailConfig(**{**base, **overrides})


def trainer_for(tmp_path, seed=0, **overrides) -> LongTailTrainer:
    torch.manual_seed(seed)
    return LongTailTrainer(
        model=TinyMLPForClassification(TinyMLPConfig(num_labels=K)),
        args=config(tmp_path, **overrides),
        train_dataset=gaussian_problem(COUNTS, seed=seed + 1, spread=0.8),
        eval_dataset=gaussian_problem([25] * K, seed=seed + 2, spread=0.8),
    )


@pytest.mark.slow
def test_cost_sensitive_min_recall_beats_ce_on_the_worst_class(tmp_path):
    gaps = []
    for seed in range(2):
        recalls = {}
        for loss_type in ("ce", "cost_sensitive"):
            trainer = trainer_for(
                tmp_path / f"{loss_type}{seed}",
                seed=seed,
                loss_type=loss_type,
                max_steps=400,
                validation_refresh_steps=20,
                learning_rate=0.05,
            )
            trainer.train()
            recalls[loss_type] = per_class_recall(trainer.model, trainer.validation_dataset or trainer.eval_dataset, K)
        gaps.append(recalls["cost_sensitive"].min() - recalls["ce"].min())
    assert min(gaps) > 0.1, gaps


@pytest.mark.parametrize("loss_type", ["weighted_ce", "logit_adjusted", "focal"])
def test_gradient_accumulation_matches_one_large_batch(loss_type, tmp_path):
    whole = trainer_for(
        tmp_path / "whole",
        loss_type=loss_type,
        per_device_train_batch_size=16,
        max_steps=4,
        logging_strategy="steps",
        logging_steps=1,
    )
    accumulated = trainer_for(
        tmp_path / "acc",
        loss_type=loss_type,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=4,
        max_steps=4,
        logging_strategy="steps",
        logging_steps=1,
    )
    whole.train()
    accumulated.train()
    losses = [[log["loss"] for log in t.state.log_history if "loss" in log] for t in (whole, accumulated)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    for p, q in zip(whole.model.parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_the_configured_loss_is_the_training_loss(tmp_path):
    trainer = trainer_for(tmp_path, loss_type="logit_adjusted", loss_options='{"tau": 0.7}')
    assert isinstance(trainer.loss_fn, LogitAdjustedLoss) and trainer.loss_fn.tau == 0.7
    assert trainer.class_counts == COUNTS
    batch = {"features": torch.randn(6, 8), "labels": torch.tensor([0, 1, 2, 3, 3, 2])}
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    logits = trainer.model(features=batch["features"]).logits
    prior = torch.tensor(COUNTS, dtype=torch.float32) / sum(COUNTS)
    torch.testing.assert_close(
        loss, torch.nn.functional.cross_entropy(logits + 0.7 * torch.log(prior), batch["labels"])
    )


def test_drw_switches_reweighting_on_at_the_given_epoch(tmp_path):
    trainer = trainer_for(tmp_path, loss_type="ldam", loss_options={"scale": 1.0}, drw_start_epoch=1.0, max_steps=30)
    seen = []
    original = trainer.loss_fn.forward
    trainer.loss_fn.forward = lambda logits, labels: (
        seen.append(trainer.loss_fn.reweighting),
        original(logits, labels),
    )[1]
    trainer.train()
    steps_per_epoch = len(trainer.get_train_dataloader())
    assert seen[:steps_per_epoch] == [False] * steps_per_epoch and all(seen[steps_per_epoch + 1 :])


def test_posthoc_adjustment_at_prediction(tmp_path):
    trainer = trainer_for(tmp_path, loss_type="ce", posthoc_tau=1.0)
    trainer.train()
    test = gaussian_problem([5] * K, seed=9, spread=0.8)
    output = trainer.predict(test)
    x = torch.stack([e["features"] for e in test.examples])
    trainer.model.eval()
    with torch.no_grad():
        raw = trainer.model(features=x).logits
    prior = torch.tensor(COUNTS, dtype=torch.float32) / sum(COUNTS)
    np.testing.assert_allclose(output.predictions, (raw - torch.log(prior)).numpy(), rtol=1e-5, atol=1e-6)


def test_resume_restores_the_cost_sensitive_multipliers(tmp_path):
    def run(folder, resume=None):
        trainer = trainer_for(
            tmp_path / folder,
            loss_type="cost_sensitive",
            max_steps=8,
            save_strategy="steps",
            save_steps=4,
            validation_refresh_steps=3,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run("straight")
    resumed = run("resumed", str(tmp_path / "straight" / "out" / "checkpoint-4"))
    torch.testing.assert_close(straight.loss_fn.objective.lam, resumed.loss_fn.objective.lam)
    torch.testing.assert_close(straight.loss_fn.mixing, resumed.loss_fn.mixing)
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"loss_type": "ldam_drw"}, "valid loss types are: ce, weighted_ce"),
        ({"class_counts": [10, 5, 2]}, "class_counts has 3 entries but the model has num_labels=4"),
        ({"class_counts": [10, 5, 0, 2]}, r"classes \[2\] have zero training samples"),
        ({"loss_type": "ce", "drw_start_epoch": 1.0}, "has no re-weighting stage"),
        ({"loss_options": {"gamma": 2.0}}, r"does not take option\(s\) \['gamma'\]"),
    ],
)
def test_bad_input_is_a_clear_error(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        trainer_for(tmp_path, **overrides)


def test_posthoc_adjustment_applies_to_unlabelled_prediction(tmp_path):
    trainer = trainer_for(tmp_path, loss_type="ce", posthoc_tau=1.0)
    test = gaussian_problem([5] * K, seed=9, spread=0.8)
    unlabelled = type(test)([{"features": e["features"]} for e in test.examples])
    labelled_logits = trainer.predict(test).predictions
    np.testing.assert_allclose(trainer.predict(unlabelled).predictions, labelled_logits, rtol=1e-6)


def test_best_model_loading_restores_every_weight_of_a_vit(tmp_path):
    """transformers 5.24 lays ViT out differently in memory than on disk; Trainer's best-model load missed its
    encoder, so the card would have described a mix of the best and the last weights."""
    from tiny import ARCHITECTURES, class_signal_dataset

    torch.manual_seed(0)
    model = next(a for a in ARCHITECTURES if a.name == "vit").build()
    args = config(
        tmp_path,
        max_steps=8,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,
        learning_rate=1e-2,
        optim="adamw_torch",
    )
    trainer = LongTailTrainer(
        model=model,
        args=args,
        train_dataset=class_signal_dataset("image", [20, 8, 4]),
        eval_dataset=class_signal_dataset("image", [3, 3, 3], seed=1),
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    best = type(model).from_pretrained(trainer.state.best_model_checkpoint)
    for (name, param), reference in zip(trainer.model.named_parameters(), best.parameters()):
        torch.testing.assert_close(param, reference, rtol=0, atol=0, msg=name)


def test_an_iterable_training_set_trains_when_the_class_counts_are_given(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from gaussian_problem(COUNTS, seed=1).examples

    trainer = LongTailTrainer(
        model=TinyMLPForClassification(TinyMLPConfig(num_labels=K)),
        args=config(tmp_path, max_steps=3, class_counts=COUNTS),
        train_dataset=Stream(),
    )
    trainer.train()
    assert trainer.state.global_step == 3
    with pytest.raises(TypeError, match="give class_counts in the config"):
        LongTailTrainer(
            model=TinyMLPForClassification(TinyMLPConfig(num_labels=K)),
            args=config(tmp_path, max_steps=3),
            train_dataset=Stream(),
        )
