"""AutoBalance: the IFT/Neumann hypergradient against finite differences, learning, resume, export."""

import json

import pytest
import torch
from tiny import TinyMLPConfig, TinyMLPForClassification, gaussian_problem, per_class_recall

from selmix_hf.autobalance import (
    AutoBalanceConfig,
    AutoBalanceTrainer,
    hypergradient,
    load_parametric_loss,
    save_parametric_loss,
)
from selmix_hf.checkpoint_state import load_state
from selmix_hf.longtail_trainer import LongTailConfig, LongTailTrainer
from selmix_hf.losses import ParametricCrossEntropy

F64 = torch.float64
RIDGE = 0.5


def logistic_problem():
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(3, 3, generator=gen, dtype=F64)
    y_train = torch.tensor([0] * 30 + [1] * 12 + [2] * 5)
    y_val = torch.tensor([0, 1, 2] * 6)
    x_train = means[y_train] + torch.randn(len(y_train), 3, generator=gen, dtype=F64)
    x_val = means[y_val] + torch.randn(len(y_val), 3, generator=gen, dtype=F64)
    loss = ParametricCrossEntropy([30, 12, 5], init="la").double()
    with torch.no_grad():
        loss.raw_delta.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return x_train, y_train, x_val, y_val, loss


def train_objective(loss, x, y, weight, bias):
    return loss(x @ weight.T + bias, y) + RIDGE / 2 * (weight.pow(2).sum() + bias.pow(2).sum())


def solve(loss, x, y):
    """The ridge-regularised lower problem, solved to convergence (strongly convex)."""
    weight = torch.zeros(3, 3, dtype=F64, requires_grad=True)
    bias = torch.zeros(3, dtype=F64, requires_grad=True)
    optimiser = torch.optim.LBFGS(
        [weight, bias], lr=1, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe"
    )

    def closure():
        optimiser.zero_grad()
        value = train_objective(loss, x, y, weight, bias)
        value.backward()
        return value

    optimiser.step(closure)
    return weight, bias


def validation_loss(x, y, weight, bias):
    return torch.nn.functional.cross_entropy(x @ weight.T + bias, y)


def test_neumann_hypergradient_matches_finite_differences():
    x_train, y_train, x_val, y_val, loss = logistic_problem()
    weight, bias = solve(loss, x_train, y_train)
    flat = torch.cat([weight.detach().flatten(), bias.detach()]).requires_grad_(True)
    hessian = torch.autograd.functional.hessian(
        lambda w: train_objective(loss, x_train, y_train, w[:9].reshape(3, 3), w[9:]), flat
    )
    step = 1.0 / float(torch.linalg.eigvalsh(hessian).max())
    hyper = [loss.raw_delta, loss.offset]
    predicted = hypergradient(
        [weight, bias],
        hyper,
        lambda: train_objective(loss, x_train, y_train, weight, bias),
        lambda: validation_loss(x_val, y_val, weight, bias),
        method="neumann",
        neumann_steps=3000,
        neumann_lr=step,
    )
    predicted = torch.cat([g.flatten() for g in predicted])
    eps, measured = 1e-5, []
    for param in hyper:
        for i in range(param.numel()):
            values = []
            for sign in (1, -1):
                with torch.no_grad():
                    param.view(-1)[i] += sign * eps
                values.append(validation_loss(x_val, y_val, *solve(loss, x_train, y_train)).item())
                with torch.no_grad():
                    param.view(-1)[i] -= sign * eps
            measured.append((values[0] - values[1]) / (2 * eps))
    measured = torch.tensor(measured, dtype=F64)
    assert measured.abs().max() > 1e-3
    torch.testing.assert_close(predicted, measured, rtol=1e-3, atol=1e-3 * float(measured.abs().max()))


def test_unrolled_hypergradient_is_one_sgd_step():
    x_train, y_train, x_val, y_val, loss = logistic_problem()
    weight, bias = solve(loss, x_train, y_train)
    lr = 0.3
    predicted = hypergradient(
        [weight, bias],
        [loss.offset],
        lambda: train_objective(loss, x_train, y_train, weight, bias),
        lambda: validation_loss(x_val, y_val, weight, bias),
        method="unrolled",
        unroll_lr=lr,
    )[0]

    def after_one_step():
        w, b = weight.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
        gw, gb = torch.autograd.grad(train_objective(loss, x_train, y_train, w, b), [w, b])
        return validation_loss(x_val, y_val, w - lr * gw, b - lr * gb).item()

    eps, measured = 1e-5, []
    for i in range(3):
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                loss.offset[i] += sign * eps
            values.append(after_one_step())
            with torch.no_grad():
                loss.offset[i] -= sign * eps
        measured.append((values[0] - values[1]) / (2 * eps))
    measured = torch.tensor(measured, dtype=F64)
    # the unrolled estimate ignores how the step changes grad L_val (second order in lr): close, not exact
    torch.testing.assert_close(predicted, measured, rtol=0.02, atol=0.02 * float(measured.abs().max()))


# -- the trainer ----------------------------------------------------------------------------------

K = 4
COUNTS = [300, 100, 30, 10]


def common(tmp_path, seed, **overrides):
    return {
        **dict(
            output_dir=str(tmp_path / "out"),
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
            logging_strategy="no",
            per_device_train_batch_size=32,
            max_steps=400,
            optim="sgd",
            learning_rate=0.1,
            lr_scheduler_type="constant",
            seed=seed,
        ),
        **overrides,
    }


def autobalance(tmp_path, seed=0, **overrides):
    torch.manual_seed(seed)
    args = AutoBalanceConfig(
        **common(
            tmp_path,
            seed,
            **{
                "hyper_learning_rate": 0.1,
                "hyper_update_steps": 10,
                "hyper_batches": 4,
                "neumann_lr": 0.1,
                **overrides,
            },
        )
    )
    return AutoBalanceTrainer(
        model=TinyMLPForClassification(TinyMLPConfig(num_labels=K)),
        args=args,
        train_dataset=gaussian_problem(COUNTS, seed=seed + 1, spread=0.8),
        eval_dataset=gaussian_problem([30] * K, seed=seed + 2, spread=0.8),
    )


@pytest.mark.slow
def test_autobalance_beats_ce_on_balanced_validation_accuracy(tmp_path):
    for seed in range(2):
        torch.manual_seed(seed)
        ce = LongTailTrainer(
            model=TinyMLPForClassification(TinyMLPConfig(num_labels=K)),
            args=LongTailConfig(loss_type="ce", **common(tmp_path / f"ce{seed}", seed)),
            train_dataset=gaussian_problem(COUNTS, seed=seed + 1, spread=0.8),
        )
        ce.train()
        searched = autobalance(tmp_path / f"ab{seed}", seed)
        searched.train()
        validation = searched.validation_dataset
        balanced = [per_class_recall(t.model, validation, K).mean() for t in (ce, searched)]
        assert balanced[1] > balanced[0] + 0.05, balanced
        offsets = searched.loss_fn.class_offset().detach()
        assert offsets[3] < offsets[0] - 1.0  # the rare class's additive term goes the way of log pi (logit adjustment)


def test_learned_parameters_are_logged_frozen_after_search_and_exported(tmp_path):
    trainer = autobalance(tmp_path, max_steps=40, search_steps=20, logging_strategy="steps", logging_steps=10)
    trainer.train()
    updates = [log for log in trainer.state.log_history if "autobalance/offset_0" in log]
    assert [log["step"] for log in updates] == [0, 10, 20]
    exported = json.loads((tmp_path / "out" / "autobalance_loss.json").read_text())
    torch.testing.assert_close(torch.tensor(exported["offset"]), trainer.loss_fn.class_offset().detach())
    assert exported["offset"][0] == pytest.approx(updates[-1]["autobalance/offset_0"], rel=1e-5)
    frozen = load_parametric_loss(str(tmp_path / "out" / "autobalance_loss.json"))
    logits, labels = torch.randn(8, K), torch.randint(0, K, (8,))
    torch.testing.assert_close(frozen(logits, labels), trainer.loss_fn(logits, labels))
    fresh = LongTailTrainer(
        model=TinyMLPForClassification(TinyMLPConfig(num_labels=K)),
        loss=frozen,
        args=LongTailConfig(**common(tmp_path / "fresh", 0, max_steps=5)),
        train_dataset=gaussian_problem(COUNTS, seed=1),
    )
    fresh.train()
    torch.testing.assert_close(frozen.class_offset(), torch.tensor(exported["offset"]))


def test_resume_restores_loss_parameters_and_hyper_optimiser(tmp_path):
    def run(folder, resume=None):
        trainer = autobalance(tmp_path / folder, max_steps=8, save_strategy="steps", save_steps=4, hyper_update_steps=3)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run("straight")
    resumed = run("resumed", str(tmp_path / "straight" / "out" / "checkpoint-4"))
    for p, q in zip(straight.hyperparameters, resumed.hyperparameters):
        torch.testing.assert_close(p, q)
    a, b = straight.hyper_optimizer.state_dict()["state"], resumed.hyper_optimizer.state_dict()["state"]
    for key in a:
        torch.testing.assert_close(a[key]["exp_avg"], b[key]["exp_avg"])
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q)


def test_upper_objective_from_the_engine(tmp_path):
    trainer = autobalance(tmp_path, max_steps=20, upper_objective="min_recall", num_groups=2)
    before = trainer.loss_fn.offset.detach().clone()
    trainer.train()
    assert trainer.loss_fn.offset.numel() == 2 and not torch.equal(trainer.loss_fn.offset.detach(), before)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hypergradient": "exact"}, "neumann, unrolled"),
        ({"upper_objective": "accuracy_at_k"}, "balanced_ce"),
        ({"loss_type": "ce"}, "must be 'parametric'"),
        ({"init": "zeros"}, "ones, la, cdt"),
    ],
)
def test_bad_config_is_a_clear_error(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        autobalance(tmp_path, **overrides)


def test_the_balanced_upper_loss_weighs_the_classes_of_the_refresh_sample(tmp_path):
    """With validation_refresh_per_class the head-only pass reads n per class: its class-balanced weights are those
    of that sample (uniform here), not of the whole validation set (12 / 4 / 4 / 4)."""
    weights = {}
    for per_class in (None, 4):
        args = AutoBalanceConfig(
            **common(tmp_path, 0, max_steps=1, hyper_batches=2, neumann_lr=0.1, validation_refresh_per_class=per_class)
        )
        trainer = AutoBalanceTrainer(
            model=TinyMLPForClassification(TinyMLPConfig(num_labels=K)),
            args=args,
            train_dataset=gaussian_problem(COUNTS, seed=1, spread=0.8),
            eval_dataset=gaussian_problem([12, 4, 4, 4], seed=2, spread=0.8),
        )
        trainer.train()
        weights[per_class] = trainer.upper_weights
    assert weights[None][0] < weights[None][1] and torch.allclose(weights[4], torch.ones(K))


def test_class_without_training_samples_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"classes \[3\] have zero training samples"):
        AutoBalanceTrainer(
            model=TinyMLPForClassification(TinyMLPConfig(num_labels=K)),
            args=AutoBalanceConfig(**common(tmp_path, 0)),
            train_dataset=gaussian_problem([30, 10, 5, 0], seed=1),
            eval_dataset=gaussian_problem([3] * K, seed=2),
        )


def test_whole_model_hypergradient_through_fused_attention_names_the_fix(tmp_path):
    from tiny import ARCHITECTURES, class_signal_dataset

    vit = next(a for a in ARCHITECTURES if a.name == "vit")
    args = AutoBalanceConfig(
        **common(tmp_path, 0, max_steps=2, hyper_batches=1, per_device_train_batch_size=4, hypergradient_params="all")
    )
    trainer = AutoBalanceTrainer(
        model=vit.build(),
        args=args,
        train_dataset=class_signal_dataset("image", [8, 6, 4]),
        eval_dataset=class_signal_dataset("image", [2, 2, 2], seed=1),
    )
    with pytest.raises(RuntimeError, match="attn_implementation='eager'"):
        trainer.train()
    head_only = AutoBalanceTrainer(
        model=vit.build(),
        args=AutoBalanceConfig(**{**args.to_dict(), "hypergradient_params": "head"}),
        train_dataset=class_signal_dataset("image", [8, 6, 4]),
        eval_dataset=class_signal_dataset("image", [2, 2, 2], seed=1),
    )
    head_only.train()


def test_a_whole_model_hypergradient_under_sharding_is_refused_with_the_alternative(tmp_path, monkeypatch):
    from tiny import pretend_fsdp

    pretend_fsdp(monkeypatch)
    with pytest.raises(ValueError, match=r"hypergradient_params='all' differentiates .*FSDP.*'head' \(the default\)"):
        autobalance(tmp_path, hypergradient_params="all")
    assert autobalance(tmp_path).is_fsdp_enabled  # the head-only hypergradient reads the head through the engine


def test_engine_upper_objective_multipliers_follow_validation(tmp_path):
    trainer = autobalance(tmp_path, max_steps=10, upper_objective="min_recall", save_strategy="steps", save_steps=10)
    trainer.train()
    lam = trainer.upper_objective.lam
    assert not torch.allclose(lam, torch.full((K,), 0.25, dtype=torch.float64))
    state = load_state(str(tmp_path / "out" / "checkpoint-10"), "autobalance_state_rank0")
    torch.testing.assert_close(state["method"]["upper_objective"]["multipliers"]["lam"], lam)


def test_hyper_step_leaves_batchnorm_statistics_alone(tmp_path):
    from tiny import ARCHITECTURES, class_signal_dataset

    resnet = next(a for a in ARCHITECTURES if a.name == "timm-resnet").build()
    stats = {n: b.clone() for n, b in resnet.named_buffers() if "running_mean" in n}
    args = AutoBalanceConfig(
        **common(tmp_path, 0, max_steps=1, hyper_batches=2, per_device_train_batch_size=4, learning_rate=0.0)
    )
    trainer = AutoBalanceTrainer(
        model=resnet,
        args=args,
        train_dataset=class_signal_dataset("image", [8, 6, 4]),
        eval_dataset=class_signal_dataset("image", [2, 2, 2], seed=1),
    )
    trainer.refresh()
    for name, buffer in resnet.named_buffers():
        if name in stats:
            torch.testing.assert_close(buffer, stats[name])


def test_a_loss_file_with_non_finite_values_is_refused(tmp_path):
    from selmix_hf.nonfinite import NonFiniteError

    path = tmp_path / "loss.json"
    path.write_text(json.dumps({"delta": [1.0, float("nan")], "offset": [0.0, 0.0], "weight": [1.0, 1.0]}))
    with pytest.raises(NonFiniteError, match="delta holds NaN or inf"):
        load_parametric_loss(str(path))
    loss = ParametricCrossEntropy.from_values(torch.tensor([1.0, 1.0]), torch.tensor([0.0, float("inf")]))
    with pytest.raises(NonFiniteError, match="offset holds NaN or inf"):
        save_parametric_loss(loss, str(tmp_path / "out.json"))
    assert not (tmp_path / "out.json").exists()
