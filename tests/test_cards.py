"""Model cards: rendered offline from the template, with and without an evaluation, for few and many classes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from tiny import TinyMLPConfig, TinyMLPForClassification, gaussian_problem

from selmix_hf import LongTailConfig, LongTailTrainer, SelMixConfig, SelMixTrainer, classification_report
from selmix_hf.cards import objective_metrics, render_model_card


def report(num_classes: int, seed: int = 0, zero: int | None = None) -> tuple[dict, list[str], list[int]]:
    rng = np.random.default_rng(seed)
    names = [f"class {k}" for k in range(num_classes)]
    counts = sorted(rng.integers(5, 500, num_classes).tolist(), reverse=True)
    labels = np.repeat(np.arange(num_classes), 10)
    predictions = np.where(rng.random(labels.size) < 0.7, labels, rng.integers(0, num_classes, labels.size))
    if zero is not None:
        predictions[labels == zero] = (zero + 1) % num_classes
    return (
        classification_report(labels, predictions, num_classes, class_counts=counts, per_class=True, class_names=names),
        names,
        counts,
    )


def front_matter(card: ModelCard) -> dict:
    text = str(card)
    assert "More information needed" not in text and "[optional]" not in text
    return yaml.safe_load(text.split("---\n")[1])


STAGES = [
    {
        "title": "fine-tuning with the logit-adjusted loss",
        "method": "logit_adjusted",
        "cite": ["logit_adjusted"],
        "settings": {"steps": 300, "learning_rate": 3e-4},
    },
    {
        "title": "SelMix fine-tuning for min_recall",
        "method": "selmix",
        "cite": ["selmix"],
        "objective": "min_recall",
        "settings": {"steps": 150, "gain_estimator": "selmix"},
    },
]


def test_card_with_evaluation_has_model_index_tables_and_citations(no_network):
    after, names, counts = report(6, zero=5)
    before, _, _ = report(6, seed=1)
    card = render_model_card(
        model_name="demo",
        class_names=names,
        class_counts=counts,
        results=after,
        before=before,
        objective="min_recall",
        stages=STAGES,
        base_model="org/base",
        dataset_id="org/data",
        license="mit",
        plot_file="per_class_recall.png",
        repo_id="me/demo",
    )
    meta = front_matter(card)
    assert meta["base_model"] == "org/base" and meta["datasets"] == ["org/data"] and meta["license"] == "mit"
    metrics = {m["type"]: m for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert set(metrics) == {"mean_recall", "min_recall", "h_mean", "g_mean", "min_coverage", "min_head_tail_recall"}
    assert metrics["min_recall"]["value"] == 0.0 and metrics["min_recall"]["config"] == "min_recall"
    assert metrics["h_mean"]["value"] == pytest.approx(after["h_mean"], abs=1e-4) and "config" not in metrics["h_mean"]
    text = str(card)
    assert f"| class 5 | {counts[5]} | {before['recall_class_5']:.3f} | 0.000 |" in text  # every class listed
    assert "![Per-class recall](per_class_recall.png)" in text
    assert f"imbalance ratio {max(counts) / min(counts):.1f}" in text
    assert "ramasubramanian2024selmix" in text and "menon2021longtail" in text and "li2021autobalance" not in text
    assert 'pipeline("text-classification", model="me/demo")' in text
    assert "`steps` = 300" in text and "`gain_estimator` = selmix" in text


def test_card_without_evaluation_leaves_results_out(no_network):
    _, names, counts = report(4)
    card = render_model_card(model_name="no-eval", class_names=names, class_counts=counts, stages=STAGES[:1])
    meta = front_matter(card)
    assert "model-index" not in meta and "base_model" not in meta and "license" not in meta
    text = str(card)
    assert "## Results" not in text and "Per-class recall" not in text
    assert "## Training data" in text and "## How to load" in text


def test_many_classes_get_a_summary_not_a_table(no_network):
    after, names, counts = report(120, zero=7)
    card = render_model_card(
        model_name="many",
        class_names=names,
        class_counts=counts,
        results=after,
        objective="h_mean",
        stages=STAGES,
        task="image-classification",
    )
    text = str(card)
    rows = [line for line in text.splitlines() if line.startswith("| class ") and not line.startswith("| class |")]
    assert len(rows) == 25  # the worst half of the 50-row budget
    assert rows[0].startswith("| class 7 |") and "120 classes: recall quartiles" in text
    recalls = [after[f"recall_class_{k}"] for k in range(120)]
    assert f"{np.quantile(recalls, 0.5):.3f}" in text
    assert 'pipeline("image-classification"' in text
    groups = [line for line in text.splitlines() if line.startswith(("| many-shot", "| medium-shot", "| few-shot"))]
    assert len(groups) == 3  # the 5..500 counts span all three
    many = [k for k in range(120) if counts[k] > 100]
    expected = f"| many-shot | {len(many)} | {min(counts[k] for k in many)}-{max(counts[k] for k in many)} |"
    assert groups[0].startswith(expected)
    assert groups[0].endswith(f" {np.mean([recalls[k] for k in many]):.3f} | {min(recalls[k] for k in many):.3f} |")


def test_many_classes_are_plotted_against_frequency_rank_not_as_bars():
    from selmix_hf.plots import MAX_BARS, per_class_recall_figure

    after, names, counts = report(MAX_BARS + 20)
    recall = [after[f"recall_{n.replace(' ', '_')}"] for n in names]
    fig = per_class_recall_figure(names, recall, [r / 2 for r in recall], counts=counts)
    ax = fig.axes[0]
    assert not ax.patches or all(p.get_width() > 1 for p in ax.patches)  # shaded groups only, no per-class bars
    assert [c.get_offsets().shape[0] for c in ax.collections] == [len(names), len(names)]  # a dot per class, twice
    assert {t.get_text().split(" ")[0] for t in ax.texts} == {"many-shot", "medium-shot", "few-shot"}
    few = per_class_recall_figure(names[:10], recall[:10], counts=counts[:10])
    assert len(few.axes[0].patches) == 10  # few classes: one bar each


def test_card_cites_every_known_key_once_in_order_of_first_appearance(no_network):
    _, names, counts = report(4)
    stages = [
        {"title": "LDAM-DRW", "method": "ldam", "cite": ["ldam", "class_balanced"], "settings": {}},
        {"title": "AutoBalance", "method": "autobalance", "cite": ["autobalance", "ldam", "not_a_key"], "settings": {}},
        {"title": "SelMix", "method": "selmix", "cite": ["selmix"], "settings": {}},
    ]
    text = str(render_model_card(model_name="cited", class_names=names, class_counts=counts, stages=stages))
    keys = ["cao2019ldam", "cui2019classbalanced", "li2021autobalance", "ramasubramanian2024selmix"]
    assert [text.count(key) for key in keys] == [1, 1, 1, 1]
    assert [text.index(key) for key in keys] == sorted(text.index(key) for key in keys)
    assert "menon2021longtail" not in text and "not_a_key" not in text.split("## Citations")[1]


def test_citations_stay_importable_from_the_cards_module():
    from selmix_hf import cards, citations

    assert cards.CITATIONS is citations.CITATIONS


def test_objective_metrics_name_the_constraint():
    assert objective_metrics("mean_recall_min_coverage") == ["mean_recall", "min_coverage"]
    assert objective_metrics("min_recall") == ["min_recall"]
    assert objective_metrics(None) == []
    assert objective_metrics("h_mean_min_head_tail_coverage") == ["h_mean"]
    assert objective_metrics("my_metric") == ["my_metric"]


def test_trainer_card_uses_its_last_evaluation_and_recorded_stages(no_network, tmp_path):
    counts = [60, 20, 8]
    torch.manual_seed(0)
    model = TinyMLPForClassification(TinyMLPConfig(num_labels=3))
    common = dict(
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
        max_steps=10,
        per_device_train_batch_size=8,
        optim="sgd",
        learning_rate=0.1,
    )
    stage1 = LongTailTrainer(
        model=model,
        args=LongTailConfig(output_dir=str(tmp_path / "s1"), **common),
        train_dataset=gaussian_problem(counts, 0),
    )
    stage1.train()
    stage2 = SelMixTrainer(
        model=stage1.model,
        args=SelMixConfig(output_dir=str(tmp_path / "s2"), gain_refresh_steps=5, objective="mean_recall", **common),
        train_dataset=gaussian_problem(counts, 0),
        eval_dataset=gaussian_problem([10, 10, 10], 1),
        compute_metrics=__import__("selmix_hf").make_compute_metrics(3, class_counts=counts),
    )
    stage2.create_model_card()  # before training and evaluation: stage 1 only, no results
    text = open(tmp_path / "s2" / "README.md").read()
    assert "## Results" not in text and "logit-adjusted" in text and "SelMix fine-tuning" not in text
    stage2.train()
    metrics = stage2.evaluate()
    stage2.create_model_card(license="apache-2.0")
    card = ModelCard.load(str(tmp_path / "s2" / "README.md"))
    values = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert values["min_recall"] == pytest.approx(metrics["eval_min_recall"], abs=1e-4)
    # the eval set is the set SelMix estimated its gains on: named so, never as held-out data
    assert card.data.eval_results[0].dataset_split == "validation"
    assert "not a held-out estimate" in card.text and "10 samples per class, 30 in all" in card.text
    assert "SelMix fine-tuning for mean_recall" in card.text and "logit-adjusted" in card.text
    # no tokenizer / processor saved: the card must not promise a pipeline that cannot prepare inputs
    assert "pipeline(" not in card.text and "No tokenizer or image processor was saved" in card.text
    (tmp_path / "s2" / "tokenizer_config.json").write_text("{}")
    assert 'pipeline("text-classification"' in stage2.create_model_card().text
    custom = "model = load_it()\nlogits = model(preprocess(x)).logits"
    assert custom in stage2.create_model_card(how_to_load=custom).text


def test_card_renders_with_the_hub_offline(tmp_path):
    """In a fresh process with HF_HUB_OFFLINE=1 (read by huggingface_hub at import), as users without network run it."""
    code = (
        "from selmix_hf.cards import render_model_card\n"
        "card = render_model_card(model_name='x', class_names=['a', 'b'], class_counts=[9, 3],"
        " results={'min_recall': 0.5, 'mean_recall': 0.6}, objective='min_recall')\n"
        f"card.save({str(tmp_path / 'README.md')!r})\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "min_recall" in (tmp_path / "README.md").read_text()


RENDERED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_cards", "rendered")


@pytest.mark.parametrize("name", sorted(os.listdir(RENDERED)))
def test_committed_benchmark_cards_load_and_mark_their_objective(name):
    """The committed cards of the demo models: valid Hub metadata, objective marked, plot present, no placeholders."""
    path = os.path.join(RENDERED, name, "README.md")
    card = ModelCard.load(path)
    front_matter(card)
    marked = [r for r in card.data.eval_results if r.metric_config]
    assert [r.metric_type for r in marked] == ["min_recall"] and card.data.eval_results[0].dataset_split == "test"
    assert 0 < marked[0].metric_value <= 1
    assert os.path.isfile(os.path.join(RENDERED, name, "per_class_recall.png"))


def test_stage_history_survives_output_folders_that_share_a_basename(no_network, tmp_path):
    """../shared/repro/r5_card_stages.py: stage1/model then stage2/model kept only the second stage."""
    counts = [60, 20, 8]
    common = dict(
        use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, max_steps=4, per_device_train_batch_size=8
    )
    stage1 = LongTailTrainer(
        model=TinyMLPForClassification(TinyMLPConfig(num_labels=3)),
        args=LongTailConfig(output_dir=str(tmp_path / "stage1" / "model"), **common),
        train_dataset=gaussian_problem(counts, 0),
    )
    stage1.train()
    stage1.save_model()
    model = TinyMLPForClassification.from_pretrained(str(tmp_path / "stage1" / "model"), num_labels=3)
    stage2 = SelMixTrainer(
        model=model,
        args=SelMixConfig(output_dir=str(tmp_path / "stage2" / "model"), **common),
        train_dataset=gaussian_problem(counts, 0),
        eval_dataset=gaussian_problem([5, 5, 5], 1),
    )
    stage2.train()
    text = stage2.create_model_card().text
    assert "1. **fine-tuning with the logit-adjusted loss**" in text and "2. **SelMix" in text
    assert str(tmp_path) not in text and 'model"' not in text.split("## How to load")[0]


def test_a_peft_adapter_card_says_so_and_names_its_base_model(no_network, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import BertConfig, BertForSequenceClassification

    base = BertForSequenceClassification(
        BertConfig(
            vocab_size=60,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=3,
        )
    )
    base.config._name_or_path = "org/tiny-bert"
    model = peft.get_peft_model(
        base,
        peft.LoraConfig(
            task_type="SEQ_CLS", r=2, target_modules=["query", "value"], base_model_name_or_path="org/tiny-bert"
        ),
    )
    model.peft_config["default"].base_model_name_or_path = "org/tiny-bert"
    data = [
        {"input_ids": torch.randint(5, 60, (6,)), "attention_mask": torch.ones(6, dtype=torch.long), "labels": k}
        for k in (0, 1, 2)
        for _ in range(4)
    ]
    trainer = LongTailTrainer(
        model=model,
        args=LongTailConfig(
            output_dir=str(tmp_path / "adapter"),
            use_cpu=True,
            report_to=[],
            max_steps=2,
            save_strategy="no",
            per_device_train_batch_size=4,
        ),
        train_dataset=data,
    )
    trainer.train()
    card = trainer.create_model_card(license="mit")
    meta = front_matter(card)
    assert meta["library_name"] == "peft" and meta["base_model"] == "org/tiny-bert" and "peft" in meta["tags"]
    assert "PEFT adapter" in card.text and "AutoPeftModelForSequenceClassification" in card.text
