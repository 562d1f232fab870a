"""Groups: the (class, group) cells, group metrics by hand, group objectives and their gains over cells."""

import math

import pytest
import torch

from selmix_hf import metrics
from selmix_hf.gains import exact_gain_matrix, gain_matrix_reference, logit_gradient, selmix_gain_matrix
from selmix_hf.groups import (
    CellLayout,
    aggregate_cells,
    cell_confusion_counts,
    group_report,
    normalized_cell_confusion,
)
from selmix_hf.objectives import OBJECTIVES, get_objective

F64 = torch.float64
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
