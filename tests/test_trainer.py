"""SelMixTrainer over tiny models: steps, learning rates, learning, gradient accumulation, resume, eval, errors."""

import json
import os
import re

import numpy as np
import pytest
import torch
from tiny import (
    ARCHITECTURES,
    TinyMLPConfig,
    TinyMLPForClassification,
    class_signal_dataset,
    gaussian_problem,
    per_class_recall,
    pretend_fsdp,
)
from transformers import HfArgumentParser, TrainerCallback

from selmix_hf import make_compute_metrics, sampling_distribution
from selmix_hf.config import PUBLISHED_SETTINGS, SelMixConfig
from selmix_hf.trainer import SelMixTrainer


def config(tmp_path, **overrides) -> SelMixConfig:
    base = dict(
        output_dir=str(tmp_path / "out"),
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        logging_strategy="no",
        per_device_train_batch_size=2,
        max_steps=1,
        per_device_eval_batch_size=4,
    )
    return SelMixConfig(**{**base, **overrides})


class GradientRecorder(TrainerCallback):
    """Snapshots parameters and (clipped) gradients just before the optimiser step, and parameters after it."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.name)
def test_a_selmix_step_moves_head_and_backbone_at_their_rates(arch, tmp_path):
    torch.manual_seed(0)
    model = arch.build()
    recorder = GradientRecorder()
    args = config(
        tmp_path,
        optim="sgd",
        learning_rate=0.5,
        backbone_lr_ratio=0.1,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
    )
    trainer = SelMixTrainer(
        model=model,
        args=args,
        callbacks=[recorder],
        train_dataset=class_signal_dataset(arch.kind, [8, 6, 4]),
        eval_dataset=class_signal_dataset(arch.kind, [2, 2, 2], seed=1),
    )
    trainer.train()
    head_prefix = arch.head + "."
    moved = {"head": 0, "backbone": 0}
    for name, grad in recorder.grads.items():
        if grad is None or grad.abs().max() < 1e-6:
            continue
        part = "head" if name.startswith(head_prefix) else "backbone"
        lr = 0.5 if part == "head" else 0.05
        torch.testing.assert_close(recorder.after[name], recorder.before[name] - lr * grad, rtol=1e-4, atol=1e-6)
        moved[part] += 1
    assert moved["head"] == 2 and moved["backbone"] > 0


def test_batchnorm_statistics_stay_frozen(tmp_path):
    arch = next(a for a in ARCHITECTURES if a.name == "timm-resnet")
    model = arch.build()
    stats = {n: b.clone() for n, b in model.named_buffers() if "running_mean" in n}
    trainer = SelMixTrainer(
        model=model,
        args=config(tmp_path, max_steps=2),
        train_dataset=class_signal_dataset("image", [8, 6, 4]),
        eval_dataset=class_signal_dataset("image", [2, 2, 2], seed=1),
    )
    trainer.train()
    for name, buffer in model.named_buffers():
        if name in stats:
            torch.testing.assert_close(buffer, stats[name])
    unfrozen = arch.build()
    unfrozen.load_state_dict(model.state_dict())
    SelMixTrainer(
        model=unfrozen,
        args=config(tmp_path, max_steps=2, freeze_batchnorm=False),
        train_dataset=class_signal_dataset("image", [8, 6, 4]),
        eval_dataset=class_signal_dataset("image", [2, 2, 2], seed=1),
    ).train()
    assert any(not torch.equal(b, stats[n]) for n, b in unfrozen.named_buffers() if n in stats)


# -- learning ---------------------------------------------------------------------------------------

K = 4
LT_COUNTS = [400, 120, 30, 6]


def ce_start(seed: int) -> tuple[TinyMLPForClassification, object]:
    """A CE-trained MLP on long-tailed Gaussians: it never predicts the rarest class."""
    torch.manual_seed(seed)
    model = TinyMLPForClassification(TinyMLPConfig(num_labels=K))
    train = gaussian_problem(LT_COUNTS, seed=seed + 10)
    x = torch.stack([e["features"] for e in train.examples])
    y = torch.tensor([e["labels"] for e in train.examples])
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(300):
        batch = torch.randint(0, len(y), (64,), generator=gen)
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(features=x[batch]).logits, y[batch]).backward()
        optimiser.step()
    return model, train


def fine_tune(seed: int, pair_distribution: str, tmp_path) -> tuple[np.ndarray, np.ndarray]:
    model, train = ce_start(seed)
    test = gaussian_problem([300] * K, seed=seed + 30)
    before = per_class_recall(model, test, K)
    args = config(
        tmp_path,
        max_steps=600,
        per_device_train_batch_size=32,
        gain_refresh_steps=5,
        learning_rate=0.01,
        optim="sgd",
        lr_scheduler_type="constant",
        pair_distribution=pair_distribution,
        seed=seed,
    )
    SelMixTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=gaussian_problem([25] * K, seed=seed + 20)
    ).train()
    return before, per_class_recall(model, test, K)


@pytest.mark.slow
def test_selmix_lifts_the_worst_class_and_beats_uniform_pairs(tmp_path):
    selmix, uniform = [], []
    for seed in range(3):
        before, after = fine_tune(seed, "gain", tmp_path)
        assert before.min() < 0.05  # the start neglects the tail
        assert after.min() > before.min() + 0.3
        selmix.append(after.min())
        uniform.append(fine_tune(seed, "uniform", tmp_path)[1].min())
    assert np.mean(selmix) > np.mean(uniform) + 0.05, (selmix, uniform)


# -- gradient accumulation and resume -------------------------------------------------------------


def mlp_run(tmp_path, name: str, **overrides):
    torch.manual_seed(0)
    model = TinyMLPForClassification(TinyMLPConfig(num_labels=K))
    settings = dict(
        optim="sgd",
        learning_rate=0.1,
        lr_scheduler_type="constant",
        gain_refresh_steps=2,
        logging_strategy="steps",
        logging_steps=1,
    )
    args = config(tmp_path / name, **{**settings, **overrides})
    return SelMixTrainer(
        model=model,
        args=args,
        train_dataset=gaussian_problem([40, 30, 20, 10], seed=1),
        eval_dataset=gaussian_problem([5] * K, seed=2),
    )


def selmix_state(trainer: SelMixTrainer) -> dict:
    state = trainer.method_state()
    return {
        "multipliers": state["objective"]["multipliers"],
        "distribution": state["distribution"],
        "gains": state["gains"],
        "history": state["max_gain_history"],
        "sampler": state["sampler"]["generator"],
        "drawn": state["sampler"]["batches_drawn"],
        "mix": state["mix_generator"],
    }


@pytest.mark.parametrize("arch_name", ["bert"])  # the MLP and odd batch sizes: tests/test_contract.py
def test_resume_continues_exactly_where_it_stopped(arch_name, tmp_path):
    def build(folder):
        torch.manual_seed(0)
        if arch_name == "tiny-mlp":
            model = TinyMLPForClassification(TinyMLPConfig(num_labels=K))
            data = gaussian_problem([40, 30, 20, 10], seed=1), gaussian_problem([5] * K, seed=2)
        else:
            model = next(a for a in ARCHITECTURES if a.name == arch_name).build()
            data = class_signal_dataset("text", [30, 12, 6]), class_signal_dataset("text", [3, 3, 3], seed=1)
        args = config(
            tmp_path / folder,
            max_steps=8,
            save_strategy="steps",
            save_steps=4,
            gain_refresh_steps=3,
            per_device_train_batch_size=4,
            objective="min_recall",
        )
        return SelMixTrainer(model=model, args=args, train_dataset=data[0], eval_dataset=data[1])

    straight = build("straight")
    straight.train()
    checkpoint = tmp_path / "straight" / "out" / "checkpoint-4"
    assert (checkpoint / "selmix_state_rank0.json").exists() and (
        checkpoint / "selmix_state_rank0.safetensors"
    ).exists()
    resumed = build("resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    a, b = selmix_state(straight), selmix_state(resumed)
    for key in a:
        if isinstance(a[key], dict):
            for sub in a[key]:
                torch.testing.assert_close(a[key][sub], b[key][sub])
        elif isinstance(a[key], torch.Tensor):
            torch.testing.assert_close(a[key], b[key], msg=key)
        else:
            assert a[key] == b[key], key


def test_resume_from_a_checkpoint_without_selmix_state_is_a_clear_error(tmp_path):
    trainer = mlp_run(tmp_path, "plain", max_steps=1)
    (tmp_path / "empty-checkpoint").mkdir()
    with pytest.raises(FileNotFoundError, match="no SelMixTrainer state"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "empty-checkpoint"))


def test_checkpoint_holds_state_files_and_logs_refreshes(tmp_path):
    trainer = mlp_run(tmp_path, "logs", max_steps=4, save_strategy="steps", save_steps=4)
    trainer.train()
    folder = tmp_path / "logs" / "out" / "checkpoint-4"
    assert not [f for f in os.listdir(folder) if ".tmp" in f]
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    refreshes = [log for log in history if "selmix/max_gain" in log]
    assert [log["step"] for log in refreshes] == [0, 2]
    assert {"selmix/min_recall", "selmix/pair_entropy", "selmix/lam_0"} <= set(refreshes[0])


# -- evaluation and prediction ----------------------------------------------------------------------


def test_evaluate_and_predict_behave_like_the_wrapped_model(tmp_path):
    trainer = mlp_run(tmp_path, "eval", max_steps=2)
    trainer.compute_metrics = make_compute_metrics(K, class_counts=[40, 30, 20, 10])
    trainer.train()
    test = gaussian_problem([7] * K, seed=5)
    output = trainer.predict(test)
    x = torch.stack([e["features"] for e in test.examples])
    trainer.model.eval()
    with torch.no_grad():
        direct = trainer.model(features=x).logits
    np.testing.assert_allclose(output.predictions, direct.numpy(), rtol=1e-6)
    assert output.predictions.shape == (28, K)
    expected_loss = torch.nn.functional.cross_entropy(direct, torch.tensor(output.label_ids)).item()
    assert output.metrics["test_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert {"test_min_recall", "test_h_mean", "test_tail_recall"} <= set(output.metrics)
    assert "eval_min_recall" in trainer.evaluate(test)


# -- configuration --------------------------------------------------------------------------------


def test_config_parses_from_the_command_line(tmp_path):
    (args,) = HfArgumentParser(SelMixConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--objective",
            "mean_recall_min_coverage",
            "--objective_options",
            '{"alpha": 0.9}',
            "--class_prior",
            "0.5",
            "0.3",
            "0.2",
            "--gain_refresh_steps",
            "20",
            "--backbone_lr_ratio",
            "0.5",
            "--use_cpu",
            "--report_to",
            "none",
        ]
    )
    assert args.objective == "mean_recall_min_coverage" and args.objective_options == {"alpha": 0.9}
    assert args.class_prior == [0.5, 0.3, 0.2] and args.gain_refresh_steps == 20 and args.backbone_lr_ratio == 0.5
    assert args.ignore_data_skip and args.learning_rate == 3e-4


def test_published_preset(tmp_path):
    args = SelMixConfig.published(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    for key, value in PUBLISHED_SETTINGS.items():
        assert getattr(args, key) == value or str(getattr(args, key)).endswith(str(value)), key
    assert args.sampling_temperature == 0.1 and not args.scale_free_temperature  # the paper's T, on raw gains


def test_default_temperature_is_scale_free(tmp_path):
    """The library default (chosen on the quality grid's validation split) differs from the published T = 0.1."""
    args = SelMixConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert args.scale_free_temperature and args.sampling_temperature == 1.0


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"objective": "worst_recall"}, "valid objectives are: .*min_recall"),
        ({"gain_estimator": "taylor"}, "selmix, exact"),
        ({"pair_distribution": "random"}, "gain, uniform"),
        ({"sampling_temperature": 0.0}, "positive"),
        ({"ignore_data_skip": False}, "ignore_data_skip=True"),
        ({"objective_options": "{alpha: 1"}, "not valid JSON"),
        ({"equal_norm_prototypes": True, "gain_estimator": "exact"}, "gain_estimator='selmix' only"),
        ({"validation_refresh_per_class": 0}, "validation_refresh_per_class must be >= 1"),
    ],
)
def test_bad_config_is_a_clear_error(settings, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **settings)


@pytest.mark.parametrize(
    "objective, options, message",
    [  # ../shared/repro/r9_errors.py
        ("min_recall", {"omega": "fifty"}, "option 'omega' must be float, got 'fifty'"),
        ("min_recall", {"omega": None}, "option 'omega' must be float, got None"),
        ("mean_recall_min_coverage", {"alpha": "0.95"}, "option 'alpha' must be float, got '0.95'"),
    ],
)
def test_wrongly_typed_objective_option_names_the_option_and_type(objective, options, message, tmp_path):
    with pytest.raises(TypeError, match=message):
        config(tmp_path, objective=objective, objective_options=options)


def test_a_run_that_cannot_move_its_objective_warns_and_its_card_says_so(tmp_path, caplog):
    """../shared/repro/r10_noop.py: a fresh head never predicting some classes gives gains ~0 at every refresh."""
    torch.manual_seed(0)
    model = next(a for a in ARCHITECTURES if a.name == "bert").build()
    trainer = SelMixTrainer(
        model=model,
        args=config(tmp_path, max_steps=8, gain_refresh_steps=2),
        train_dataset=class_signal_dataset("text", [30, 12, 6]),
        eval_dataset=class_signal_dataset("text", [3, 3, 3], seed=1),
    )
    with caplog.at_level("WARNING", logger="selmix_hf.trainer"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "have been negligible" in r.getMessage()]
    assert len(warnings) == 1  # once, at the third negligible refresh in a row
    assert "never predicts" in warnings[0] and "freshly initialised" in warnings[0] and "train it first" in warnings[0]
    assert not trainer.objective_was_moved()
    stage = trainer.card_stage()
    assert stage["objective"] is None and "could not be moved" in stage["title"]
    card = trainer.create_model_card().text
    assert "Optimised for" not in card and "(optimised)" not in card


def test_a_trained_classifier_moves_its_objective_without_the_warning(tmp_path, caplog):
    model, train = ce_start(0)  # it never predicts its rarest class: min recall's gains are ~0, mean recall's are not
    trainer = SelMixTrainer(
        model=model,
        args=config(
            tmp_path, max_steps=6, gain_refresh_steps=2, learning_rate=0.05, optim="sgd", objective="mean_recall"
        ),
        train_dataset=train,
        eval_dataset=gaussian_problem([25] * K, seed=20),
    )
    with caplog.at_level("WARNING", logger="selmix_hf.trainer"):
        trainer.train()
    assert not [r for r in caplog.records if "have been negligible" in r.getMessage()]
    assert trainer.objective_was_moved() and trainer.card_stage()["objective"] == "mean_recall"


def with_label(dataset, index: int, label: int):
    dataset.examples[index] = {**dataset.examples[index], "labels": label}
    return dataset


@pytest.mark.parametrize(
    "case, message",
    [
        ("validation missing a class", r"classes \[3\] have no sample in the validation set"),
        ("train label outside num_labels", r"training labels contain values outside \[0, 4\): \[7\]"),
        ("validation label outside num_labels", r"validation labels contain values outside \[0, 4\): \[-2\]"),
        ("empty validation set", "validation set is empty"),
        ("no validation set", "needs a labelled validation set"),
        ("model without head", "cannot find the classification head"),
    ],
)
def test_bad_input_fails_before_training(case, message, tmp_path):
    model = TinyMLPForClassification(TinyMLPConfig(num_labels=K))
    train, validation = gaussian_problem([10, 8, 6, 4], seed=1), gaussian_problem([3] * K, seed=2)
    if case == "validation missing a class":
        validation = gaussian_problem([3, 3, 3, 0], seed=2)
    elif case == "train label outside num_labels":
        train = with_label(train, 0, 7)
    elif case == "validation label outside num_labels":
        validation = with_label(validation, 1, -2)
    elif case == "empty validation set":
        validation = gaussian_problem([0] * K, seed=2)
    elif case == "no validation set":
        validation = None
    elif case == "model without head":
        model.classifier = torch.nn.Identity()
    with pytest.raises(ValueError, match=message):
        SelMixTrainer(model=model, args=config(tmp_path), train_dataset=train, eval_dataset=validation)


def test_custom_objective_instance_is_used(tmp_path):
    from selmix_hf import CustomObjective

    objective = CustomObjective(K, lambda c: c[3, 3] / c[3].sum(), name="tail_recall")
    model = TinyMLPForClassification(TinyMLPConfig(num_labels=K))
    trainer = SelMixTrainer(
        model=model,
        args=config(tmp_path, max_steps=2, logging_strategy="steps", logging_steps=1),
        objective=objective,
        train_dataset=gaussian_problem([10, 8, 6, 4], seed=1),
        eval_dataset=gaussian_problem([3] * K, seed=2),
    )
    trainer.train()
    assert any("selmix/tail_recall" in log for log in trainer.state.log_history)


# -- early stop, estimators, mixed precision ------------------------------------------------------


def test_early_stop_on_gain_plateau(tmp_path):
    stopped = mlp_run(
        tmp_path,
        "stop",
        max_steps=20,
        gain_refresh_steps=1,
        early_stop_on_gain_plateau=True,
        plateau_window=3,
        plateau_tolerance=10.0,
    )
    stopped.train()
    assert stopped.state.global_step == 2  # refreshes at steps 0, 1, 2: the window is full and within tolerance
    running = mlp_run(
        tmp_path,
        "run",
        max_steps=6,
        gain_refresh_steps=1,
        early_stop_on_gain_plateau=True,
        plateau_window=3,
        plateau_tolerance=0.0,
    )
    running.train()
    assert running.state.global_step == 6


@pytest.mark.parametrize("estimator", ["selmix", "exact"])
def test_both_estimators_drive_the_sampler(estimator, tmp_path):
    model, train = ce_start(0)
    args = config(tmp_path, max_steps=3, gain_refresh_steps=1, gain_estimator=estimator, per_device_train_batch_size=8)
    trainer = SelMixTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=gaussian_problem([10] * K, seed=2)
    )
    trainer.train()
    assert torch.isfinite(trainer.gains).all() and trainer.gains.max() > 0
    torch.testing.assert_close(trainer.sampler.probabilities, trainer.distribution.double())
    torch.testing.assert_close(trainer.distribution, sampling_distribution(trainer.gains, 1.0, scale_free=True))
    assert (trainer.distribution[trainer.gains <= 0] < 1e-6).all()  # pairs without gain are not drawn


@pytest.mark.parametrize("equal_norm", [False, True])
def test_equal_norm_prototypes_reach_the_gain_estimate(equal_norm, tmp_path, monkeypatch):
    import selmix_hf.trainer as trainer_module
    from selmix_hf import equal_norm_prototypes

    seen = {}
    original_prototypes, original_gains = trainer_module.class_prototypes, trainer_module.gain_matrix

    def spy_prototypes(*args):
        seen["raw"] = original_prototypes(*args)
        return seen["raw"]

    def spy_gains(objective, confusion, prototypes, *args, **kwargs):
        seen["used"] = prototypes
        return original_gains(objective, confusion, prototypes, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "class_prototypes", spy_prototypes)
    monkeypatch.setattr(trainer_module, "gain_matrix", spy_gains)
    trainer = mlp_run(tmp_path, "norm", max_steps=1, equal_norm_prototypes=equal_norm)
    logs = trainer.refresh()
    raw_norms = seen["raw"].norm(dim=1)
    assert raw_norms.max() > 1.05 * raw_norms.min()  # the tiny model's prototypes differ in norm to begin with
    assert logs["selmix/prototype_norm_ratio"] == pytest.approx(float(raw_norms.max() / raw_norms.min()))
    torch.testing.assert_close(seen["used"], equal_norm_prototypes(seen["raw"]) if equal_norm else seen["raw"])
    assert trainer.card_stage()["settings"]["equal_norm_prototypes"] is equal_norm


def test_bf16_mixed_precision_runs(tmp_path):
    trainer = mlp_run(tmp_path, "bf16", max_steps=3, bf16=True)
    trainer.train()
    assert trainer.state.global_step == 3 and torch.isfinite(trainer.gains).all()


# -- review fixes: BERT accumulation, the mixed loss itself, priors, loaders --------------------------


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=3,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )


def test_gradient_accumulation_with_a_bert_model_that_accepts_loss_kwargs(tmp_path):
    """BERT's forward takes **kwargs, the case where the Trainer used to skip dividing by the accumulation steps."""
    runs = []
    for name, batch, steps in (("whole", 8, 1), ("acc", 2, 4)):
        trainer = SelMixTrainer(
            model=tiny_bert(),
            args=config(
                tmp_path / name,
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=steps,
                max_steps=3,
                optim="sgd",
                learning_rate=0.5,
                lr_scheduler_type="constant",
            ),
            train_dataset=class_signal_dataset("text", [30, 20, 14]),
            eval_dataset=class_signal_dataset("text", [3, 3, 3], seed=1),
        )
        assert trainer.model_accepts_loss_kwargs is False
        trainer.train()
        runs.append(trainer)
    for p, q in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_training_loss_is_ce_of_the_mixed_head_input_on_the_first_labels(tmp_path):
    trainer = mlp_run(tmp_path, "loss", max_steps=1)
    model = trainer.model.train()
    features = torch.randn(6, 8)
    labels = torch.tensor([0, 1, 2, 3, 2, 1])
    trainer._mix_generator.manual_seed(123)
    loss = trainer.compute_loss(model, {"features": features, "labels": labels})
    lam = 0.6 + 0.4 * torch.rand(3, generator=torch.Generator().manual_seed(123))
    hidden = model.body(features)
    mixed = lam[:, None] * hidden[:3] + (1 - lam[:, None]) * hidden[3:]
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(model.classifier(mixed), labels[:3]))


def test_one_prior_for_confusion_and_gains(tmp_path):
    from selmix_hf import get_objective

    prior = [0.4, 0.3, 0.2, 0.1]
    objective = get_objective("min_recall", K, class_prior=prior)
    trainer = SelMixTrainer(
        model=TinyMLPForClassification(TinyMLPConfig(num_labels=K)),
        objective=objective,
        args=config(tmp_path, max_steps=1),
        train_dataset=gaussian_problem([10, 8, 6, 4], seed=1),
        eval_dataset=gaussian_problem([3] * K, seed=2),
    )
    torch.testing.assert_close(trainer.class_prior, torch.tensor(prior, dtype=torch.float64))
    with pytest.raises(ValueError, match="differ"):
        SelMixTrainer(
            model=TinyMLPForClassification(TinyMLPConfig(num_labels=K)),
            objective=objective,
            args=config(tmp_path, class_prior=[0.25] * 4),
            train_dataset=gaussian_problem([10, 8, 6, 4], seed=1),
            eval_dataset=gaussian_problem([3] * K, seed=2),
        )


def test_validation_pass_keeps_every_sample_whatever_the_eval_loader_settings(tmp_path):
    trainer = mlp_run(tmp_path, "drop", max_steps=2, dataloader_drop_last=True, per_device_eval_batch_size=4)
    trainer.eval_dataset = gaussian_problem([3, 3, 3, 2], seed=2)  # 11 samples: a short last batch
    trainer.validation_dataset = trainer.eval_dataset
    trainer.train()
    assert int(trainer.last_confusion_counts.sum()) == 11


def test_sampler_epochs_are_whole_optimiser_steps(tmp_path):
    trainer = mlp_run(tmp_path, "epochs", per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=1)
    assert len(trainer.get_train_dataloader()) % 4 == 0


def test_sharded_parameters_are_accepted_now_that_the_head_is_read_through_the_engine(tmp_path, monkeypatch):
    """Under FSDP or ZeRO-3 SelMix reads the head through selmix_hf.sharding (tests/test_sharding.py): no refusal."""
    pretend_fsdp(monkeypatch)
    trainer = mlp_run(tmp_path, "fsdp", max_steps=1)
    assert trainer.is_fsdp_enabled


def test_resume_is_exact_when_dataloader_workers_draw_pairs_ahead(tmp_path):
    """Workers draw pair batches ahead of training; the checkpoint holds the position of the batches trained on."""

    def run(folder, **kw):
        trainer = mlp_run(
            tmp_path,
            folder,
            max_steps=9,
            save_strategy="steps",
            save_steps=4,
            dataloader_num_workers=2,
            gradient_accumulation_steps=2,
            **kw,
        )
        return trainer

    straight = run("straight")
    straight.train()
    resumed = run("resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "out" / "checkpoint-4"))
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    assert straight.method_state()["sampler"]["batches_drawn"] == resumed.method_state()["sampler"]["batches_drawn"]


def test_a_nan_names_the_dataset_index_of_the_micro_batch_it_came_from(tmp_path):
    from selmix_hf import NonFiniteError

    trainer = mlp_run(tmp_path, "nan", max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=4)
    examples = trainer.train_dataset.examples
    poisoned = [i for i, e in enumerate(examples) if e["labels"] == 3]  # the rarest class: indices 90-99
    for i in poisoned:
        examples[i] = {**examples[i], "features": torch.full_like(examples[i]["features"], float("nan"))}
    with pytest.raises(NonFiniteError) as error:
        trainer.train()
    named = [int(i) for i in re.search(r"dataset index \[([\d, ]+)\]", str(error.value)).group(1).split(",")]
    assert named and set(named) <= set(poisoned)  # the rows of the micro-batch that failed, not of another one


def test_objective_options_may_give_the_head_tail_split_themselves(tmp_path):
    args = config(tmp_path, objective="min_head_tail_recall", objective_options={"class_counts": [40, 30, 20, 10]})
    assert args.objective_options == {"class_counts": [40, 30, 20, 10]}


def test_a_thousand_classes_refresh_train_and_get_a_readable_card_in_seconds(tmp_path):
    """K = 1,000 (ImageNet's): the K x K gains and pair distribution, the pair sampler and the summarised card."""
    classes = 1000
    counts = [int(max(1, 120 * 0.995**k)) for k in range(classes)]  # 120 ... 1: many, medium and few-shot classes
    names = [f"class_{k}" for k in range(classes)]
    torch.manual_seed(0)
    trainer = SelMixTrainer(
        model=TinyMLPForClassification(
            TinyMLPConfig(num_labels=classes, hidden_dim=16, id2label=dict(enumerate(names)))
        ),
        args=config(
            tmp_path, max_steps=3, gain_refresh_steps=2, per_device_train_batch_size=16, per_device_eval_batch_size=500
        ),
        train_dataset=gaussian_problem(counts, seed=1),
        eval_dataset=gaussian_problem([1] * classes, seed=2),
        compute_metrics=make_compute_metrics(classes, class_counts=counts, class_names=names, per_class=True),
    )
    trainer.train()
    assert trainer.gains.shape == trainer.distribution.shape == (classes, classes)
    assert torch.isfinite(trainer.gains).all() and float(trainer.distribution.sum()) == pytest.approx(1.0)
    assert int(trainer.last_confusion_counts.sum()) == classes  # each validation sample once
    report = trainer.evaluate()
    results = {k[len("eval_") :]: v for k, v in report.items()}
    card = trainer.create_model_card(results=results).text
    table_rows = [line for line in card.splitlines() if line.startswith("| class_")]
    assert len(table_rows) == 25  # the worst classes, not a thousand rows
    assert "1000 classes: recall quartiles" in card and "| few-shot |" in card


def test_a_refresh_on_a_validation_sample_reads_n_per_class_redrawn_at_each_refresh(tmp_path):
    """validation_refresh_per_class: each refresh's confusion counts the model's predictions on a fresh stratified
    sample (min(n, count) per class), not on the whole validation set."""
    validation = gaussian_problem([6, 5, 3, 5], seed=2)
    torch.manual_seed(0)
    trainer = SelMixTrainer(
        model=TinyMLPForClassification(TinyMLPConfig(num_labels=4)),
        args=config(tmp_path, max_steps=4, gain_refresh_steps=2, validation_refresh_per_class=4),
        train_dataset=gaussian_problem([40, 30, 20, 10], seed=1),
        eval_dataset=validation,
    )
    trainer.train()
    drawn = {}
    for step in (0, 2, 4):
        trainer.state.global_step = step
        trainer.refresh()
        chosen = trainer._validation_sample.indices.tolist()
        drawn[step] = chosen
        with torch.no_grad():
            x = torch.stack([validation[i]["features"] for i in chosen])
            predicted = trainer.model(features=x).logits.argmax(1)
        labels = torch.tensor([validation[i]["labels"] for i in chosen])
        expected = torch.zeros(4, 4, dtype=trainer.last_confusion_counts.dtype)
        expected.index_put_((labels, predicted), torch.ones(len(chosen), dtype=expected.dtype), accumulate=True)
        assert torch.equal(trainer.last_confusion_counts, expected)
        assert expected.sum(1).tolist() == [4, 4, 3, 4]
    assert len({tuple(d) for d in drawn.values()}) == 3
