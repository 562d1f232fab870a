"""Groups: the (class, group) cells, group metrics by hand, group objectives and their gains over cells."""

import copy
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny import ListDataset, TinyMLPConfig, TinyMLPForClassification, grouped_gaussian_problem  # noqa: E402

from selmix_hf import (  # noqa: E402
    AutoBalanceConfig,
    AutoBalanceTrainer,
    LongTailConfig,
    LongTailTrainer,
    SelMixConfig,
    SelMixTrainer,
    make_compute_metrics,
    metrics,
)
from selmix_hf.autobalance import load_parametric_loss, save_parametric_loss  # noqa: E402
from selmix_hf.gains import exact_gain_matrix, gain_matrix_reference, logit_gradient, selmix_gain_matrix
from selmix_hf.groups import (
    CellLayout,
    aggregate_cells,
    cell_confusion_counts,
    group_report,
    normalized_cell_confusion,
)
from selmix_hf.losses import ParametricCrossEntropy, build_loss
from selmix_hf.objectives import OBJECTIVES, get_objective

F64 = torch.float64


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """The trainers here write their output_dir ("unused") relative to the working directory: keep it in tmp_path."""
    monkeypatch.chdir(tmp_path)


# the settings of every trainer run here: in the working folder (chdir fixture), nothing saved, logged or shown
QUIET = dict(
    output_dir="unused", report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, logging_strategy="no"
)
GROUP_OBJECTIVES = sorted(name for name, cls in OBJECTIVES.items() if cls.needs_groups)
# each group objective with one group, and the class objective it must then equal
ONE_GROUP_EQUALS = {
    "worst_group_accuracy": "min_recall",
    "group_balanced_accuracy": "mean_recall",
    "mean_recall_equal_opportunity": "mean_recall",
    "accuracy_equal_opportunity": "accuracy",
}

# Hand case: 2 classes, 2 groups. Cells (0,0): 2 samples, both right; (0,1): 2, one right; (1,0): 1, right;
# (1,1): 3, two right.
LABELS = [0, 0, 0, 0, 1, 1, 1, 1]
GROUPS = [0, 0, 1, 1, 0, 1, 1, 1]
PREDS = [0, 0, 0, 1, 1, 0, 1, 1]


def test_group_metrics_by_hand():
    report = group_report(LABELS, PREDS, GROUPS, 2)
    assert report["worst_group_accuracy"] == pytest.approx(0.5)
    assert report["group_balanced_accuracy"] == pytest.approx((1 + 0.5 + 1 + 2 / 3) / 4)
    assert report["equal_opportunity_gap"] == pytest.approx(0.5)  # class 0: 1 - 0.5; class 1: 1 - 2/3
    assert report["group_0_accuracy"] == pytest.approx(1.0)  # samples 0, 1, 4
    assert report["group_1_accuracy"] == pytest.approx(3 / 5)  # samples 2, 3, 5, 6, 7
    positive = group_report(LABELS, PREDS, GROUPS, 2, positive_class=1)
    assert positive["equal_opportunity_gap"] == pytest.approx(1 / 3)


def test_cells_sum_to_the_class_confusion_matrix():
    layout = CellLayout.from_labels(LABELS, GROUPS, 2)
    assert layout.classes == (0, 0, 1, 1) and layout.groups == (0, 1, 0, 1) and layout.counts == (2, 2, 1, 3)
    prior = torch.tensor([0.3, 0.7], dtype=F64)
    cells = normalized_cell_confusion(cell_confusion_counts(LABELS, PREDS, GROUPS, layout), layout, prior)
    torch.testing.assert_close(layout.prior(prior), torch.tensor([0.15, 0.15, 0.7 / 4, 0.7 * 3 / 4], dtype=F64))
    classes = metrics.normalized_confusion(metrics.confusion_counts(LABELS, PREDS, 2), prior)
    torch.testing.assert_close(aggregate_cells(cells, layout.cell_classes(), 2), classes, rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "groups, num_groups, message",
    [
        ([0, 0, 1, 1, 0, 1, 2, 1], 2, r"outside \[0, 2\): \[2\]"),
        ([0, 0, 1, 1, 0, -1, 1, 1], None, r"outside \[0, 2\): \[-1\]"),
        ([0.0, 0, 1, 1, 0, 1, 1, 1], None, "integers"),
    ],
)
def test_bad_group_ids_are_named(groups, num_groups, message):
    with pytest.raises(ValueError, match=message):
        group_report(LABELS, PREDS, torch.tensor(groups), 2, num_groups=num_groups)


def test_a_sample_outside_the_layout_is_an_error():
    layout = CellLayout.from_labels(LABELS[:4], GROUPS[:4], 2, 2)
    with pytest.raises(ValueError, match="cells the layout lacks"):
        cell_confusion_counts(LABELS, PREDS, GROUPS, layout)


def random_cells(seed: int, num_classes: int = 3, num_groups: int = 2):
    """A cell layout with every (class, group) cell, uneven counts, and a cell confusion matrix with weak cells."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(2, 9, (num_classes * num_groups,), generator=gen).tolist()
    classes = [k for k in range(num_classes) for _ in range(num_groups)]
    layout = CellLayout(num_classes, num_groups, tuple(classes), tuple(range(num_groups)) * num_classes, tuple(counts))
    logits = torch.randn(len(classes), num_classes, generator=gen, dtype=F64)
    logits[range(len(classes)), classes] += 1.5
    confusion = torch.softmax(logits, 1) * layout.prior().unsqueeze(1)
    return layout, confusion


def group_objective(name: str, layout: CellLayout, **options):
    return get_objective(name, layout.num_classes, cell_classes=layout.classes, cell_prior=layout.prior(), **options)


@pytest.mark.parametrize("name", GROUP_OBJECTIVES)
def test_one_group_equals_the_class_objective_exactly(name):
    k = 4
    gen = torch.Generator().manual_seed(3)
    confusion = torch.softmax(torch.randn(k, k, generator=gen, dtype=F64) + 2 * torch.eye(k), 1) / k
    confusion[1] *= torch.tensor([0.3, 1.0, 2.0, 1.0], dtype=F64)  # class 1 weak, and some coverage off
    confusion[1] *= 0.25 / confusion[1].sum()
    grouped = get_objective(name, k, cell_classes=list(range(k)))
    plain = get_objective(ONE_GROUP_EQUALS[name], k)
    for obj in (grouped, plain):
        obj.update(confusion)
    assert grouped.value(confusion) == plain.value(confusion)
    assert torch.equal(grouped.gradient(confusion), plain.gradient(confusion))
    gen = torch.Generator().manual_seed(4)
    protos, weight = torch.randn(k, 3, generator=gen, dtype=F64), torch.randn(k, 3, generator=gen, dtype=F64)
    features, labels = torch.randn(20, 3, generator=gen, dtype=F64), torch.arange(k).repeat(5)
    assert torch.equal(
        selmix_gain_matrix(grouped, confusion, protos, weight, None),
        selmix_gain_matrix(plain, confusion, protos, weight, None),
    )
    assert torch.equal(
        exact_gain_matrix(grouped, protos, weight, None, features, labels),
        exact_gain_matrix(plain, protos, weight, None, features, labels),
    )


def test_worst_group_multipliers_move_toward_the_worst_cell():
    layout, confusion = random_cells(0)
    obj = group_objective("worst_group_accuracy", layout)
    recalls = confusion[range(6), list(layout.classes)] / confusion.sum(1)
    obj.update(confusion)
    expected = torch.softmax(-50 * recalls, 0)
    torch.testing.assert_close(obj.lam, expected)
    assert int(obj.lam.argmax()) == int(recalls.argmin())
    assert obj.value(confusion) == pytest.approx(float(recalls.min()))
    # the gradient is lam_c / pi_c at (cell c, its class), zero elsewhere
    expected_grad = torch.zeros(6, 3, dtype=F64)
    expected_grad[range(6), list(layout.classes)] = obj.lam / layout.prior()
    torch.testing.assert_close(obj.gradient(confusion), expected_grad)


def test_equal_opportunity_multipliers_by_hand():
    layout = CellLayout(2, 2, (0, 0, 1, 1), (0, 1, 0, 1), (1, 1, 1, 1))  # prior 1/4 per cell
    recall = torch.tensor([0.9, 0.7, 0.8, 0.78], dtype=F64)  # class 0 recall 0.8, class 1 0.79
    confusion = torch.stack([recall, 1 - recall], 1) / 4
    confusion[2:] = confusion[2:].flip(1)  # class 1's cells: column 1 is right
    obj = group_objective("mean_recall_equal_opportunity", layout, max_gap=0.05)
    obj.update(confusion)
    # only cell (0, 1) is more than 0.05 below its class: 0.7 - 0.8 = -0.1
    expected = 100 * (1 - math.exp((-0.1 + 0.05) / 0.01))
    torch.testing.assert_close(obj.mu, torch.tensor([0.0, expected, 0.0, 0.0], dtype=F64))
    assert obj.constraint_violation(confusion) == pytest.approx(0.05)
    assert obj.report(confusion) == pytest.approx(
        {"mean_recall_equal_opportunity": 0.795, "equal_opportunity_gap": 0.2}
    )
    only_class_1 = group_objective("mean_recall_equal_opportunity", layout, max_gap=0.05, positive_class=1)
    only_class_1.update(confusion)
    assert torch.count_nonzero(only_class_1.mu) == 0 and only_class_1.constraint_violation(confusion) == 0
    assert only_class_1.report(confusion)["equal_opportunity_gap"] == pytest.approx(0.02)


@pytest.mark.parametrize("name", GROUP_OBJECTIVES)
@pytest.mark.parametrize("seed", [0, 1])
def test_cell_gains_factorised_equal_the_literal_formula(name, seed):
    layout, confusion = random_cells(seed)
    obj = group_objective(name, layout)
    obj.update(confusion)
    gen = torch.Generator().manual_seed(10 + seed)
    protos = torch.randn(layout.num_cells, 4, generator=gen, dtype=F64)
    weight, bias = torch.randn(3, 4, generator=gen, dtype=F64), 0.3 * torch.randn(3, generator=gen, dtype=F64)
    fast = selmix_gain_matrix(obj, confusion, protos, weight, bias)
    slow = gain_matrix_reference(obj, confusion, protos, weight, bias)
    assert fast.shape == (6, 6)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    assert slow.abs().max() > 1e-3


@pytest.mark.parametrize("name", GROUP_OBJECTIVES)
def test_cell_logit_gradient_is_the_jacobian_through_the_prototype_softmax(name):
    layout, confusion = random_cells(2)
    obj = group_objective(name, layout)
    obj.update(confusion)
    prior = layout.prior()
    logits = torch.log(confusion / prior.unsqueeze(1)).requires_grad_(True)
    (expected,) = torch.autograd.grad(obj.surrogate(prior.unsqueeze(1) * torch.softmax(logits, 1)), logits)
    torch.testing.assert_close(logit_gradient(obj, confusion, prior), expected)


def soft_cell_surrogate(obj, features, cells, weight, bias, prior):
    """psi of the per-sample soft cell confusion C_cl = pi_c / N_c sum_{n in c} softmax(W z_n + b)_l."""
    probs = torch.softmax(features @ weight.T + bias, dim=1)
    num_cells = prior.numel()
    counts = torch.bincount(cells, minlength=num_cells).to(features.dtype)
    soft = torch.zeros(num_cells, weight.shape[0], dtype=features.dtype).index_add_(0, cells, probs)
    return obj.surrogate(soft * (prior / counts).unsqueeze(1))


@pytest.mark.parametrize("name", GROUP_OBJECTIVES)
def test_exact_cell_gains_predict_the_change_after_a_head_step(name):
    """G[a, b] is the first-order change of psi when the head takes a step on the mixup of cells a and b with a's
    class, measured by central differences."""
    layout, _ = random_cells(5)
    k, d, per_cell, lam_min = 3, 4, 6, 0.6
    gen = torch.Generator().manual_seed(12)
    cells = torch.arange(layout.num_cells).repeat_interleave(per_cell)
    features = (
        torch.randn(cells.numel(), d, generator=gen, dtype=F64)
        + 1.5 * torch.randn(layout.num_cells, d, generator=gen, dtype=F64)[cells]
    )
    weight = torch.randn(k, d, generator=gen, dtype=F64) * 0.5
    bias = torch.randn(k, generator=gen, dtype=F64) * 0.2
    equal = CellLayout(k, 2, layout.classes, layout.groups, (per_cell,) * layout.num_cells)
    obj = group_objective(name, equal)
    prior = equal.prior()
    with torch.no_grad():
        probs = torch.softmax(features @ weight.T + bias, 1)
    soft = torch.zeros(layout.num_cells, k, dtype=F64).index_add_(0, cells, probs) * (prior / per_cell).unsqueeze(1)
    obj.update(soft)  # multipliers from the model's own confusion
    protos = torch.zeros(layout.num_cells, d, dtype=F64).index_add_(0, cells, features) / per_cell
    predicted = exact_gain_matrix(obj, protos, weight, bias, features, cells, mix_lambda_min=lam_min)
    lam_bar, eps = (1 + lam_min) / 2, 1e-5
    measured = torch.zeros(layout.num_cells, layout.num_cells, dtype=F64)
    for a in range(layout.num_cells):
        kept = torch.nn.functional.one_hot(torch.tensor(layout.classes[a]), k)
        for b in range(layout.num_cells):
            mixed = lam_bar * protos[a] + (1 - lam_bar) * protos[b]
            residual = torch.softmax(weight @ mixed + bias, 0) - kept
            step_w, step_b = torch.outer(residual, mixed), residual  # gradient of CE(W z~ + b, class of a)
            up = soft_cell_surrogate(obj, features, cells, weight - eps * step_w, bias - eps * step_b, prior)
            down = soft_cell_surrogate(obj, features, cells, weight + eps * step_w, bias + eps * step_b, prior)
            measured[a, b] = (up - down) / (2 * eps)
    torch.testing.assert_close(predicted, measured, rtol=1e-3, atol=1e-3 * float(measured.abs().max()))
    assert measured.abs().max() > 1e-4


@pytest.mark.parametrize(
    "options, message",
    [
        ({"cell_classes": [0, 0, 1]}, r"classes \[2\] have no cell"),
        ({"cell_classes": [0, 1, 2, 3]}, r"cell_classes contain values outside \[0, 3\)"),
        ({"cell_classes": [0, 1, 2], "cell_prior": [0.5, 0.25, 0.25]}, "must sum to that class's prior"),
        ({"cell_prior": [0.5, 0.25, 0.25]}, "without cell_classes"),
    ],
)
def test_bad_cells_are_a_clear_error(options, message):
    with pytest.raises(ValueError, match=message):
        get_objective("worst_group_accuracy", 3, **options)


def test_cell_confusion_of_the_wrong_shape_names_cells():
    layout, confusion = random_cells(0)
    with pytest.raises(ValueError, match=r"expected \(6, 3\) \(cells x classes\)"):
        group_objective("worst_group_accuracy", layout).gradient(confusion[:3])


# -- group losses ---------------------------------------------------------------------------------------
CELL_COUNTS = [[6, 2], [1, 1]]  # training shares p = 0.6, 0.2, 0.1, 0.1


def test_group_reweighting_weighs_each_cell_by_its_inverse_frequency():
    loss = build_loss("group_weighted_ce", [8, 2], group_counts=CELL_COUNTS)
    torch.testing.assert_close(loss.cell_weight, 1 / (4 * torch.tensor([0.6, 0.2, 0.1, 0.1], dtype=F64)))
    # the weights average 1 over the training set, so the loss stays on the scale of cross-entropy
    assert float((loss.cell_weight * torch.tensor([6, 2, 1, 1])).sum() / 10) == pytest.approx(1.0)
    logits, labels, groups = torch.randn(4, 2), torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    per_sample = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(loss(logits, labels, groups), (per_sample * loss.cell_weight.float()).mean())


def test_group_dro_weights_move_toward_the_worst_cell():
    loss = build_loss("group_dro", [8, 2], group_counts=CELL_COUNTS, step_size=0.5)
    torch.testing.assert_close(loss.group_weight, torch.full((4,), 0.25, dtype=F64))
    labels, groups = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 0, 1, 1])
    logits = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [1.0, 0.0]])  # cell (1, 1) is worst
    per_sample = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    # with q uniform the loss is group re-weighting's: q_c / p_c = 1 / (4 p_c)
    weights = torch.tensor([0.25 / 0.6, 0.25 / 0.2, 0.25 / 0.1, 0.25 / 0.1, 0.25 / 0.1])
    torch.testing.assert_close(loss(logits, labels, groups), (weights * per_sample).mean())
    loss.end_step()
    cell_losses = torch.stack([per_sample[0], per_sample[1], per_sample[2], per_sample[3:].mean()]).double()
    expected = torch.exp(0.5 * cell_losses) / torch.exp(0.5 * cell_losses).sum()
    torch.testing.assert_close(loss.group_weight, expected)
    assert int(loss.group_weight.argmax()) == 3
    assert float(loss.loss_counts.sum()) == 0  # the next step starts afresh


def test_group_dro_step_is_the_same_split_over_micro_batches_or_summed_over_ranks():
    labels, groups = torch.tensor([0, 0, 1, 1, 0, 1]), torch.tensor([0, 1, 0, 1, 0, 1])
    logits = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    whole = build_loss("group_dro", [8, 2], group_counts=CELL_COUNTS)
    whole(logits, labels, groups)
    whole.end_step()
    split = build_loss("group_dro", [8, 2], group_counts=CELL_COUNTS)
    split(logits[:2], labels[:2], groups[:2])
    other_rank = build_loss("group_dro", [8, 2], group_counts=CELL_COUNTS)
    other_rank(logits[2:], labels[2:], groups[2:])
    others = [other_rank.loss_sums, other_rank.loss_counts]  # what the other rank adds, in the order end_step asks
    split.end_step(lambda t: t + others.pop(0))
    torch.testing.assert_close(split.group_weight, whole.group_weight)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: build_loss("group_dro", [8, 2]), "set group_column"),
        (lambda: build_loss("group_dro", [8, 2], group_counts=[[6, 2], [0, 0]]), r"classes \[1\] have no training"),
        (lambda: build_loss("group_dro", [8, 2], group_counts=CELL_COUNTS, step_size=0), "step_size"),
    ],
)
def test_bad_group_loss_settings_are_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_group_id_the_loss_never_saw_is_named():
    loss = build_loss("group_weighted_ce", [8, 2], group_counts=CELL_COUNTS)
    with pytest.raises(ValueError, match=r"group ids \[2\] fall outside \[0, 2\)"):
        loss(torch.zeros(1, 2), torch.tensor([0]), torch.tensor([2]))
    empty = build_loss("group_weighted_ce", [6, 2], group_counts=[[6, 0], [1, 1]])
    with pytest.raises(ValueError, match=r"cell \(class 0, group 1\)"):
        empty(torch.zeros(1, 2), torch.tensor([0]), torch.tensor([1]))


# -- trainers -------------------------------------------------------------------------------------------
def spurious_run(loss_type: str, seed: int, steps: int = 150) -> float:
    """Test worst-group accuracy after training on two classes whose group (a feature shift) agrees with the class
    for 95% of the training samples; the test set crosses them evenly."""
    torch.manual_seed(seed)
    train = grouped_gaussian_problem([[190, 10], [10, 190]], seed=seed + 1, shift=2.0)
    test = grouped_gaussian_problem([[50, 50], [50, 50]], seed=seed + 2, shift=2.0)
    args = LongTailConfig(
        **QUIET,
        per_device_train_batch_size=32,
        max_steps=steps,
        optim="sgd",
        learning_rate=0.1,
        lr_scheduler_type="constant",
        loss_type=loss_type,
        group_column="group",
        seed=seed,
        loss_options={"step_size": 0.1} if loss_type == "group_dro" else {},
    )
    model = TinyMLPForClassification(TinyMLPConfig(num_labels=2))
    trainer = LongTailTrainer(model=model, args=args, train_dataset=train)
    trainer.train()
    x = torch.stack([e["features"] for e in test.examples])
    with torch.no_grad():
        predictions = trainer.model(features=x).logits.argmax(1)
    labels, groups = [e["labels"] for e in test.examples], [e["group"] for e in test.examples]
    return group_report(labels, predictions, groups, 2)["worst_group_accuracy"]


@pytest.mark.parametrize("loss_type", ["group_weighted_ce", "group_dro"])
def test_group_losses_lift_worst_group_accuracy_over_ce_on_a_spurious_attribute(loss_type):
    for seed in range(2):
        assert spurious_run(loss_type, seed) > spurious_run("ce", seed) + 0.15


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"loss_type": "group_dro"}, "loss_type 'group_dro' ranges over .* set group_column="),
        (
            {"loss_type": "cost_sensitive", "loss_options": {"objective": "worst_group_accuracy"}},
            "objective 'worst_group_accuracy' ranges over",
        ),
        (
            {"loss_type": "ce", "posthoc": "offsets", "posthoc_objective": "worst_group_accuracy"},
            "fits a rule on the class confusion matrix",
        ),
    ],
)
def test_group_settings_without_what_they_need_fail_when_the_config_is_built(settings, message):
    with pytest.raises(ValueError, match=message):
        LongTailConfig(**QUIET, **settings)


def test_negative_group_ids_in_the_training_set_are_named():
    train = grouped_gaussian_problem([[5, 5], [5, 5]], seed=0)
    train.examples[3]["group"] = -1
    args = LongTailConfig(**QUIET, loss_type="ce", group_column="group")
    with pytest.raises(ValueError, match=r"group column 'group' of the training set holds negative ids \[-1\]"):
        LongTailTrainer(model=TinyMLPForClassification(TinyMLPConfig(num_labels=2)), args=args, train_dataset=train)


def spurious_splits(seed: int) -> tuple[ListDataset, ListDataset, ListDataset]:
    """Train (group agrees with class for 95%), validation and test (groups crossed evenly) of the spurious problem."""
    train = grouped_gaussian_problem([[190, 10], [10, 190]], seed=seed + 1, shift=2.0)
    validation = grouped_gaussian_problem([[25, 25], [25, 25]], seed=seed + 3, shift=2.0)
    test = grouped_gaussian_problem([[50, 50], [50, 50]], seed=seed + 2, shift=2.0)
    return train, validation, test


def worst_group(model: torch.nn.Module, data: ListDataset) -> float:
    x = torch.stack([e["features"] for e in data.examples])
    with torch.no_grad():
        predictions = model(features=x).logits.argmax(1)
    labels, groups = [e["labels"] for e in data.examples], [e["group"] for e in data.examples]
    return group_report(labels, predictions, groups, 2)["worst_group_accuracy"]


def test_selmix_over_cells_lifts_worst_group_accuracy_where_class_selmix_cannot():
    """From a CE model that follows the spurious group, SelMix for worst-group accuracy (pairs between cells) lifts
    the test worst-group accuracy; SelMix for mean recall (pairs between classes) sees no class to fix."""
    seed = 0
    train, validation, test = spurious_splits(seed)
    common = dict(
        **QUIET,
        optim="sgd",
        lr_scheduler_type="constant",
        group_column="group",
        seed=seed,
    )
    torch.manual_seed(seed)
    stage1 = LongTailTrainer(
        model=TinyMLPForClassification(TinyMLPConfig(num_labels=2)),
        args=LongTailConfig(**common, per_device_train_batch_size=32, max_steps=150, learning_rate=0.1, loss_type="ce"),
        train_dataset=train,
    )
    stage1.train()
    start = worst_group(stage1.model, test)
    after = {}
    for objective in ("worst_group_accuracy", "mean_recall"):
        args = SelMixConfig(
            **common,
            per_device_train_batch_size=16,
            max_steps=100,
            learning_rate=0.05,
            objective=objective,
            gain_refresh_steps=10,
        )
        trainer = SelMixTrainer(
            model=copy.deepcopy(stage1.model), args=args, train_dataset=train, eval_dataset=validation
        )
        trainer.train()
        after[objective] = worst_group(trainer.model, test)
        if objective == "worst_group_accuracy":
            assert trainer.gains.shape == (4, 4) and trainer.row_names() == [
                "LABEL_0/g0",
                "LABEL_0/g1",
                "LABEL_1/g0",
                "LABEL_1/g1",
            ]
    assert after["worst_group_accuracy"] > start + 0.25, (start, after)
    assert after["worst_group_accuracy"] > after["mean_recall"] + 0.25, (start, after)


def test_a_refresh_sample_with_a_group_column_keeps_n_per_cell_and_every_cell():
    train = grouped_gaussian_problem([[30, 10], [10, 30]], seed=1)
    validation = grouped_gaussian_problem([[4, 1], [3, 6]], seed=2)
    args = LongTailConfig(
        **QUIET,
        max_steps=1,
        group_column="group",
        loss_type="cost_sensitive",
        loss_options={"objective": "worst_group_accuracy"},
        validation_refresh_per_class=2,
    )
    trainer = LongTailTrainer(
        model=TinyMLPForClassification(TinyMLPConfig(num_labels=2)),
        args=args,
        train_dataset=train,
        eval_dataset=validation,
    )
    trainer.train()
    _, _, labels, groups = trainer.validation_pass(with_groups=True)
    assert torch.bincount(labels * 2 + groups, minlength=4).tolist() == [2, 1, 2, 2]  # min(2, each cell's count)


def test_cost_sensitive_loss_over_one_group_cells_is_the_class_loss():
    counts = [30, 20, 10]
    cells = CellLayout.one_group(3, [5, 5, 5])
    grouped = build_loss(  # min recall's default multiplier settings, which worst-group accuracy's differ from
        "cost_sensitive",
        counts,
        cells=cells,
        group_counts=[[c] for c in counts],
        objective="worst_group_accuracy",
        omega=0.1,
        beta=1.0,
    )
    plain = build_loss("cost_sensitive", counts, objective="min_recall")
    gen = torch.Generator().manual_seed(0)
    confusion = torch.softmax(torch.randn(3, 3, generator=gen, dtype=F64) + torch.eye(3), 1) / 3
    for loss in (grouped, plain):
        loss.update(confusion)
    logits, labels = torch.randn(6, 3, generator=gen), torch.tensor([0, 1, 2, 2, 1, 0])
    torch.testing.assert_close(grouped(logits, labels, torch.zeros(6, dtype=torch.long)), plain(logits, labels))


def test_cost_sensitive_cells_weigh_a_cell_against_its_class_average():
    """Worst-group gains are diagonal per cell (lam_c / pi_c at the cell's class): a sample weighs its own class by
    its cell's gain over the class's training-share-weighted gain, and the logits move by -log of the latter."""
    cells = CellLayout(2, 2, (0, 0, 1, 1), (0, 1, 0, 1), (5, 5, 5, 5))
    loss = build_loss(
        "cost_sensitive", [10, 10], cells=cells, group_counts=[[8, 2], [2, 8]], objective="worst_group_accuracy"
    )
    confusion = torch.tensor([[0.2, 0.05], [0.1, 0.15], [0.05, 0.2], [0.03, 0.22]], dtype=F64) / 2
    loss.update(confusion)
    gain = loss.objective.gradient(confusion)  # lam_c / pi_c at (c, class of c)
    own = gain[[0, 1, 2, 3], [0, 0, 1, 1]]
    d = torch.stack([0.8 * own[0] + 0.2 * own[1], 0.2 * own[2] + 0.8 * own[3]])
    torch.testing.assert_close(loss.log_diagonal, torch.log(d).float())
    logits, labels, groups = torch.randn(4, 2), torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    log_p = torch.log_softmax(logits + torch.log(torch.tensor([0.5, 0.5])) - torch.log(d).float(), 1)
    weights = (own / d[[0, 0, 1, 1]]).float()
    torch.testing.assert_close(loss(logits, labels, groups), -(weights * log_p[range(4), labels]).mean())


def test_cost_sensitive_worst_group_lifts_worst_group_accuracy_over_ce():
    train, validation, test = spurious_splits(0)
    runs = {}
    for loss_type, options in (("ce", {}), ("cost_sensitive", {"objective": "worst_group_accuracy"})):
        torch.manual_seed(0)
        args = LongTailConfig(
            **QUIET,
            per_device_train_batch_size=32,
            max_steps=150,
            optim="sgd",
            learning_rate=0.1,
            lr_scheduler_type="constant",
            loss_type=loss_type,
            loss_options=options,
            validation_refresh_steps=10,
            group_column="group",
            seed=0,
        )
        model = TinyMLPForClassification(TinyMLPConfig(num_labels=2))
        trainer = LongTailTrainer(model=model, args=args, train_dataset=train, eval_dataset=validation)
        trainer.train()
        runs[loss_type] = worst_group(trainer.model, test)
    assert runs["cost_sensitive"] > runs["ce"] + 0.15, runs


def test_group_sensitive_parametric_loss_scores_each_sample_with_its_group_row():
    delta = torch.tensor([[1.0, 2.0], [0.5, 1.0]])  # group x class
    offset = torch.tensor([[0.0, 0.3], [-0.2, 0.1]])
    weight = torch.tensor([[1.0, 2.0], [3.0, 0.5]])
    loss = ParametricCrossEntropy.from_values(delta, offset, weight)
    assert loss.needs_groups and loss.raw_delta.shape == (2, 2)
    logits, labels, groups = torch.randn(4, 2), torch.tensor([0, 1, 1, 0]), torch.tensor([0, 0, 1, 1])
    expected = torch.stack(
        [
            weight[g, y] * torch.nn.functional.cross_entropy(delta[g] * x + offset[g], y)
            for x, y, g in zip(logits, labels, groups)
        ]
    ).mean()
    torch.testing.assert_close(loss(logits, labels, groups), expected)
    with pytest.raises(ValueError, match="call it with the group ids"):
        loss(logits, labels)


def test_group_sensitive_la_and_cdt_inits_start_from_the_class_counts_within_each_group():
    """Row g of l starts at log p(y | g) and of Delta at (n_gy / max_y n_gy)^0.2; an empty cell counts as one."""
    counts = [[9, 1], [0, 6]]  # classes x groups
    la = ParametricCrossEntropy([10, 6], init="la", sample_groups=2, group_counts=counts)
    expected = torch.tensor([[math.log(9 / 10), math.log(1 / 10)], [math.log(1 / 7), math.log(6 / 7)]])
    torch.testing.assert_close(la.offset.data, expected)
    cdt = ParametricCrossEntropy([10, 6], init="cdt", sample_groups=2, group_counts=counts)
    torch.testing.assert_close(cdt.class_delta().data, torch.tensor([[1.0, (1 / 9) ** 0.2], [(1 / 6) ** 0.2, 1.0]]))
    tied = ParametricCrossEntropy(  # classes tied by frequency, {0, 1} and {2, 3}: a tie shares its mean count
        [10, 6, 3, 1], init="la", num_groups=2, sample_groups=2, group_counts=[[9, 1], [0, 6], [3, 0], [1, 0]]
    )
    row0 = torch.tensor([(9 + 1) / 2, (3 + 1) / 2]) / 14
    row1 = torch.tensor([(1 + 6) / 2, (1 + 1) / 2]) / 9
    torch.testing.assert_close(tied.offset.data, torch.log(torch.stack([row0, row1])))
    with pytest.raises(ValueError, match="classes x groups = 2 x 3"):
        ParametricCrossEntropy([10, 6], init="la", sample_groups=3, group_counts=counts)


def test_autobalance_la_init_reads_the_training_cells_of_the_group_column(tmp_path):
    train, validation, _ = spurious_splits(0)  # training cells 190 / 10 per class and group
    args = AutoBalanceConfig(**{**QUIET, "output_dir": str(tmp_path)}, group_column="group", init="la", max_steps=1)
    trainer = AutoBalanceTrainer(
        model=TinyMLPForClassification(TinyMLPConfig(num_labels=2)),
        args=args,
        train_dataset=train,
        eval_dataset=validation,
    )
    share = torch.tensor(trainer.group_counts(), dtype=torch.float64).T  # groups x classes
    torch.testing.assert_close(trainer.loss_fn.offset.data, torch.log(share / share.sum(1, keepdim=True)).float())
    assert trainer.loss_fn.offset[0, 0] > trainer.loss_fn.offset[0, 1]  # group 0 is mostly class 0


def test_a_group_sensitive_loss_round_trips_through_its_json(tmp_path):
    loss = build_loss("parametric", [30, 10], sample_groups=3, init="la", learn_weights=True)
    with torch.no_grad():
        loss.offset.add_(torch.randn(3, 2))
    save_parametric_loss(loss, str(tmp_path / "loss.json"))
    reloaded = load_parametric_loss(str(tmp_path / "loss.json"))
    logits, labels, groups = torch.randn(6, 2), torch.tensor([0, 1, 0, 1, 0, 1]), torch.tensor([0, 1, 2, 2, 1, 0])
    torch.testing.assert_close(reloaded(logits, labels, groups), loss(logits, labels, groups))


def autobalance_run(seed: int, per_group_loss: bool | None) -> float:
    """Test worst-group accuracy after CE (None) or AutoBalance for worst-group accuracy on the spurious problem."""
    train, validation, test = spurious_splits(seed)
    torch.manual_seed(seed)
    common = dict(
        **QUIET,
        per_device_train_batch_size=32,
        max_steps=150,
        optim="sgd",
        learning_rate=0.1,
        lr_scheduler_type="constant",
        group_column="group",
        seed=seed,
    )
    model = TinyMLPForClassification(TinyMLPConfig(num_labels=2))
    if per_group_loss is None:
        trainer = LongTailTrainer(model=model, args=LongTailConfig(**common, loss_type="ce"), train_dataset=train)
    else:
        args = AutoBalanceConfig(
            **common,
            upper_objective="worst_group_accuracy",
            hyper_update_steps=10,
            hyper_learning_rate=0.1,
            learn_weights=True,
            per_group_loss=per_group_loss,
        )
        trainer = AutoBalanceTrainer(model=model, args=args, train_dataset=train, eval_dataset=validation)
    trainer.train()
    return worst_group(trainer.model, test)


def test_autobalance_group_sensitive_loss_lifts_worst_group_accuracy_where_a_tied_one_cannot():
    ce, per_group, tied = (autobalance_run(0, mode) for mode in (None, True, False))
    assert per_group > ce + 0.15 and per_group > tied + 0.15, (ce, per_group, tied)


def test_the_card_of_a_group_run_reports_the_group_metrics_and_marks_the_optimised_one(tmp_path):
    train, validation, _ = spurious_splits(0)
    args = SelMixConfig(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        logging_strategy="no",
        max_steps=4,
        per_device_train_batch_size=8,
        objective="worst_group_accuracy",
        group_column="group",
        gain_refresh_steps=2,
    )
    trainer = SelMixTrainer(
        model=TinyMLPForClassification(TinyMLPConfig(num_labels=2)),
        args=args,
        train_dataset=train,
        eval_dataset=validation,
        compute_metrics=make_compute_metrics(2),
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model()
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith("| Worst-group accuracy"))
    assert f"{metrics['eval_worst_group_accuracy']:.3f}" in row
    assert "| Group-balanced accuracy |" in card and "| Equal-opportunity gap (lower is better) |" in card
    assert "worst_group_accuracy" in card and "(class, group) cells" in card  # the objective and how it was trained


def test_a_training_cell_missing_from_validation_is_named_and_never_drawn(caplog):
    train = grouped_gaussian_problem([[20, 5], [5, 20]], seed=1)
    validation = grouped_gaussian_problem([[5, 5], [5, 0]], seed=2)  # no (class 1, group 1) sample
    args = SelMixConfig(
        output_dir="unused",
        report_to=[],
        use_cpu=True,
        max_steps=2,
        per_device_train_batch_size=8,
        objective="worst_group_accuracy",
        group_column="group",
    )
    with caplog.at_level("WARNING", logger="selmix_hf.trainer"):
        trainer = SelMixTrainer(
            model=TinyMLPForClassification(TinyMLPConfig(num_labels=2)),
            args=args,
            train_dataset=train,
            eval_dataset=validation,
        )
    assert "(class 1, group 1)" in caplog.text and "never drawn" in caplog.text
    assert trainer.num_rows == 3 and trainer.objective.num_rows == 3
    labels = torch.tensor([e["labels"] for e in train.examples])
    groups = torch.tensor([e["group"] for e in train.examples])
    assert torch.equal(trainer.train_rows < 0, (labels == 1) & (groups == 1))
    trainer.train()
    drawn = trainer.sampler.draw(200)
    assert not bool((trainer.train_rows[torch.cat(drawn)] < 0).any())


@pytest.mark.parametrize(
    "trainer_cls, config_cls, grouped, plain",
    [
        (SelMixTrainer, SelMixConfig, {"objective": "worst_group_accuracy"}, {"objective": "min_recall"}),
        (
            LongTailTrainer,
            LongTailConfig,
            {"loss_type": "cost_sensitive", "loss_options": {"objective": "worst_group_accuracy", "omega": 0.1}},
            {"loss_type": "cost_sensitive", "loss_options": {"objective": "min_recall"}},
        ),
        (
            AutoBalanceTrainer,
            AutoBalanceConfig,
            {"upper_objective": "worst_group_accuracy", "hyper_update_steps": 2},
            {"upper_objective": "min_recall", "hyper_update_steps": 2},
        ),
    ],
    ids=["selmix", "cost-sensitive", "autobalance"],
)
def test_a_one_group_run_equals_the_class_objective_run(trainer_cls, config_cls, grouped, plain):
    """Every sample in group 0: the run for the group objective is the run for its class counterpart, weight for
    weight (the cells are the classes, the cell prior the class prior)."""
    train = grouped_gaussian_problem([[30], [12], [6]], seed=1)
    validation = grouped_gaussian_problem([[6], [5], [5]], seed=2)
    weights = []
    for settings in (grouped, plain):
        torch.manual_seed(0)
        args = config_cls(
            **QUIET,
            max_steps=6,
            per_device_train_batch_size=4,
            optim="sgd",
            learning_rate=0.1,
            group_column="group",
            **({"gain_refresh_steps": 2} if config_cls is SelMixConfig else {"validation_refresh_steps": 2}),
            **settings,
        )
        model = TinyMLPForClassification(TinyMLPConfig(num_labels=3))
        trainer = trainer_cls(model=model, args=args, train_dataset=train, eval_dataset=validation)
        trainer.train()
        weights.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-6, atol=1e-7, msg=name)
