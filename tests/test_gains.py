"""Gain matrix: published estimator against the K^4 formula, exact estimator against finite differences."""

import pytest
import torch

from selmix_hf import gains as gains_module
from selmix_hf import metrics
from selmix_hf.gains import (
    class_prototypes,
    equal_norm_prototypes,
    exact_gain_matrix,
    gain_matrix,
    gain_matrix_reference,
    logit_gradient,
    sampling_distribution,
    selmix_gain_matrix,
)
from selmix_hf.objectives import OBJECTIVES, get_objective

F64 = torch.float64


def problem(seed: int, num_classes: int = 6, dim: int = 5, dtype=F64, prior=None, scale: float = 1.0):
    """Random prototypes, head and a diagonal-heavy normalised confusion matrix."""
    gen = torch.Generator().manual_seed(seed)
    protos = torch.randn(num_classes, dim, generator=gen, dtype=F64)
    weight = torch.randn(num_classes, dim, generator=gen, dtype=F64) * scale
    bias = torch.randn(num_classes, generator=gen, dtype=F64) * 0.3
    prior = metrics.uniform_prior(num_classes) if prior is None else prior
    logits = torch.randn(num_classes, num_classes, generator=gen, dtype=F64) + 2 * torch.eye(num_classes, dtype=F64)
    confusion = torch.softmax(logits, 1) * prior.unsqueeze(1)
    return [t.to(dtype) for t in (confusion, protos, weight, bias)]


def objective(name: str, num_classes: int, confusion: torch.Tensor, prior=None):
    counts = list(range(10 * num_classes, 0, -10))
    options = {"class_counts": counts} if OBJECTIVES[name].needs_class_counts else {}
    obj = get_objective(name, num_classes, class_prior=prior, **options)
    obj.update(confusion.double())  # non-trivial multipliers
    return obj


SKEWED = torch.tensor([0.3, 0.25, 0.2, 0.1, 0.1, 0.05], dtype=F64)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("prior", [None, SKEWED], ids=["uniform", "skewed"])
def test_selmix_estimator_equals_the_k4_formula(name, seed, prior):
    confusion, protos, weight, bias = problem(seed, prior=prior)
    obj = objective(name, 6, confusion, prior)
    fast = gain_matrix(obj, confusion, protos, weight, bias, mix_lambda_min=0.6)
    slow = gain_matrix_reference(obj, confusion, protos, weight, bias, mix_lambda_min=0.6)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    assert slow.abs().max() > 1e-3  # not trivially zero


def test_logit_gradient_closed_form_for_mean_recall():
    confusion, *_ = problem(3)
    k = confusion.shape[0]
    d = logit_gradient(get_objective("mean_recall", k), confusion, metrics.uniform_prior(k))
    diag = torch.diagonal(confusion)
    expected = -k * diag.unsqueeze(1) * confusion
    expected[range(k), range(k)] = diag - k * diag**2
    torch.testing.assert_close(d, expected)


@pytest.mark.parametrize("name", ["min_recall", "h_mean", "g_mean", "h_mean_min_coverage"])
def test_logit_gradient_is_the_jacobian_through_the_prototype_softmax(name):
    confusion, *_ = problem(4, prior=SKEWED)
    obj = objective(name, 6, confusion, SKEWED)
    logits = torch.log(confusion / SKEWED.unsqueeze(1)).requires_grad_(True)
    psi = obj.surrogate(SKEWED.unsqueeze(1) * torch.softmax(logits, dim=1))
    (expected,) = torch.autograd.grad(psi, logits)
    torch.testing.assert_close(logit_gradient(obj, confusion, SKEWED), expected)


def soft_surrogate(obj, features, labels, weight, bias, prior):
    """psi of the per-sample soft confusion C_kl = pi_k / N_k sum_{n in k} softmax(W z_n + b)_l."""
    probs = torch.softmax(features @ weight.T + bias, dim=1)
    k = weight.shape[0]
    counts = torch.bincount(labels, minlength=k).to(features.dtype)
    soft = torch.zeros(k, k, dtype=features.dtype).index_add_(0, labels, probs)
    return obj.surrogate(soft * (prior / counts).unsqueeze(1))


@pytest.mark.parametrize("name", ["mean_recall", "min_recall", "h_mean", "g_mean", "mean_recall_min_coverage"])
def test_exact_estimator_predicts_the_change_after_a_head_step(name):
    k, d, per_class, lam_min = 4, 5, 12, 0.6
    gen = torch.Generator().manual_seed(11)
    labels = torch.arange(k).repeat_interleave(per_class)
    features = (
        torch.randn(k * per_class, d, generator=gen, dtype=F64)
        + 1.5 * torch.randn(k, d, generator=gen, dtype=F64)[labels]
    )
    weight = torch.randn(k, d, generator=gen, dtype=F64) * 0.5
    bias = torch.randn(k, generator=gen, dtype=F64) * 0.2
    prior = metrics.uniform_prior(k)
    protos = class_prototypes(features, labels, k)
    obj = objective(
        name,
        k,
        metrics.normalized_confusion(metrics.confusion_counts(labels, (features @ weight.T + bias).argmax(1), k)),
        None,
    )
    predicted = gain_matrix(
        obj, None, protos, weight, bias, estimator="exact", features=features, labels=labels, mix_lambda_min=lam_min
    )
    lam_bar, eps = (1 + lam_min) / 2, 1e-5
    measured = torch.zeros(k, k, dtype=F64)
    for i in range(k):
        for j in range(k):
            mixed = lam_bar * protos[i] + (1 - lam_bar) * protos[j]
            residual = torch.softmax(weight @ mixed + bias, 0) - torch.nn.functional.one_hot(torch.tensor(i), k)
            step_w, step_b = torch.outer(residual, mixed), residual  # gradient of CE(W z~ + b, i)
            up = soft_surrogate(obj, features, labels, weight - eps * step_w, bias - eps * step_b, prior)
            down = soft_surrogate(obj, features, labels, weight + eps * step_w, bias + eps * step_b, prior)
            measured[i, j] = (up - down) / (2 * eps)
    torch.testing.assert_close(predicted, measured, rtol=1e-3, atol=1e-3 * float(measured.abs().max()))
    assert measured.abs().max() > 1e-4


def validation_sample(seed: int, num_classes: int = 6, dim: int = 5, per_class: int = 4):
    """Per-sample validation features around random class centres, every class present."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    centres = torch.randn(num_classes, dim, generator=gen, dtype=F64)
    return centres[labels] + 0.5 * torch.randn(labels.numel(), dim, generator=gen, dtype=F64), labels


@pytest.mark.parametrize("name", ["mean_recall", "min_recall", "h_mean_min_coverage", "min_head_tail_recall"])
@pytest.mark.parametrize("prior", [None, SKEWED], ids=["uniform", "skewed"])
def test_selmix_gain_matrix_is_the_dispatchers_selmix_estimator(name, prior):
    confusion, protos, weight, bias = problem(13, prior=prior)
    obj = objective(name, 6, confusion, prior)
    direct = selmix_gain_matrix(obj, confusion, protos, weight, bias, mix_lambda_min=0.7, class_prior=prior)
    dispatched = gain_matrix(
        obj, confusion, protos, weight, bias, mix_lambda_min=0.7, estimator="selmix", class_prior=prior
    )
    torch.testing.assert_close(direct, dispatched, rtol=0, atol=0)
    torch.testing.assert_close(
        selmix_gain_matrix(obj, confusion, protos, weight, None),
        gain_matrix(obj, confusion, protos, weight, None),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("name", ["mean_recall", "g_mean", "mean_recall_min_coverage"])
@pytest.mark.parametrize("prior", [None, SKEWED], ids=["uniform", "skewed"])
def test_exact_gain_matrix_is_the_dispatchers_exact_estimator(name, prior):
    confusion, _, weight, bias = problem(14, prior=prior)
    features, labels = validation_sample(14)
    protos = class_prototypes(features, labels, 6)
    obj = objective(name, 6, confusion, prior)
    direct = exact_gain_matrix(obj, protos, weight, bias, features, labels, mix_lambda_min=0.5, class_prior=prior)
    dispatched = gain_matrix(
        obj,
        None,
        protos,
        weight,
        bias,
        mix_lambda_min=0.5,
        estimator="exact",
        class_prior=prior,
        features=features,
        labels=labels,
    )
    torch.testing.assert_close(direct, dispatched, rtol=0, atol=0)
    assert direct.abs().max() > 1e-6


def test_the_two_estimators_check_their_arguments_alike():
    confusion, protos, weight, bias = problem(15)
    features, labels = validation_sample(15)
    obj = get_objective("mean_recall", 6)
    for call in (
        lambda: selmix_gain_matrix(obj, confusion, protos[:5], weight, bias),
        lambda: exact_gain_matrix(obj, protos[:5], weight, bias, features, labels),
    ):
        with pytest.raises(ValueError, match="prototypes has 5 rows"):
            call()
    for call in (
        lambda: selmix_gain_matrix(obj, confusion, protos, weight, bias, mix_lambda_min=1.5),
        lambda: exact_gain_matrix(obj, protos, weight, bias, features, labels, mix_lambda_min=1.5),
    ):
        with pytest.raises(ValueError, match="mix_lambda_min"):
            call()


def test_dispatcher_rejects_an_unknown_estimator_before_reading_the_inputs():
    with pytest.raises(ValueError, match="unknown gain estimator 'taylor'; valid estimators are: selmix, exact"):
        gain_matrix(
            get_objective("mean_recall", 3), None, torch.zeros(2, 2), torch.zeros(3, 2), None, estimator="taylor"
        )


def test_float32_agrees_with_float64():
    confusion, protos, weight, bias = problem(5, num_classes=20, dim=16)
    obj = objective("min_recall", 20, confusion)
    wide = gain_matrix(obj, confusion, protos, weight, bias)
    narrow = gain_matrix(obj, *(t.float() for t in (confusion, protos, weight, bias)))
    assert narrow.dtype == torch.float32
    torch.testing.assert_close(narrow.double(), wide, rtol=1e-4, atol=1e-5 * float(wide.abs().max()))


def test_large_logit_gaps_do_not_underflow_in_float32():
    confusion, protos, weight, bias = problem(6, num_classes=8, dim=6, scale=400.0)  # logit gaps in the thousands
    obj = objective("h_mean", 8, confusion)
    narrow = gain_matrix(obj, *(t.float() for t in (confusion, protos, weight, bias)))
    reference = gain_matrix_reference(obj, confusion, protos, weight, bias)
    assert torch.isfinite(narrow).all()
    torch.testing.assert_close(narrow.double(), reference, rtol=1e-3, atol=1e-4 * float(reference.abs().max()))


def test_chunked_reduction_equals_one_chunk(monkeypatch):
    confusion, protos, weight, bias = problem(7, num_classes=23, dim=8)
    obj = objective("mean_recall", 23, confusion)
    whole = gain_matrix(obj, confusion, protos, weight, bias)
    monkeypatch.setattr(gains_module, "_CHUNK_ELEMENTS", 5 * 23)  # rows of 5, last chunk of 3
    torch.testing.assert_close(gain_matrix(obj, confusion, protos, weight, bias), whole)


def test_large_k_rows_match_a_direct_per_row_evaluation():
    k, d = 1000, 32
    confusion, protos, weight, bias = problem(8, num_classes=k, dim=d, dtype=torch.float32)
    obj = get_objective("mean_recall", k)
    g = gain_matrix(obj, confusion, protos, weight, bias)
    assert g.shape == (k, k) and torch.isfinite(g).all()
    wide = [t.double() for t in (confusion, protos, weight, bias)]
    h = (wide[1] @ wide[1].T) @ logit_gradient(obj, wide[0], metrics.uniform_prior(k))
    logits = wide[1] @ wide[2].T + wide[3]
    for i in (0, 517, 999):
        p = torch.softmax(0.8 * logits[i] + 0.2 * logits, dim=1)  # row j: pair (i, j)
        expected = h[i, i] - (p * (0.8 * h[i] + 0.2 * h)).sum(1)
        torch.testing.assert_close(g[i].double(), expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))


def test_two_classes_work():
    confusion, protos, weight, bias = problem(9, num_classes=2, dim=3)
    obj = objective("min_recall", 2, confusion)
    torch.testing.assert_close(
        gain_matrix(obj, confusion, protos, weight, bias), gain_matrix_reference(obj, confusion, protos, weight, bias)
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    confusion, protos, weight, bias = problem(10, num_classes=50, dim=16, dtype=torch.float32)
    obj = objective("h_mean", 50, confusion)
    cpu = gain_matrix(obj, confusion, protos, weight, bias)
    gpu = gain_matrix(obj, *(t.cuda() for t in (confusion, protos, weight, bias)))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-6)


# -- sampling distribution ------------------------------------------------------------------------


def test_sampling_distribution_properties():
    gains = torch.tensor([[0.5, -0.2, 0.0], [0.1, 0.3, -1.0], [0.0, 0.05, 0.45]], dtype=F64)
    p = sampling_distribution(gains, temperature=0.1)
    assert (p >= 0).all() and float(p.sum()) == pytest.approx(1.0)
    non_positive = gains <= 0
    total = float((torch.softmax(gains.flatten() / 0.1, 0).reshape(3, 3) * ~non_positive).sum() + 9e-8)
    torch.testing.assert_close(p[non_positive], torch.full_like(p[non_positive], 1e-8 / total))
    assert int(torch.argmax(p)) == int(torch.argmax(gains))
    cold = sampling_distribution(gains, temperature=0.01)
    assert cold.max() > p.max()


def test_all_non_positive_gains_give_uniform_pairs():
    p = sampling_distribution(-torch.rand(4, 4))
    torch.testing.assert_close(p, torch.full((4, 4), 1 / 16))


@pytest.mark.parametrize("temperature", [0.0, -0.5])
def test_non_positive_temperature_is_an_error(temperature):
    with pytest.raises(ValueError, match="temperature"):
        sampling_distribution(torch.rand(3, 3), temperature=temperature)


def test_nan_gains_are_an_error():
    with pytest.raises(ValueError, match="NaN"):
        sampling_distribution(torch.tensor([[0.1, float("nan")], [0.0, 0.2]]))


# -- bad input --------------------------------------------------------------------------------


def bad_call(change: str):
    confusion, protos, weight, bias = problem(12)
    obj = get_objective("mean_recall", 6)
    kwargs = {}
    if change == "prototype rows":
        protos = protos[:5]
    elif change == "weight shape":
        weight = weight[:, :4]
    elif change == "bias shape":
        bias = bias[:5]
    elif change == "confusion shape":
        confusion = confusion[:5, :5]
    elif change == "nan features":
        protos = protos.clone()
        protos[1, 2] = float("nan")
    elif change == "inf confusion":
        confusion = confusion.clone()
        confusion[0, 1] = float("inf")
    elif change == "unknown estimator":
        kwargs["estimator"] = "taylor"
    elif change == "exact without features":
        kwargs["estimator"] = "exact"
    elif change == "labels out of range":
        kwargs.update(estimator="exact", features=torch.randn(12, 5, dtype=F64), labels=torch.arange(12) % 7)
    elif change == "class absent":
        kwargs.update(estimator="exact", features=torch.randn(12, 5, dtype=F64), labels=torch.arange(12) % 5)
    gain_matrix(obj, confusion, protos, weight, bias, **kwargs)


@pytest.mark.parametrize(
    "change, message",
    [
        ("prototype rows", "rows"),
        ("weight shape", "weight"),
        ("bias shape", "bias"),
        ("confusion shape", "shape"),
        ("nan features", "NaN"),
        ("inf confusion", "NaN or inf"),
        ("unknown estimator", "selmix, exact"),
        ("exact without features", "features"),
        ("labels out of range", r"outside \[0, 6\)"),
        ("class absent", r"classes \[5\] have no validation sample"),
    ],
)
def test_bad_input_is_a_clear_error(change, message):
    with pytest.raises(ValueError, match=message):
        bad_call(change)


def test_prototypes_need_every_class():
    with pytest.raises(ValueError, match=r"\[2\]"):
        class_prototypes(torch.randn(4, 3), torch.tensor([0, 1, 0, 3]), 4)


def test_equal_norm_prototypes_by_hand():
    """Norms 5 and 1 have mean 3: each row keeps its direction and gets norm 3; a zero row stays zero."""
    protos = torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=F64)
    torch.testing.assert_close(equal_norm_prototypes(protos), torch.tensor([[1.8, 2.4], [0.0, 3.0]], dtype=F64))
    with_zero = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(equal_norm_prototypes(with_zero), torch.tensor([[1.5, 2.0], [0.0, 0.0]], dtype=F64))
    with pytest.raises(ValueError, match="NaN or inf"):
        equal_norm_prototypes(torch.tensor([[float("nan"), 1.0]]))


def test_scale_free_temperature_ignores_the_units_of_the_gains():
    gains = torch.tensor([[0.5, -0.2, 0.0], [0.1, 0.3, -1.0], [0.0, 0.05, 0.45]], dtype=F64)
    relative = sampling_distribution(gains, 0.1, scale_free=True)
    torch.testing.assert_close(sampling_distribution(1000 * gains, 0.1, scale_free=True), relative)
    torch.testing.assert_close(relative, sampling_distribution(gains, 0.1))  # max |G| is already 1 here
    assert sampling_distribution(1000 * gains, 0.1).max() > relative.max()  # in G's units it collapses on one pair
