"""Post-hoc decision rules: the Bayes rule for mean recall, min recall against brute force, the cross-fitting
guard, folding into the head's bias, bad input."""

import json
import math

import pytest
import torch

from selmix_hf import get_objective
from selmix_hf.posthoc import DecisionRule, fit_decision_rule, fold_offsets

K = 4
TRAIN_PRIOR = torch.tensor([0.7, 0.2, 0.07, 0.03])


def gaussian_logits(per_class: int, seed: int, prior: torch.Tensor | None = None, k: int = K):
    """Balanced samples of unit Gaussians and their exact log posteriors under ``prior`` (uniform by default)."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(k, 2, generator=torch.Generator().manual_seed(100)) * 1.5
    labels = torch.arange(k).repeat_interleave(per_class)
    x = means[labels] + torch.randn(len(labels), 2, generator=generator)
    log_prior = torch.zeros(k) if prior is None else torch.log(prior)
    return log_prior - 0.5 * ((x[:, None, :] - means[None]) ** 2).sum(-1), labels


def test_mean_recall_offsets_are_the_bayes_rule_minus_log_prior():
    logits, labels = gaussian_logits(2000, seed=0, prior=TRAIN_PRIOR)  # a model trained under a long-tailed prior
    rule = fit_decision_rule(logits, labels, get_objective("mean_recall", K))
    bayes = -torch.log(TRAIN_PRIOR).double()
    assert rule.kind == "offsets"
    torch.testing.assert_close(rule.offsets - rule.offsets.mean(), bayes - bayes.mean(), atol=0.15, rtol=0)
    assert rule.estimates["cross_fitted"] > rule.estimates["without_rule"] + 0.05


def test_min_recall_offsets_are_within_a_point_of_the_best_offsets_by_brute_force():
    logits, labels = gaussian_logits(100, seed=1, prior=TRAIN_PRIOR[:3] / TRAIN_PRIOR[:3].sum(), k=3)
    objective = get_objective("min_recall", 3)
    grid = torch.linspace(-4, 4, 81)
    best = 0.0
    for b1 in grid:
        shifted = (
            logits.unsqueeze(0) + torch.stack([torch.zeros_like(grid), torch.full_like(grid, b1), grid], 1)[:, None]
        )
        predictions = shifted.argmax(-1)  # (81, N): b2 varies along the first axis
        recalls = torch.stack([(predictions[:, labels == c] == c).float().mean(1) for c in range(3)], 1)
        best = max(best, float(recalls.min(1).values.max()))
    rule = fit_decision_rule(logits, labels, objective)
    assert rule.kind == "offsets" and rule.estimates["in_sample"] >= best - 0.01
    assert rule.estimates["without_rule"] < best - 0.2  # the offsets matter here


def tied_zero_logits(seed: int, k: int = 20, per_class: int = 10):
    """Confident logits of a K-class model whose classes 0 and 1 are never predicted (their logits pushed down by
    40): min recall sits on a plateau at 0 that only moving both offsets leaves."""
    means = torch.randn(k, 8, generator=torch.Generator().manual_seed(7)) * 1.2
    labels = torch.arange(k).repeat_interleave(per_class)
    x = means[labels] + torch.randn(len(labels), 8, generator=torch.Generator().manual_seed(seed))
    push = torch.zeros(k)
    push[:2] = -40.0
    return (-1.5 * ((x[:, None] - means[None]) ** 2).sum(-1) + push).double(), labels


@pytest.mark.parametrize("seed", range(6))
def test_the_search_leaves_a_plateau_of_two_classes_at_zero_without_sinking_others(seed):
    # The coordinate search from zero offsets must lift both never-predicted classes at least as far as the offsets
    # that undo the push do; ordering ties by multipliers frozen at the start lifted one class at any cost to others
    from selmix_hf.posthoc import _polish, _Split

    logits, labels = tied_zero_logits(seed)
    split = _Split(logits, labels, get_objective("min_recall", 20))
    zero = torch.zeros(20, dtype=torch.float64)
    split.objective.update(split.confusion(split.predict(zero)))
    undo = zero.clone()
    undo[:2] = 40.0
    assert split.score(split.predict(zero)) == 0.0
    polished = _polish(split, zero)
    assert polished.score >= split.score(split.predict(undo)) - 1e-9
    assert polished.score == split.score(split.predict(polished.offsets))  # the score it reports is the rule's


def test_min_recall_orders_ties_by_a_soft_minimum_of_the_recalls():
    objective = get_objective("min_recall", 3)
    prior = torch.full((3,), 1 / 3, dtype=torch.float64)

    def confusion(recalls):
        r = torch.tensor(recalls, dtype=torch.float64)
        return (torch.diag(r) + torch.diag(1 - r).roll(1, dims=1)) * prior[:, None]  # class i's misses go to i + 1

    objective.update(confusion([0.0, 0.0, 1.0]))  # multipliers now on the two tied classes
    two_at_zero, one_at_zero = confusion([0.0, 0.0, 1.0]), confusion([0.5, 0.0, 1.0])
    sunk = confusion([0.5, 0.0, 0.0])  # class 0 lifted by sinking class 2 to zero: still two classes there
    assert objective.tie_score(one_at_zero) > objective.tie_score(two_at_zero) > objective.tie_score(sunk)
    expected = -math.log(1 + math.exp(-25) + math.exp(-50)) / 50  # -logsumexp(-50 r) / 50 at r = (0.5, 0, 1)
    assert objective.tie_score(one_at_zero) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("kind", ["offsets", "gain_matrix"])
@pytest.mark.parametrize("name", ["h_mean", "mean_recall_min_coverage", "min_head_tail_recall"])
def test_every_kind_of_objective_gets_a_rule_that_helps_on_held_out_folds(name, kind):
    logits, labels = gaussian_logits(500, seed=2, prior=TRAIN_PRIOR)
    options = {"class_counts": [700, 200, 70, 30]} if name == "min_head_tail_recall" else {}
    rule = fit_decision_rule(logits, labels, get_objective(name, K, **options), kind=kind)
    assert rule.kind == kind
    assert rule.estimates["cross_fitted"] > rule.estimates["without_rule"]


@pytest.mark.parametrize("seed", range(2, 10))
def test_a_rule_that_only_fits_a_small_split_is_declined(seed):
    """A calibrated model and 10 validation samples per class: offsets look better in sample (and sometimes on the
    held-out folds, by luck), but they would lower min recall on fresh data; the guard keeps the model as it is."""
    logits, labels = gaussian_logits(10, seed=seed)
    objective = get_objective("min_recall", K)
    rule = fit_decision_rule(logits, labels, objective)
    assert rule.kind == "none" and torch.equal(rule.predict(logits), logits.argmax(1))
    assert rule.estimates["in_sample"] > rule.estimates["without_rule"]  # what a naive fit would have kept


def test_the_guard_never_costs_more_than_noise_on_fresh_data():
    """Across small validation draws, the returned rule's min recall on a large fresh sample is never below the
    plain argmax's by more than 0.02 (the rules the guard keeps, if any, are real gains)."""
    test_logits, test_labels = gaussian_logits(3000, seed=99, prior=TRAIN_PRIOR)
    objective = get_objective("min_recall", K)

    def min_recall(predictions):
        return min(float((predictions[test_labels == c] == c).float().mean()) for c in range(K))

    plain = min_recall(test_logits.argmax(1))
    kept = 0
    for seed in range(10, 16):
        logits, labels = gaussian_logits(25, seed=seed, prior=TRAIN_PRIOR)
        rule = fit_decision_rule(logits, labels, objective)
        kept += rule.kind == "offsets"
        assert min_recall(rule.predict(test_logits)) >= plain - 0.02
    assert kept >= 3  # the long-tailed model's min recall is worth fixing: most draws keep the rule


def test_a_coverage_constraint_is_met_before_the_base_objective_counts():
    """Rules are scored feasibility first: the fitted offsets meet every coverage target on the held-out folds,
    which argmax of a long-tailed model does not."""
    logits, labels = gaussian_logits(300, seed=6, prior=TRAIN_PRIOR)
    objective = get_objective("mean_recall_min_coverage", K, alpha=0.9)
    rule = fit_decision_rule(logits, labels, objective)
    assert rule.estimates["without_rule"] < 0 <= rule.estimates["cross_fitted"]  # negative = short of a target
    predictions = rule.predict(logits)
    coverage = torch.bincount(predictions, minlength=K).double() / len(labels)
    assert bool((coverage >= 0.9 / K).all())
    assert objective.rule_score(torch.eye(K, dtype=torch.float64) / K) == 1.0  # feasible: the plain mean recall


def test_folded_offsets_make_the_saved_model_predict_the_rule(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=40,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=3,
        )
    ).eval()
    inputs = {"input_ids": torch.randint(5, 40, (50, 6))}
    with torch.no_grad():
        logits = model(**inputs).logits
    offsets = torch.tensor([0.0, 0.02, -0.03])
    expected = (logits + offsets).argmax(1)
    fold_offsets(model, offsets)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        reloaded = BertForSequenceClassification.from_pretrained(tmp_path).eval()(**inputs).logits.argmax(1)
    assert torch.equal(reloaded, expected) and not torch.equal(expected, logits.argmax(1))


def test_a_rule_round_trips_through_json_and_refuses_non_finite_values():
    logits, labels = gaussian_logits(200, seed=4, prior=TRAIN_PRIOR)
    rule = fit_decision_rule(logits, labels, get_objective("h_mean", K), kind="gain_matrix")
    back = DecisionRule.from_dict(json.loads(json.dumps(rule.to_dict())))
    assert torch.equal(back.predict(logits), rule.predict(logits)) and back.estimates == rule.estimates
    values = rule.to_dict()
    values["offsets"][0] = float("nan")
    with pytest.raises(ValueError, match="offsets holds NaN or inf"):
        DecisionRule.from_dict(values)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"kind": "bias"}, "unknown rule kind 'bias'"),
        ({"confidence": 1.5}, "need 0 <= confidence <= 1"),
        ({"folds": 1}, "folds >= 2"),
        ({"folds": 50}, "at least 50 validation samples of every class"),
        ({"logits": "nan"}, "hold NaN or inf"),
        ({"logits": "shape"}, "logits must be N x 4"),
        ({"labels": "missing class"}, r"classes \[2\] have no validation sample"),
    ],
)
def test_bad_input_is_a_clear_error(change, message):
    logits, labels = gaussian_logits(20, seed=5)
    if change.get("logits") == "nan":
        logits[3, 1] = float("nan")
    elif change.get("logits") == "shape":
        logits = logits[:, :3]
    elif change.get("labels"):
        logits, labels = logits[labels != 2], labels[labels != 2]
    options = {k: v for k, v in change.items() if k not in ("logits", "labels")}
    with pytest.raises(ValueError, match=message):
        fit_decision_rule(logits, labels, get_objective("min_recall", K), **options)


# -- the command line: any saved classifier ----------------------------------------------------------------------
def biased_text_classifier(folder):
    """A tiny BERT whose bias makes it predict class 0 for almost everything, and a validation CSV of its words."""
    import csv
    import os
    import sys

    from transformers import BertForSequenceClassification

    sys.path.insert(0, os.path.dirname(__file__))
    from miniatures import WORDS, tiny_bert

    tiny_bert(str(folder / "model"), num_labels=3)
    generator = torch.Generator().manual_seed(0)
    words = sum(WORDS, [])
    rows = []
    for label in range(3):
        part = words[label * len(words) // 3 : (label + 1) * len(words) // 3]  # each class leans on its own words
        for _ in range(40):
            picks = torch.randint(len(words), (5,), generator=generator).tolist()
            own = torch.randint(len(part), (2,), generator=generator).tolist()
            rows.append((" ".join([*(words[i] for i in picks), *(part[i] for i in own)]), label))
    with open(folder / "validation.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows((text, ["a", "b", "c"][label]) for text, label in rows)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    model = BertForSequenceClassification.from_pretrained(folder / "model")
    inputs = tokenizer([text for text, _ in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([label for _, label in rows])
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):  # a few steps: informative logits, far from perfect
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(**inputs).logits, labels).backward()
        optimiser.step()
    with torch.no_grad():
        model.classifier.bias.add_(torch.tensor([3.0, 0.0, -1.0]))  # a long-tailed model's bias toward class 0
    model.config.label2id, model.config.id2label = {"a": 0, "b": 1, "c": 2}, {0: "a", 1: "b", 2: "c"}
    model.save_pretrained(folder / "model")
    return folder / "model", folder / "validation.csv"


def cli_args(model, validation, out, *extra):
    return [
        "--model",
        str(model),
        "--validation",
        str(validation),
        "--text_column",
        "text",
        "--output",
        str(out),
        *extra,
    ]


def test_the_command_line_fits_folds_and_saves_a_model_stock_transformers_loads(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from selmix_hf.posthoc.cli import main

    model_dir, validation = biased_text_classifier(tmp_path)
    out = tmp_path / "out"
    result = main(cli_args(model_dir, validation, out, "--objective", "min_recall", "--confidence", "0.5"))
    rule = result["rule"]
    assert rule.kind == "offsets" and result["after"]["min_recall"] > result["before"]["min_recall"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = [row.split(",")[0] for row in open(validation).read().splitlines()[1:]]
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        original = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()(**inputs).logits
        folded = AutoModelForSequenceClassification.from_pretrained(out).eval()(**inputs).logits
    assert torch.equal(folded.argmax(1), (original.double() + rule.offsets).argmax(1))
    card = open(out / "README.md").read()
    assert "post-hoc per-class offsets for min_recall" in card and "| min_recall |" in card
    saved = json.load(open(out / "posthoc_rule.json"))
    assert (
        saved["rule"]["kind"] == "offsets" and saved["validation_after"]["min_recall"] == result["after"]["min_recall"]
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--objective", "min_head_tail_recall"], "needs the head/tail split: pass class_counts"),
        (["--objective", "min_recall", "--label_column", "topic"], "has no column 'topic'"),
        (["--objective", "min_recall", "--objective_options", '{"omega": "x"}'], "omega"),
        (["--objective", "min_recall", "--folds", "50"], "at least 50 validation samples of every class"),
    ],
)
def test_the_command_line_names_bad_input(extra, message, tmp_path, capsys):
    from selmix_hf.posthoc.cli import main

    model_dir, validation = biased_text_classifier(tmp_path)
    with pytest.raises(SystemExit, match=message):
        main(cli_args(model_dir, validation, tmp_path / "out", *extra))


def test_the_command_line_names_labels_the_model_does_not_know(tmp_path):
    from selmix_hf.posthoc.cli import main

    model_dir, validation = biased_text_classifier(tmp_path)
    lines = open(validation).read().splitlines()
    open(validation, "w").write("\n".join([lines[0], lines[1].rsplit(",", 1)[0] + ",zebra", *lines[2:]]))
    with pytest.raises(SystemExit, match="row 0: label 'zebra' is neither a class id nor one of the model's class"):
        main(cli_args(model_dir, validation, tmp_path / "out", "--objective", "min_recall"))
