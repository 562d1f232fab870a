"""``python -m selmix_hf.posthoc``: fit a post-hoc decision rule for an objective on any saved Hugging Face classifier.

    python -m selmix_hf.posthoc --model DIR --validation val.csv --text_column text --objective min_recall --output OUT

The model's logits on the validation data are computed once; the rule (per-class offsets by default) is fitted with
the cross-fitting guard of `fit_decision_rule`, then folded into the classifier bias (offsets) or stored in
``config.json`` (a gain matrix), and the model, its processor, the rule (``posthoc_rule.json``) and its card are
written to ``--output``. The model and data are read by path or Hub id; nothing else is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any

import numpy as np
import torch

from ..cards import add_posthoc_stage
from ..config import parse_options
from ..metrics import classification_report
from ..objectives import OBJECTIVES, get_objective, objective_for_training
from . import RULE_ATTRIBUTE, RULES, fit_decision_rule, fold_offsets

FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
REPORTED = ("min_recall", "mean_recall", "h_mean", "g_mean", "min_coverage", "accuracy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m selmix_hf.posthoc",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="A saved classifier: a local directory or a Hub id.")
    parser.add_argument(
        "--validation",
        required=True,
        help="Validation data: a .csv / .tsv / .json / .jsonl / .parquet file, a `save_to_disk` directory or a Hub "
        "dataset id (with --validation_split).",
    )
    parser.add_argument("--validation_split", default="validation", help="Split of a dataset dict or Hub dataset.")
    parser.add_argument("--text_column", help="Column of the texts (text classifiers).")
    parser.add_argument("--image_column", help="Column of the images or image paths (image classifiers).")
    parser.add_argument("--label_column", default="label", help="Column of the labels: class ids or class names.")
    parser.add_argument("--objective", required=True, choices=sorted(OBJECTIVES), help="Objective the rule maximises.")
    parser.add_argument("--objective_options", default=None, help="Options of the objective as JSON.")
    parser.add_argument(
        "--class_counts",
        default=None,
        help="Training samples per class as a JSON list: the head/tail split of the head/tail objectives.",
    )
    parser.add_argument("--kind", default="offsets", choices=RULES, help="offsets (folded) or gain_matrix (stored).")
    parser.add_argument("--folds", type=int, default=5, help="Cross-fitting folds.")
    parser.add_argument("--confidence", type=float, default=0.9, help="Bootstrap share the gain must win to be kept.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the folds and the bootstrap.")
    parser.add_argument("--batch_size", type=int, default=32, help="Batch size of the forward passes.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Device.")
    parser.add_argument("--output", required=True, help="Directory for the model with its rule, and its card.")
    return parser


def load_validation(source: str, split: str) -> Any:
    """A `datasets.Dataset` from a data file, a `save_to_disk` directory or a Hub dataset id."""
    import datasets

    extension = os.path.splitext(source)[1].lower()
    if os.path.isfile(source):
        if extension not in FILE_BUILDERS:
            raise ValueError(f"--validation {source}: unknown file type {extension!r}; use {', '.join(FILE_BUILDERS)}")
        options = {"delimiter": "\t"} if extension == ".tsv" else {}
        return datasets.load_dataset(FILE_BUILDERS[extension], data_files=source, split="train", **options)
    if os.path.isdir(source):
        loaded = datasets.load_from_disk(source)
    else:
        loaded = datasets.load_dataset(source)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"--validation {source} has no split {split!r}; its splits: {list(loaded)}")
        return loaded[split]
    return loaded


def label_ids(values: list[Any], config: Any, column: str) -> torch.Tensor:
    """Class ids from a label column of ids or of the model's class names (``config.label2id``)."""
    names = {str(name): int(k) for name, k in (getattr(config, "label2id", None) or {}).items()}
    ids = []
    for row, value in enumerate(values):
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            ids.append(int(value))
        elif str(value) in names:
            ids.append(names[str(value)])
        else:
            raise ValueError(
                f"{column!r} row {row}: label {value!r} is neither a class id nor one of the model's class names "
                f"({', '.join(sorted(names)) or 'config.label2id is empty'})"
            )
    labels = torch.tensor(ids, dtype=torch.long)
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= config.num_labels):
        raise ValueError(f"{column!r}: class ids must lie in [0, {config.num_labels}) for this model")
    return labels


def model_logits(args: argparse.Namespace, data: Any) -> tuple[Any, Any, torch.Tensor]:
    """(model, processor, logits of every validation row) with the model's own tokenizer or image processor."""
    from PIL import Image
    from transformers import (
        AutoImageProcessor,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    if (args.text_column is None) == (args.image_column is None):
        raise ValueError("give exactly one of --text_column (text classifier) and --image_column (image classifier)")
    column = args.text_column or args.image_column
    if column not in data.column_names:
        raise ValueError(f"the validation data has no column {column!r}; its columns: {data.column_names}")
    if args.text_column:
        model = AutoModelForSequenceClassification.from_pretrained(args.model)
        processor = AutoTokenizer.from_pretrained(args.model)
    else:
        model = AutoModelForImageClassification.from_pretrained(args.model)
        processor = AutoImageProcessor.from_pretrained(args.model)
    model.to(args.device).eval()
    outputs = []
    for start in range(0, len(data), args.batch_size):
        rows = data[column][start : start + args.batch_size]
        if args.text_column:
            inputs = processor(rows, padding=True, truncation=True, return_tensors="pt")
        else:
            images = [Image.open(x).convert("RGB") if isinstance(x, str) else x.convert("RGB") for x in rows]
            inputs = processor(images=images, return_tensors="pt")
        with torch.no_grad():
            outputs.append(model(**inputs.to(args.device)).logits.float().cpu())
    return model, processor, torch.cat(outputs)


def write_card(args: argparse.Namespace, stage: dict, before: dict, after: dict) -> None:
    """The model's card with a section on the rule (before / after on the validation data), else a new card."""
    source = os.path.join(args.model, "README.md")
    text = open(source).read().rstrip() + "\n\n" if os.path.isfile(source) else f"# {os.path.basename(args.output)}\n\n"
    lines = [
        "## Post-hoc decision rule",
        "",
        f"**{stage['title']}**: {stage['description']}. Metrics reported above this section, if any, were measured "
        "before the rule; on the validation data it was fitted on (not a held-out estimate):",
        "",
        "| metric | without the rule | with the rule |",
        "|---|---:|---:|",
        *[f"| {k} | {before[k]:.3f} | {after[k]:.3f} |" for k in REPORTED if k in before],
        "",
        "Plug-in rule of Narasimhan, Ramaswamy, Saha and Agarwal (ICML 2015), fitted with selmix-hf "
        "(`python -m selmix_hf.posthoc`).",
    ]
    with open(os.path.join(args.output, "README.md"), "w") as fh:
        fh.write(text + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Fit, apply and save the rule; returns the rule and the validation metrics without and with it."""
    args = build_parser().parse_args(argv)
    try:
        options = parse_options(args.objective_options, "--objective_options")
        counts = json.loads(args.class_counts) if args.class_counts else None
        data = load_validation(args.validation, args.validation_split)
        if args.label_column not in data.column_names:
            raise ValueError(
                f"the validation data has no column {args.label_column!r}; its columns: {data.column_names}"
            )
        model, processor, logits = model_logits(args, data)
        num_labels = model.config.num_labels
        labels = label_ids(list(data[args.label_column]), model.config, args.label_column)
        if counts is None:  # a head/tail objective then says it needs them
            objective = get_objective(args.objective, num_labels, **options)
        else:
            objective = objective_for_training(args.objective, num_labels, counts, **options)
        rule = fit_decision_rule(
            logits, labels, objective, kind=args.kind, folds=args.folds, confidence=args.confidence, seed=args.seed
        )
    except (ValueError, TypeError, FileNotFoundError, OSError) as err:
        raise SystemExit(f"selmix_hf.posthoc: {err}") from err
    before = classification_report(labels, logits.argmax(1), num_labels, class_counts=counts)
    after = classification_report(labels, rule.predict(logits), num_labels, class_counts=counts)
    if rule.kind == "offsets":
        fold_offsets(model, rule.offsets)
    setattr(model.config, RULE_ATTRIBUTE, rule.to_dict() if rule.kind == "gain_matrix" else None)
    settings = {
        "posthoc": rule.kind if rule.kind != "none" else "declined",
        "posthoc_objective": args.objective,
        "posthoc_folds": args.folds,
        "posthoc_confidence": args.confidence,
    }
    stage = add_posthoc_stage(model.config, rule, objective.name, len(labels), settings, f"cli-{args.seed}")
    os.makedirs(args.output, exist_ok=True)
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    with open(os.path.join(args.output, "posthoc_rule.json"), "w") as fh:
        json.dump({"rule": rule.to_dict(), "validation_before": before, "validation_after": after}, fh, indent=2)
    write_card(args, stage, before, after)
    for name in ("per_class_recall.png",):  # figures the copied card refers to
        if os.path.isfile(os.path.join(args.model, name)):
            shutil.copy(os.path.join(args.model, name), args.output)
    e = rule.estimates
    print(
        f"{stage['title']}: cross-fitted {objective.name} {e['cross_fitted']:.3f} vs {e['without_rule']:.3f} without "
        f"(win rate {e['win_rate']:.2f}); saved to {args.output}",
        file=sys.stderr,
    )
    return {"rule": rule, "before": before, "after": after}


__all__ = ["build_parser", "load_validation", "main"]
