"""Model cards: the non-decomposable metrics, per-class recall, data profile and both stages' settings, offline."""

from __future__ import annotations

import os
import re
from importlib import resources
from typing import Any, Sequence

import numpy as np
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from . import _compat
from .citations import CITATIONS
from .features import unwrap
from .metrics import shot_groups
from .objectives import optimised_metrics
from .posthoc import RULE_ATTRIBUTE

MAX_CLASS_TABLE = 50  # beyond this many classes the card lists the worst ones and quartiles instead of every class
STAGES_ATTRIBUTE = "selmix_hf_stages"  # config.json attribute: the training stages the weights went through
BASE_MODEL_ATTRIBUTE = "selmix_hf_base_model"  # config.json attribute: the checkpoint the first stage started from

METRIC_LABELS = {
    "mean_recall": "Mean recall",
    "min_recall": "Min recall",
    "h_mean": "H-mean of recalls",
    "g_mean": "G-mean of recalls",
    "min_coverage": "Min coverage",
    "min_head_tail_recall": "Min of head and tail recall",
    "head_recall": "Head recall",
    "tail_recall": "Tail recall",
    "many_shot_recall": "Many-shot recall",
    "medium_shot_recall": "Medium-shot recall",
    "few_shot_recall": "Few-shot recall",
    "accuracy": "Accuracy",
    # with a group column (docs/groups.md)
    "worst_group_accuracy": "Worst-group accuracy",
    "group_balanced_accuracy": "Group-balanced accuracy",
    "equal_opportunity_gap": "Equal-opportunity gap (lower is better)",
}
INDEX_METRICS = (
    "mean_recall",
    "min_recall",
    "h_mean",
    "g_mean",
    "min_coverage",
    "min_head_tail_recall",
    "worst_group_accuracy",
    "group_balanced_accuracy",
)


def objective_metrics(objective: str | None) -> list[str]:
    """The report keys an objective is about: its metric, and the coverage it constrains if any."""
    return optimised_metrics(objective)


def template_path() -> str:
    """The Jinja template the trainers render (model_cards/model_card.md in the repository)."""
    return str(resources.files("selmix_hf.model_cards").joinpath("model_card.md"))


def _fmt(value: Any) -> str:
    return "" if value is None else f"{float(value):.3f}"


def _settings_text(settings: dict[str, Any]) -> str:
    return "; ".join(f"`{key}` = {value}" for key, value in settings.items() if value not in (None, {}, []))


def _counts_text(counts: Sequence[int] | None) -> str:
    """', 20 samples per class' or ', 5-40 samples per class, 120 in all' for the evaluation split."""
    if not counts:
        return ""
    low, high = min(counts), max(counts)
    per_class = f"{low}" if low == high else f"{low}-{high}"
    return f", {per_class} samples per class, {sum(counts)} in all"


def _per_class(
    names: list[str],
    counts: Sequence[int] | None,
    after: dict,
    before: dict | None,
    limit: int,
    eval_counts: Sequence[int] | None = None,
) -> dict | None:
    """Rows of the per-class recall table: every class up to `limit`, else the worst `limit // 2` and quartiles."""
    keys = [f"recall_{name.replace(' ', '_')}" for name in names]
    if not all(key in after for key in keys):
        return None
    recall = np.array([after[key] for key in keys])
    rows = [
        {
            "name": name,
            "count": "" if counts is None else int(counts[k]),
            "recall": _fmt(recall[k]),
            "before": _fmt(before.get(keys[k])) if before else "",
            "eval_count": "" if eval_counts is None else int(eval_counts[k]),
        }
        for k, name in enumerate(names)
    ]
    if len(names) <= limit:
        return {"full": True, "rows": rows}
    worst = np.argsort(recall, kind="stable")[: limit // 2]
    quartiles = ", ".join(f"{q:.3f}" for q in np.quantile(recall, [0.25, 0.5, 0.75]))
    previous = np.array([before[key] for key in keys]) if before and all(key in before for key in keys) else None
    return {
        "full": False,
        "rows": [rows[k] for k in worst],
        "num_classes": len(names),
        "quartiles": quartiles,
        "zero": int((recall == 0).sum()),
        "groups": _frequency_groups(counts, recall, previous),
    }


def _frequency_groups(counts: Sequence[int] | None, recall: np.ndarray, before: np.ndarray | None) -> list[dict]:
    """Per many / medium / few-shot group: its classes, their training samples, mean and lowest recall."""
    if counts is None:
        return []
    groups = []
    for name, members in shot_groups(counts).items():
        if members:
            sizes = [int(counts[k]) for k in members]
            groups.append(
                {
                    "name": f"{name}-shot",
                    "classes": len(members),
                    "samples": f"{min(sizes)}-{max(sizes)}" if min(sizes) != max(sizes) else str(sizes[0]),
                    "mean": _fmt(recall[members].mean()),
                    "before": "" if before is None else _fmt(before[members].mean()),
                    "lowest": _fmt(recall[members].min()),
                }
            )
    return groups


def _data_profile(names: list[str], counts: Sequence[int] | None, dataset_name: str | None) -> dict | None:
    if counts is None or len(counts) == 0:
        return None
    counts = [int(c) for c in counts]
    big, small = int(np.argmax(counts)), int(np.argmin(counts))
    groups = shot_groups(counts)
    return {
        "description": f"{dataset_name}: " if dataset_name else "",
        "num_classes": len(counts),
        "total": sum(counts),
        "largest": names[big],
        "max_count": counts[big],
        "smallest": names[small],
        "min_count": counts[small],
        "ratio": "undefined (a class has no sample)" if counts[small] == 0 else f"{counts[big] / counts[small]:.1f}",
        "shots": " / ".join(str(len(groups[g])) for g in ("many", "medium", "few")),
    }


PROCESSOR_FILES = ("tokenizer_config.json", "preprocessor_config.json", "processor_config.json")


def _how_to_load(repo_id: str, task: str, processor_saved: bool = True, adapter_of: str | None = None) -> str:
    """Loading code; a pipeline only when a tokenizer / image processor is saved beside the weights."""
    text = task == "text-classification"
    if adapter_of:
        auto = "AutoPeftModelForSequenceClassification" if text else "AutoPeftModel"
        return (
            f"from peft import {auto}\n\n# downloads the base model {adapter_of} and applies the adapter\n"
            f'model = {auto}.from_pretrained("{repo_id}")'
        )
    auto = "AutoModelForSequenceClassification" if text else "AutoModelForImageClassification"
    if not processor_saved:
        inputs = "input_ids=..., attention_mask=..." if text else "pixel_values=..."
        return (
            f'from transformers import {auto}\n\nmodel = {auto}.from_pretrained("{repo_id}")\n'
            "# No tokenizer or image processor was saved with this model: prepare the inputs as in training.\n"
            f"logits = model({inputs}).logits"
        )
    example = '"an example sentence"' if text else '"path/to/image.jpg"'
    return (
        f'from transformers import pipeline\n\nclassifier = pipeline("{task}", model="{repo_id}")\n'
        f'print(classifier({example}))\n\n# or: transformers.{auto}.from_pretrained("{repo_id}")'
    )


def _intended_use(objective: str | None, split: str, task: str) -> str:
    kind = "texts" if task == "text-classification" else "images"
    aim = (
        f"It was fine-tuned for the objective `{objective}`, a metric over the whole confusion matrix: it trades "
        "accuracy on frequent classes for that objective, so expect lower head-class recall than a model trained "
        "for accuracy. "
        if objective
        else ""
    )
    return (
        f"A classifier of {kind} into the classes of its training data (see the label names in `config.json`). "
        f"{aim}The reported metrics are measured on the `{split}` split under a uniform class prior; on data "
        "whose classes or class frequencies differ, measure again before relying on them. Classes with few "
        "training samples have noisy recall estimates."
    )


def render_model_card(
    *,
    model_name: str,
    class_names: Sequence[str],
    class_counts: Sequence[int] | None = None,
    results: dict[str, float] | None = None,
    before: dict[str, float] | None = None,
    eval_split: str = "test",
    objective: str | None = None,
    stages: Sequence[dict[str, Any]] = (),
    task: str = "text-classification",
    base_model: str | None = None,
    dataset_name: str | None = None,
    dataset_id: str | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    tags: Sequence[str] = (),
    plot_file: str | None = None,
    versions: str | None = None,
    max_class_table: int = MAX_CLASS_TABLE,
    how_to_load: str | None = None,
    processor_saved: bool = True,
    eval_counts: Sequence[int] | None = None,
    eval_note: str | None = None,
    adapter_of: str | None = None,
) -> ModelCard:
    """A `ModelCard` with model-index entries for the non-decomposable metrics; no network, unknown parts left out.

    ``eval_split`` names the split the results come from and ``eval_counts`` gives its samples per class;
    ``eval_note`` qualifies it (e.g. it is the set the method tuned on); ``adapter_of`` marks a PEFT adapter.
    """
    names = [str(n) for n in class_names]
    if class_counts is not None and len(class_counts) != len(names):
        raise ValueError(f"class_counts has {len(class_counts)} entries for {len(names)} classes")
    optimised = objective_metrics(objective)
    rows, eval_results = [], []
    dataset_label = dataset_name or dataset_id or "the data the model was trained for"
    for key, label in METRIC_LABELS.items():
        if results and results.get(key) is not None:
            rows.append(
                {
                    "label": label,
                    "value": _fmt(results[key]),
                    "before": _fmt((before or {}).get(key)),
                    "optimised": key in optimised,
                }
            )
            if key in INDEX_METRICS:
                eval_results.append(
                    EvalResult(
                        task_type=task,
                        dataset_type=dataset_id or "custom",
                        dataset_name=dataset_label,
                        dataset_split=eval_split,
                        metric_type=key,
                        metric_value=round(float(results[key]), 4),
                        metric_name=label + (" (optimised objective)" if key in optimised else ""),
                        metric_config=objective if key in optimised else None,
                    )
                )
    method_tags = {stage.get("method") for stage in stages}
    card_data = ModelCardData(
        model_name=model_name,
        library_name="peft" if adapter_of else "transformers",
        license=license,
        language=language,
        base_model=base_model,
        datasets=[dataset_id] if dataset_id else None,
        pipeline_tag=task,
        tags=list(
            dict.fromkeys(
                [
                    *tags,
                    "selmix-hf",
                    "long-tail",
                    "non-decomposable-metrics",
                    *sorted(t for t in method_tags if t),
                    *(["peft"] if adapter_of else []),
                    *(t for stage in stages for t in stage.get("tags") or []),
                ]
            )
        ),
        eval_results=eval_results or None,
        metrics=["recall"] if eval_results else None,
        selmix_objective=objective,
    )
    what = f"fine-tuned from [{base_model}](https://huggingface.co/{base_model})" if base_model else "fine-tuned"
    steps = " then ".join(stage["title"] for stage in stages)
    kind = task.replace("-", " ")
    summary = (
        f"{'An' if kind[0] in 'aeiou' else 'A'} {kind} model {what}"
        + (f" on {dataset_name}" if dataset_name else "")
        + (f" with selmix-hf: {steps}." if steps else ".")
    )
    if objective:
        summary += f" Optimised for **{METRIC_LABELS.get(objective, objective)}** (`{objective}`)."
    if adapter_of:
        summary += (
            f" This repository holds a PEFT adapter (and the trained classification head) for `{adapter_of}`, "
            "not full model weights: load it on top of that base model."
        )
    cited = dict.fromkeys(key for stage in stages for key in (stage.get("cite") or []) if key in CITATIONS)
    citations = [CITATIONS[key] for key in cited]
    return ModelCard.from_template(
        card_data,
        template_path=template_path(),
        model_name=model_name,
        summary=summary,
        results=rows,
        results_caption=(
            f"On the `{eval_split}` split ({dataset_label}{_counts_text(eval_counts)})"
            f"{'; ' + eval_note if eval_note else ''}. Recall-based metrics under a uniform class prior, "
            "coverage = the share of predictions per class."
        ),
        has_before=bool(before) and bool(results),
        before_label=(stages[-2]["title"] if len(stages) > 1 else "start"),
        after_label="this model",
        per_class=_per_class(names, class_counts, results, before, max_class_table, eval_counts) if results else None,
        has_eval_counts=eval_counts is not None,
        plot_file=plot_file,
        data=_data_profile(names, class_counts, dataset_name),
        stages=[
            {"title": s["title"], "description": s.get("description"), "settings": _settings_text(s["settings"])}
            for s in stages
        ],
        versions=versions,
        intended_use=_intended_use(objective, eval_split, task),
        how_to_load=how_to_load or _how_to_load(repo_id or model_name, task, processor_saved, adapter_of),
        citations=citations,
    )


def task_of(model: Any) -> str:
    """text-classification or image-classification, from the model class (what the card and the pipeline need)."""
    name = type(model).__name__
    return "image-classification" if "Image" in name or "Timm" in name else "text-classification"


def looks_like_hub_id(name: str | None) -> bool:
    """True for 'org/name' or 'name' ids that are not local paths (only those may be linked as base_model)."""
    return bool(name) and not os.path.exists(name) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None


def add_posthoc_stage(config: Any, rule: Any, objective: str, samples: int, settings: dict, run: str) -> dict:
    """Append a post-hoc rule to the stages in ``config``: what was fitted, on what, how it was judged, and what
    predictions must do to apply it; ``settings`` holds the folds and the confidence it was judged with."""
    stages = list(getattr(config, STAGES_ATTRIBUTE, None) or [])
    e = rule.estimates
    judged = (
        f"cross-fitted {objective} {e['cross_fitted']:.3f} against {e['without_rule']:.3f} without it "
        f"({settings.get('posthoc_folds', 5)} folds of {samples} validation samples), ahead in {e['win_rate']:.0%} of "
        f"bootstrap resamples ({settings.get('posthoc_confidence', 0.9):.0%} required)"
    )
    if rule.kind == "none":
        title = f"post-hoc decision rule for {objective}: declined"
        description = f"the fitted rule was not kept ({judged}), so the weights are unchanged"
    elif rule.kind == "offsets":
        title = f"post-hoc per-class offsets for {objective}"
        description = (
            f"plug-in offsets folded into the classifier's bias, so the saved model's argmax applies them; {judged}"
        )
    else:
        title = f"post-hoc gain-matrix rule for {objective}"
        description = (
            f"argmax_j sum_i G_ij p_i(x), stored in config.json as `{RULE_ATTRIBUTE}`: predictions must apply it "
            f"(`selmix_hf.posthoc.predict_with_rule`), a plain argmax of the logits does not; {judged}"
        )
    stage = {
        "title": title,
        "method": "posthoc",
        "cite": ["plug_in"],
        "tags": ["posthoc-decision-rule"],
        "objective": objective if rule.kind != "none" else (stages[-1].get("objective") if stages else None),
        "description": description,
        "settings": settings,
        "run": run,
    }
    setattr(config, STAGES_ATTRIBUTE, [s for s in stages if s.get("run") != run] + [stage])
    return stage


class ModelCardMixin:
    """Trainer side of the cards: records each training stage in the model's config and renders the card offline.

    The trainer provides ``card_stage()``, ``run_id``, ``num_labels``, ``class_counts``, ``saved_step()``,
    ``best_checkpoint_step()``, ``evaluated_split()``, ``posthoc_rule`` and ``posthoc_metrics`` (see `BaseTrainer`).
    """

    def remember_base_model(self) -> None:
        """Record the checkpoint the first stage started from in ``model.config`` (a Hub id only, never a path)."""
        config = getattr(_compat.base_model_of(unwrap(self.model)), "config", None)
        if config is not None and getattr(config, BASE_MODEL_ATTRIBUTE, None) is None:
            name = getattr(config, "_name_or_path", None)
            setattr(config, BASE_MODEL_ATTRIBUTE, name if looks_like_hub_id(name) else None)

    def record_stage(self) -> None:
        """Write this finished run into ``model.config`` as a stage (saved with the weights, read by later cards)."""
        config = getattr(_compat.base_model_of(unwrap(self.model)), "config", None)
        if config is not None:
            stage = self.card_stage()  # names the run by a random id: no local path is published
            stages = [s for s in (getattr(config, STAGES_ATTRIBUTE, None) or []) if s.get("run") != stage["run"]]
            setattr(config, STAGES_ATTRIBUTE, stages + [stage])

    def record_posthoc_stage(self, rule: Any, objective: Any, samples: int) -> None:
        """Write the post-hoc rule into ``model.config`` as a stage: what was fitted, on what, and how it was judged."""
        config = getattr(_compat.base_model_of(unwrap(self.model)), "config", None)
        if config is not None:
            settings = {**self.args.posthoc_settings(), "posthoc": rule.kind if rule.kind != "none" else "declined"}
            add_posthoc_stage(config, rule, objective.name, samples, settings, f"{self.run_id}-posthoc")

    def _processor_saved(self, model: Any) -> bool:
        """Whether a pipeline can prepare inputs: a processing class, processor files or timm's pretrained_cfg."""
        if self.processing_class is not None or getattr(model.config, "pretrained_cfg", None):
            return True
        return any(os.path.exists(os.path.join(self.args.output_dir, name)) for name in PROCESSOR_FILES)

    def create_model_card(
        self,
        language: str | list[str] | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        *,
        results: dict[str, float] | None = None,
        before: dict[str, float] | None = None,
        eval_split: str | None = None,
        eval_counts: Sequence[int] | None = None,
        plot_file: str | None = None,
        dataset_name: str | None = None,
        max_class_table: int = MAX_CLASS_TABLE,
        how_to_load: str | None = None,
    ) -> ModelCard | None:
        """Write ``README.md`` into ``output_dir`` from the selmix-hf template; `Trainer.push_to_hub` calls this.

        ``results`` (a `classification_report`, ideally with ``per_class=True``) measured on ``eval_split`` (default
        "test"; ``eval_counts``: its samples per class) and ``before`` (the starting model's) give the metric tables.
        Without them the evaluation of the saved weights in the log history is used (the best checkpoint's after
        ``load_best_model_at_end``, else the last), named by what the eval set is; without an evaluation the card
        has no results section. ``how_to_load`` replaces the loading code (e.g. to show a custom preprocessing).
        Nothing is fetched from the Hub.
        """
        if not self.is_world_process_zero():
            return None
        wrapper = unwrap(self.model)
        model = _compat.base_model_of(wrapper)
        config = model.config
        eval_note = None
        if results is None:
            results = self.posthoc_metrics or _evaluation_of(self.state.log_history, self.best_checkpoint_step())
            logged_split, logged_counts, eval_note = self.evaluated_split()
            eval_split, eval_counts = eval_split or logged_split, eval_counts or logged_counts

        task = (tasks[0] if isinstance(tasks, list) else tasks) or task_of(model)
        id2label = getattr(config, "id2label", None) or {}
        names = [str(id2label.get(k, id2label.get(str(k), k))) for k in range(self.num_labels)]
        stages = list(getattr(config, STAGES_ATTRIBUTE, None) or [])
        if not any(s.get("run") == self.run_id for s in stages) and self.state.global_step > 0:
            stages.append(self.card_stage())  # trained here but the stage was not recorded (train() not used)
        objective = stages[-1].get("objective") if stages else None
        if self.posthoc_rule is not None and self.posthoc_rule.kind != "none":  # say which rule the numbers used
            how = (
                "the gain-matrix rule of config.json applied"
                if getattr(config, RULE_ATTRIBUTE, None)
                else "the post-hoc offsets in the saved weights"
            )
            eval_note = "; ".join(x for x in (eval_note, f"predictions with {how}") if x)
        adapter_of = None
        if _compat.is_peft_model(wrapper):  # a local base model path is never published: name it generically
            base_name = _compat.peft_base_model_name(wrapper)
            adapter_of = base_name if looks_like_hub_id(base_name) else "its base model"
        base_model = finetuned_from or adapter_of or getattr(config, BASE_MODEL_ATTRIBUTE, None)
        repo_id = self.args.hub_model_id or getattr(self, "hub_model_id", None)
        dataset_id = dataset[0] if isinstance(dataset, list) else dataset
        run_name = os.path.basename(os.path.abspath(self.args.output_dir))
        card = render_model_card(
            model_name=model_name or (repo_id or run_name).split("/")[-1],
            class_names=names,
            class_counts=getattr(self, "class_counts", None),
            results=results,
            before=before,
            eval_split=eval_split or "test",
            eval_counts=eval_counts,
            objective=objective,
            stages=stages,
            task=task,
            base_model=base_model if base_model and looks_like_hub_id(base_model) else None,
            dataset_name=dataset_name or dataset_id,
            dataset_id=dataset_id if looks_like_hub_id(dataset_id) else None,
            repo_id=repo_id or run_name,
            license=license,
            language=language,
            tags=[tags] if isinstance(tags, str) else tags or (),
            plot_file=plot_file,
            versions=_versions(),
            max_class_table=max_class_table,
            how_to_load=how_to_load,
            processor_saved=self._processor_saved(model),
            adapter_of=adapter_of,
            eval_note=eval_note,
        )
        os.makedirs(self.args.output_dir, exist_ok=True)
        card.save(os.path.join(self.args.output_dir, "README.md"))
        return card


def _evaluation_of(log_history: list[dict[str, Any]], step: int | None) -> dict[str, float] | None:
    """The metrics of the evaluation at ``step`` (the saved weights'), or of the last one when step is None."""
    if step is not None:
        for entry in log_history:
            if entry.get("step") == step:
                metrics = {k[len("eval_") :]: v for k, v in entry.items() if k.startswith("eval_")}
                if any(key in metrics for key in METRIC_LABELS):
                    return metrics
    return _last_evaluation(log_history)


def _last_evaluation(log_history: list[dict[str, Any]]) -> dict[str, float] | None:
    """The metrics of the last `evaluate()` in the log history, without their ``eval_`` prefix."""
    for entry in reversed(log_history):
        metrics = {k[len("eval_") :]: v for k, v in entry.items() if k.startswith("eval_")}
        if any(key in metrics for key in METRIC_LABELS):
            return metrics
    return None


def library_versions() -> dict[str, str]:
    """The versions of selmix-hf, transformers and torch, for cards and benchmark records to say what produced them."""
    import torch
    import transformers

    from . import __version__

    return {"selmix_hf": __version__, "transformers": transformers.__version__, "torch": torch.__version__}


def _versions() -> str:
    v = library_versions()
    return f"selmix-hf {v['selmix_hf']}, transformers {v['transformers']}, torch {v['torch']}"


__all__ = [
    "ModelCardMixin",
    "render_model_card",
    "library_versions",
    "objective_metrics",
    "CITATIONS",
    "METRIC_LABELS",
    "task_of",
    "template_path",
]
