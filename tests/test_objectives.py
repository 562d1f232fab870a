"""Objectives: autograd gradients against the closed forms of docs/engine.md (M3), reported values, multipliers."""

import math

import pytest
import torch

from selmix_hf import metrics
from selmix_hf.cards import objective_metrics
from selmix_hf.groups import group_report
from selmix_hf.objectives import OBJECTIVES, CustomObjective, get_objective, objective_for_training, optimised_metrics

K = 5
# the objectives over classes; the group objectives (over (class, group) cells) are tested in test_groups.py, and
# here only where one group makes them their class counterparts
CLASS_OBJECTIVES = sorted(name for name, cls in OBJECTIVES.items() if not cls.needs_groups)
COUNTS = [500, 300, 120, 40, 8]  # training counts: class 4 is the tail (ceil(0.1 * 5) = 1 class)
HEAD, TAIL = [0, 1, 2, 3], [4]


def random_confusion(seed: int, num_classes: int = K, prior: torch.Tensor | None = None) -> torch.Tensor:
    """A normalised confusion matrix with rows summing to the prior, diagonal-heavy but with weak classes."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_classes, num_classes, generator=gen, dtype=torch.float64) + 2.0 * torch.eye(num_classes)
    prior = metrics.uniform_prior(num_classes) if prior is None else prior
    return torch.softmax(logits, dim=1) * prior.unsqueeze(1)


def options(name: str) -> dict:
    return {"class_counts": COUNTS} if OBJECTIVES[name].needs_class_counts else {}


def per_class(head_value: float, tail_value: float) -> torch.Tensor:
    out = torch.zeros(K, dtype=torch.float64)
    out[HEAD] = head_value / len(HEAD)
    out[TAIL] = tail_value / len(TAIL)
    return out


def g_mean_closed(c: torch.Tensor) -> torch.Tensor:
    diag, row = torch.diagonal(c), c.sum(1)
    gm = torch.prod(diag / row) ** (1.0 / K)
    g = -gm / (K * row).unsqueeze(1).expand(K, K).clone()
    g[range(K), range(K)] = gm / K * (1 / diag - 1 / row)
    return g


def h_mean_closed(c: torch.Tensor) -> torch.Tensor:
    diag, row = torch.diagonal(c), c.sum(1)
    hm = K / (row / diag).sum()
    g = (-(hm**2) / (K * diag)).unsqueeze(1).expand(K, K).clone()
    g[range(K), range(K)] = -(hm**2 / K) * (1 / diag - row / diag**2)
    return g


def constrained(base: torch.Tensor, mu: torch.Tensor, normaliser: float) -> torch.Tensor:
    return (base + torch.ones(K, 1, dtype=torch.float64) * mu.unsqueeze(0)) / normaliser


def closed_form(name: str, obj, c: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(K, dtype=torch.float64)
    if name in ("mean_recall", "accuracy"):
        return eye
    if name == "min_recall":
        return torch.diag(K * obj.lam)
    if name == "min_head_tail_recall":
        return torch.diag(K * per_class(*obj.lam_head_tail.tolist()))
    if name == "g_mean":
        return g_mean_closed(c)
    if name == "h_mean":
        return h_mean_closed(c)
    if name == "mean_recall_min_coverage":
        return constrained(eye, obj.mu, float(obj.mu.max()) + 1)
    if name == "h_mean_min_coverage":
        return constrained(h_mean_closed(c), obj.mu, float(obj.mu.max()) + 1)
    mu = per_class(*obj.mu_head_tail.tolist())
    base = eye if name.startswith("mean_recall") else h_mean_closed(c)
    return constrained(base, mu, float(obj.mu_head_tail.max()) + 1)


def test_registry_holds_the_published_objectives_and_accuracy():
    published = {
        "mean_recall",
        "min_recall",
        "min_head_tail_recall",
        "g_mean",
        "h_mean",
        "mean_recall_min_coverage",
        "h_mean_min_coverage",
        "mean_recall_min_head_tail_coverage",
        "h_mean_min_head_tail_coverage",
    }
    groups = {"worst_group_accuracy", "group_balanced_accuracy", "mean_recall_equal_opportunity"}
    assert set(OBJECTIVES) == published | groups | {"accuracy", "accuracy_equal_opportunity"}
    assert {name for name, cls in OBJECTIVES.items() if cls.needs_groups} == groups | {"accuracy_equal_opportunity"}


@pytest.mark.parametrize("name", CLASS_OBJECTIVES)
@pytest.mark.parametrize("seed", [0, 1])
def test_autograd_gradient_matches_closed_form(name, seed):
    obj = get_objective(name, K, **options(name))
    # a matrix where some coverages miss their target, so constrained objectives have non-zero multipliers
    c = random_confusion(seed)
    c[:, 0] += 0.03
    c[:, 4] = 0.002
    c = c / c.sum(1, keepdim=True) / K
    obj.update(c)
    assert all(float(m.abs().sum()) > 0 for m in obj.multipliers().values())
    torch.testing.assert_close(obj.gradient(c), closed_form(name, obj, c), rtol=1e-8, atol=1e-10)


# Hand-computed: counts [[8,2,0],[1,3,0],[0,1,1]] -> recalls 0.8, 0.75, 0.5; uniform prior 1/3.
HAND_LABELS = [0] * 10 + [1] * 4 + [2] * 2
HAND_PREDS = [0] * 8 + [1] * 2 + [0] + [1] * 3 + [1, 2]
HAND_COUNTS = [100, 50, 5]  # class 2 is the tail
COVERAGE = [(0.8 + 0.25) / 3, (0.2 + 0.75 + 0.5) / 3, 0.5 / 3]
HAND_VALUES = {
    "mean_recall": (0.8 + 0.75 + 0.5) / 3,
    "accuracy": (0.8 + 0.75 + 0.5) / 3,
    "min_recall": 0.5,
    "min_head_tail_recall": 0.5,  # head (0.8 + 0.75) / 2 = 0.775, tail 0.5
    "g_mean": (0.8 * 0.75 * 0.5) ** (1 / 3),
    "h_mean": 3 / (1 / 0.8 + 1 / 0.75 + 1 / 0.5),
    "mean_recall_min_coverage": (0.8 + 0.75 + 0.5) / 3,
    "h_mean_min_coverage": 3 / (1 / 0.8 + 1 / 0.75 + 1 / 0.5),
    "mean_recall_min_head_tail_coverage": (0.8 + 0.75 + 0.5) / 3,
    "h_mean_min_head_tail_coverage": 3 / (1 / 0.8 + 1 / 0.75 + 1 / 0.5),
    # one group: each class is one cell
    "worst_group_accuracy": 0.5,
    "group_balanced_accuracy": (0.8 + 0.75 + 0.5) / 3,
    "mean_recall_equal_opportunity": (0.8 + 0.75 + 0.5) / 3,
    "accuracy_equal_opportunity": (0.8 + 0.75 + 0.5) / 3,
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_reported_value_on_hand_computed_confusion(name):
    c = metrics.normalized_confusion(metrics.confusion_counts(HAND_LABELS, HAND_PREDS, 3))
    obj = get_objective(name, 3, **({"class_counts": HAND_COUNTS} if OBJECTIVES[name].needs_class_counts else {}))
    assert obj.value(c) == pytest.approx(HAND_VALUES[name], abs=1e-12)
    report = obj.report(c)
    if name.endswith("_min_coverage"):
        assert report["min_coverage"] == pytest.approx(min(COVERAGE), abs=1e-12)
    if name.endswith("_head_tail_coverage"):
        assert report["min_head_tail_coverage"] == pytest.approx(COVERAGE[2], abs=1e-12)
    if name.endswith("_equal_opportunity"):
        assert report["equal_opportunity_gap"] == 0.0  # one group: no gap


def test_min_recall_multipliers_move_toward_the_worst_class():
    obj = get_objective("min_recall", K)
    c = random_confusion(3)
    worst = int(torch.argmin(metrics.recalls(c)))
    before = obj.lam.clone()
    obj.update(c)
    assert int(torch.argmax(obj.lam)) == worst
    assert obj.lam[worst] > before[worst]
    assert float(obj.lam.sum()) == pytest.approx(1.0)
    # the weights follow normalise(exp(-omega * recall)) with beta = 0
    expected = torch.exp(-50 * metrics.recalls(c))
    torch.testing.assert_close(obj.lam, expected / expected.sum())


def test_min_head_tail_multipliers_favour_the_weaker_group():
    obj = get_objective("min_head_tail_recall", K, class_counts=COUNTS)
    c = random_confusion(4)
    c[4] = torch.tensor([0.5, 0.3, 0.1, 0.07, 0.03], dtype=torch.float64) / K  # tail class 4 barely recalled
    obj.update(c)
    lam_head, lam_tail = obj.lam_head_tail.tolist()
    assert lam_tail > lam_head and lam_head + lam_tail == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["mean_recall_min_coverage", "h_mean_min_coverage"])
def test_coverage_multipliers_zero_when_met_positive_below_target(name):
    obj = get_objective(name, K)
    met = torch.eye(K, dtype=torch.float64) / K  # every coverage exactly 1/K >= 0.95/K
    obj.update(met)
    assert torch.count_nonzero(obj.mu) == 0
    short = met.clone()
    short[2, 2], short[2, 0] = 0.5 / K, 0.5 / K  # class 2's coverage drops to 0.5/K, class 0's rises
    obj.update(short)
    assert obj.mu[2] > 0
    assert torch.count_nonzero(obj.mu) == 1
    expected = 100 * (1 - math.exp((0.5 / K - 0.95 / K) / 0.01))
    assert float(obj.mu[2]) == pytest.approx(expected)


def test_head_tail_coverage_multiplier_on_the_tail_group():
    obj = get_objective("mean_recall_min_head_tail_coverage", K, class_counts=COUNTS)
    c = torch.eye(K, dtype=torch.float64) / K
    c[4, 4], c[4, 0] = 0.2 / K, 0.8 / K
    obj.update(c)
    mu_head, mu_tail = obj.mu_head_tail.tolist()
    assert mu_head == 0.0 and mu_tail > 0


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_state_dict_round_trip(name):
    trained = get_objective(name, K, **options(name))
    c = random_confusion(5)
    c[:, 3] = 0.001
    c = c / c.sum(1, keepdim=True) / K
    trained.update(c)
    fresh = get_objective(name, K, **options(name))
    fresh.load_state_dict(trained.state_dict())
    probe = random_confusion(6)
    torch.testing.assert_close(fresh.gradient(probe), trained.gradient(probe))
    for key, value in trained.multipliers().items():
        torch.testing.assert_close(fresh.multipliers()[key], value)


def test_state_dict_of_another_objective_is_rejected():
    with pytest.raises(ValueError, match="min_recall"):
        get_objective("mean_recall_min_coverage", K).load_state_dict(get_objective("min_recall", K).state_dict())


def test_non_uniform_prior_mean_recall_gradient():
    prior = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    obj = get_objective("mean_recall", K, class_prior=prior)
    c = random_confusion(7, prior=prior)
    assert obj.value(c) == pytest.approx(float(metrics.recalls(c).mean()))
    torch.testing.assert_close(obj.gradient(c), torch.diag(1 / (K * prior)))


def test_custom_objective_from_a_torch_function():
    def tail_recall(c):
        return c[4, 4] / c[4].sum()

    obj = CustomObjective(K, tail_recall, name="tail_recall")
    c = random_confusion(8)
    assert obj.value(c) == pytest.approx(float(metrics.recalls(c)[4]))
    g = obj.gradient(c)
    row = c[4].sum()
    expected = torch.zeros(K, K, dtype=torch.float64)
    expected[4] = -c[4, 4] / row**2
    expected[4, 4] += 1 / row
    torch.testing.assert_close(g, expected)
    assert get_objective(obj, K) is obj


def test_unknown_objective_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_objective("worst_recall", K)
    for name in OBJECTIVES:
        assert name in str(err.value)


def test_unknown_option_lists_accepted_options():
    with pytest.raises(ValueError, match="omega"):
        get_objective("min_recall", K, temperature=3)


def test_head_tail_objective_without_split_is_a_clear_error():
    with pytest.raises(ValueError, match="class_counts"):
        get_objective("min_head_tail_recall", K)


@pytest.mark.parametrize("bad", [torch.full((K, K), float("nan")), torch.zeros(K, K + 1)])
def test_bad_confusion_is_rejected(bad):
    with pytest.raises(ValueError):
        get_objective("h_mean", K).gradient(bad)


HEAD_TAIL_OBJECTIVES = {"min_head_tail_recall", "mean_recall_min_head_tail_coverage", "h_mean_min_head_tail_coverage"}


def test_exactly_the_head_tail_objectives_need_class_counts():
    assert {name for name, cls in OBJECTIVES.items() if cls.needs_class_counts} == HEAD_TAIL_OBJECTIVES
    assert CustomObjective.needs_class_counts is False


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_for_training_gives_class_counts_to_exactly_the_objectives_that_need_them(name):
    obj = objective_for_training(name, K, COUNTS, tail_fraction=0.2)  # an objective without the option would refuse it
    if OBJECTIVES[name].needs_class_counts:
        assert obj.split.tail == (4,) and obj.split.head == (0, 1, 2, 3)
    else:
        assert not hasattr(obj, "split")


def test_objective_for_training_keeps_an_explicit_split():
    obj = objective_for_training("mean_recall_min_head_tail_coverage", K, COUNTS, tail=[0, 1])
    assert obj.split.tail == (0, 1)


def test_optimised_metrics_are_keys_of_the_classification_report():
    report = metrics.classification_report(HAND_LABELS, HAND_PREDS, 3, class_counts=HAND_COUNTS)
    report.update(group_report(HAND_LABELS, HAND_PREDS, [0] * len(HAND_LABELS), 3))  # the group objectives' keys
    for name, cls in OBJECTIVES.items():
        assert cls.optimised_metrics, name
        assert set(cls.optimised_metrics) <= set(report), name
        assert optimised_metrics(name) == list(cls.optimised_metrics) == objective_metrics(name)


def test_optimised_metrics_by_name():
    assert optimised_metrics("mean_recall") == ["mean_recall"]
    assert optimised_metrics("mean_recall_min_coverage") == ["mean_recall", "min_coverage"]
    assert optimised_metrics("h_mean_min_head_tail_coverage") == ["h_mean"]  # the report has no head/tail coverage
    assert optimised_metrics("tail_recall") == ["tail_recall"]  # a custom objective's name
    assert optimised_metrics(None) == []
