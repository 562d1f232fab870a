"""Long-tailed losses against hand-computed values, their special cases, and their errors."""

import math

import pytest
import torch

from selmix_hf.citations import CITATIONS
from selmix_hf.losses import (
    LOSSES,
    CostSensitiveLoss,
    LDAMLoss,
    LogitAdjustedLoss,
    ParametricCrossEntropy,
    VSLoss,
    build_loss,
    class_balanced_weights,
    frequency_groups,
    inverse_frequency_weights,
    ldam_margins,
)
from selmix_hf.objectives import get_objective

COUNTS = [400, 100, 25, 4]
LOGITS = [[2.0, 0.5, -1.0, 0.0], [0.3, 1.2, 0.1, -0.4], [-0.5, 0.0, 0.8, 0.2]]
LABELS = [0, 2, 3]
PRIOR = [n / sum(COUNTS) for n in COUNTS]


def ce(row, label):
    """-log softmax(row)[label], in plain python."""
    return -row[label] + math.log(sum(math.exp(v) for v in row))


def mean(values):
    return sum(values) / len(values)


def cb_weights(beta=0.9999):
    raw = [(1 - beta) / (1 - beta**n) for n in COUNTS]
    return [w * len(raw) / sum(raw) for w in raw]


def hand_weighted_ce():
    w = cb_weights()
    return mean([w[y] * ce(r, y) for r, y in zip(LOGITS, LABELS)])


def hand_focal(gamma=2.0):
    out = []
    for row, y in zip(LOGITS, LABELS):
        p = math.exp(-ce(row, y))
        out.append(-((1 - p) ** gamma) * math.log(p))
    return mean(out)


def hand_la(tau=1.0):
    return mean([ce([f + tau * math.log(pi) for f, pi in zip(row, PRIOR)], y) for row, y in zip(LOGITS, LABELS)])


def hand_ldam(scale=1.0, max_margin=0.5):
    raw = [n**-0.25 for n in COUNTS]
    margins = [m * max_margin / max(raw) for m in raw]
    return mean(
        [
            ce([scale * (f - (margins[y] if k == y else 0.0)) for k, f in enumerate(row)], y)
            for row, y in zip(LOGITS, LABELS)
        ]
    )


def hand_vs(gamma=0.2, tau=1.0):
    delta = [(n / max(COUNTS)) ** gamma for n in COUNTS]
    return mean(
        [ce([d * f + tau * math.log(pi) for f, d, pi in zip(row, delta, PRIOR)], y) for row, y in zip(LOGITS, LABELS)]
    )


CASES = [
    ("ce", {}, lambda: mean([ce(r, y) for r, y in zip(LOGITS, LABELS)])),
    ("weighted_ce", {}, hand_weighted_ce),
    ("focal", {"gamma": 2.0}, hand_focal),
    ("logit_adjusted", {"tau": 1.0}, hand_la),
    ("logit_adjusted", {"tau": 0.5}, lambda: hand_la(0.5)),
    ("balanced_softmax", {}, hand_la),
    ("ldam", {}, hand_ldam),
    ("ldam", {"scale": 30.0, "max_margin": 0.3}, lambda: hand_ldam(30.0, 0.3)),
    ("vs", {"gamma": 0.25, "tau": 1.2}, lambda: hand_vs(0.25, 1.2)),
]


@pytest.mark.parametrize("loss_type, options, expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_loss_against_hand_computed_value(loss_type, options, expected):
    loss = build_loss(loss_type, COUNTS, **options)
    value = loss(torch.tensor(LOGITS), torch.tensor(LABELS))
    assert float(value) == pytest.approx(expected(), rel=1e-5)


def test_ldam_drw_switches_on_class_balanced_weights():
    loss = LDAMLoss(COUNTS, scale=1.0)
    logits, labels = torch.tensor(LOGITS), torch.tensor(LABELS)
    plain = float(loss(logits, labels))
    loss.set_reweighting(True)
    margins = ldam_margins(COUNTS).tolist()
    w = cb_weights()
    expected = mean(
        [w[y] * ce([f - (margins[y] if k == y else 0) for k, f in enumerate(row)], y) for row, y in zip(LOGITS, LABELS)]
    )
    assert float(loss(logits, labels)) == pytest.approx(expected, rel=1e-5) and expected != pytest.approx(plain)
    restored = LDAMLoss(COUNTS, scale=1.0)
    restored.load_state_dict(loss.state_dict())
    assert restored.reweighting


def test_la_with_tau_one_is_balanced_softmax():
    logits, labels = torch.randn(16, 4), torch.randint(0, 4, (16,))
    torch.testing.assert_close(
        build_loss("logit_adjusted", COUNTS, tau=1.0)(logits, labels),
        build_loss("balanced_softmax", COUNTS)(logits, labels),
    )


def test_ldam_margins_follow_n_to_the_minus_quarter():
    margins = ldam_margins(COUNTS)
    assert float(margins.max()) == pytest.approx(0.5) and int(margins.argmax()) == 3
    ratios = margins / torch.tensor(COUNTS, dtype=torch.float32) ** -0.25
    torch.testing.assert_close(ratios, torch.full_like(ratios, float(ratios[0])))


def test_class_weights_sum_to_k_and_favour_rare_classes():
    for weights in (
        class_balanced_weights(COUNTS),
        class_balanced_weights(COUNTS, beta=0.99),
        inverse_frequency_weights(COUNTS),
    ):
        assert float(weights.sum()) == pytest.approx(4.0)
        assert torch.all(weights[1:] > weights[:-1])


# -- the parametric loss and its special cases -----------------------------------------------------


def special_case(name):
    counts = torch.tensor(COUNTS, dtype=torch.float32)
    ones, zeros = torch.ones(4), torch.zeros(4)
    if name == "ce":
        return ParametricCrossEntropy.from_values(ones, zeros), build_loss("ce", COUNTS)
    if name == "la":
        return ParametricCrossEntropy.from_values(ones, torch.log(counts / counts.sum())), LogitAdjustedLoss(COUNTS)
    if name == "cdt":
        return ParametricCrossEntropy.from_values((counts / counts.max()) ** 0.2, zeros), VSLoss(
            COUNTS, gamma=0.2, tau=0.0
        )
    delta = (counts / counts.max()) ** 0.3
    return ParametricCrossEntropy.from_values(delta, 1.1 * torch.log(counts / counts.sum())), VSLoss(COUNTS, 0.3, 1.1)


@pytest.mark.parametrize("name", ["ce", "la", "cdt", "vs"])
def test_parametric_loss_reduces_to_the_known_losses(name):
    parametric, known = special_case(name)
    logits, labels = torch.randn(32, 4), torch.randint(0, 4, (32,))
    torch.testing.assert_close(parametric(logits, labels), known(logits, labels))


@pytest.mark.parametrize(
    "init, activation", [("ones", "exp"), ("la", "exp"), ("cdt", "exp"), ("cdt", "sigmoid"), ("la", "identity")]
)
def test_parametric_initialisations(init, activation):
    loss = ParametricCrossEntropy(COUNTS, init=init, delta_activation=activation)
    counts = torch.tensor(COUNTS, dtype=torch.float32)
    expected_delta = (counts / counts.max()) ** 0.2 if init == "cdt" else torch.ones(4)
    expected_offset = torch.log(counts / counts.sum()) if init == "la" else torch.zeros(4)
    torch.testing.assert_close(
        loss.class_delta(),
        expected_delta.clamp(max=1 - 1e-4) if activation == "sigmoid" else expected_delta,
        atol=1e-4,
        rtol=1e-4,
    )
    torch.testing.assert_close(loss.class_offset(), expected_offset)


def test_groups_tie_frequency_sorted_classes():
    counts = [5, 400, 30, 100, 4, 60]
    groups = frequency_groups(counts, 3)
    assert groups.tolist() == [2, 0, 1, 0, 2, 1]  # (400, 100), (60, 30), (5, 4)
    loss = ParametricCrossEntropy(counts, num_groups=3, init="la")
    assert loss.offset.numel() == 3
    assert loss.class_offset()[1] == loss.class_offset()[3]


# -- cost-sensitive -------------------------------------------------------------------------------


def test_cost_sensitive_min_recall_is_la_minus_log_multipliers():
    loss = CostSensitiveLoss(COUNTS, "min_recall")
    confusion = torch.diag(torch.tensor([0.9, 0.7, 0.4, 0.2], dtype=torch.float64)) / 4
    confusion[:, 0] += (1 - torch.tensor([0.9, 0.7, 0.4, 0.2], dtype=torch.float64)) / 4
    loss.update(confusion)
    recall = torch.tensor([1.0, 0.7, 0.4, 0.2], dtype=torch.float64)  # row 0 also got column 0's additions
    lam = torch.softmax(torch.log(torch.full((4,), 0.25, dtype=torch.float64)) - 0.1 * recall, 0)
    torch.testing.assert_close(loss.objective.lam, lam)
    logits, labels = torch.randn(8, 4), torch.randint(0, 4, (8,))
    expected = torch.nn.functional.cross_entropy(
        logits + torch.log(torch.tensor(PRIOR)) - torch.log(lam.float()), labels
    )
    torch.testing.assert_close(loss(logits, labels), expected)


def test_cost_sensitive_general_gain_matrix_form():
    objective = get_objective("mean_recall_min_coverage", 4)
    loss = CostSensitiveLoss(COUNTS, objective, tau=0.0)
    confusion = torch.eye(4, dtype=torch.float64) / 4
    confusion[3, 3], confusion[3, 0] = 0.05, 0.2  # class 3 under-covered
    loss.update(confusion)
    gain = objective.gradient(confusion)
    assert gain[0, 3] > 0  # the coverage multiplier rewards predicting class 3
    logits, labels = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 3, 0])
    diag = torch.diagonal(gain)
    log_p = torch.log_softmax(logits - torch.log(diag), 1)
    expected = -((gain / diag)[labels] * log_p).sum(1).mean()
    torch.testing.assert_close(loss(logits.float(), labels).double(), expected, rtol=1e-5, atol=1e-6)
    restored = CostSensitiveLoss(COUNTS, get_objective("mean_recall_min_coverage", 4), tau=0.0)
    restored.load_state_dict(loss.state_dict())
    torch.testing.assert_close(restored.objective.mu, objective.mu)


# -- bad input --------------------------------------------------------------------------------


def test_unknown_loss_type_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        build_loss("ldam_drw", COUNTS)
    assert all(name in str(err.value) for name in LOSSES)


def test_unknown_option_lists_accepted_ones():
    with pytest.raises(ValueError, match="tau"):
        build_loss("logit_adjusted", COUNTS, temperature=2.0)


@pytest.mark.parametrize(
    "loss_type", ["weighted_ce", "logit_adjusted", "balanced_softmax", "ldam", "vs", "parametric", "cost_sensitive"]
)
def test_class_with_zero_training_samples_is_named(loss_type):
    with pytest.raises(ValueError, match=r"classes \[2\] have zero training samples"):
        build_loss(loss_type, [10, 5, 0, 3])


# -- declared attributes -----------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_every_loss_declares_citation_validation_and_reweighting(loss_type):
    cls = LOSSES[loss_type]
    assert cls.citation is None or isinstance(cls.citation, str)
    assert isinstance(cls.needs_validation, bool) and isinstance(cls.has_deferred_reweighting, bool)
    assert cls.needs_validation == hasattr(cls, "update")
    assert cls.has_deferred_reweighting == hasattr(cls, "set_reweighting")
    assert cls.steps_with_optimizer == hasattr(cls, "end_step")
    cells = (
        [[n - n // 2, n // 2] for n in COUNTS] if cls.needs_groups else None
    )  # group losses: a classes x groups table
    assert isinstance(build_loss(loss_type, COUNTS, group_counts=cells), cls)


def test_every_cited_key_is_a_citation():
    cited = {name: cls.citation for name, cls in LOSSES.items() if cls.citation is not None}
    assert set(cited.values()) <= set(CITATIONS)
    # every loss but plain cross-entropy and its group re-weighting (classical importance weighting) has a paper
    assert set(LOSSES) - set(cited) == {"ce", "group_weighted_ce"}


def test_the_trainer_facing_flags_are_set_where_the_losses_need_them():
    assert {name for name, cls in LOSSES.items() if cls.needs_validation} == {"cost_sensitive"}
    assert {name for name, cls in LOSSES.items() if cls.has_deferred_reweighting} == {"ldam"}
    assert LOSSES["balanced_softmax"].citation == "balanced_softmax"  # not inherited from logit adjustment
    assert LOSSES["logit_adjusted"].citation == "logit_adjusted"


def test_citations_are_bibtex_entries_with_unique_keys():
    bibtex_keys = [entry.split("{", 1)[1].split(",", 1)[0] for entry in CITATIONS.values()]
    assert len(set(bibtex_keys)) == len(CITATIONS)
    for entry in CITATIONS.values():
        assert entry.startswith("@inproceedings{") and entry.endswith("}")
        assert all(f"{field} " in entry for field in ("title", "author", "booktitle", "year"))
        assert entry.count("{") == entry.count("}")


def test_loss_options_are_checked_by_name_and_type_wherever_the_loss_is_built():
    from selmix_hf.losses import build_loss

    with pytest.raises(TypeError, match="option 'gamma' must be float, got 'two'"):
        build_loss("focal", [10, 5], gamma="two")
    with pytest.raises(ValueError, match=r"does not take option\(s\) \['omegaa'\]"):
        build_loss("cost_sensitive", [10, 5], omegaa=1.0)
    assert build_loss("cost_sensitive", [10, 5], omega=1.0).objective.omega == 1.0  # the objective's own option
