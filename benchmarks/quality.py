"""The quality grid of the benchmark protocol: datasets x stage-2 methods x seeds, resumable.

    .venv/bin/python benchmarks/quality.py                         # the whole grid (skips finished cells)
    .venv/bin/python benchmarks/quality.py --datasets wordnet --seeds 0 --methods la selmix_min_recall
    .venv/bin/python benchmarks/quality.py --datasets wordnet-long # WordNet again, 300 stage-2 steps per method
    .venv/bin/python benchmarks/quality.py --datasets wordnet-many # 128 WordNet hypernym classes, 3 seeds
    .venv/bin/python benchmarks/quality.py --report                # only rewrite the tables from finished cells
    .venv/bin/python benchmarks/quality.py --revalidate --datasets fashion   # redo cells that lack validation metrics

Per (dataset, seed), stage 1 fine-tunes the pretrained model with the logit-adjusted loss once; its checkpoint is
shared by every stage-2 method. Each finished cell is a JSON file under benchmarks/results/quality/ and is never
recomputed (unless --revalidate and the cell predates validation metrics); the tables (mean +- std over the finished
seeds, best per column in bold) go to docs/benchmarks.md between the quality markers. Each cell holds the final
model's metrics on the test split and on the validation split (``validation_metrics``): library defaults change only
on validation evidence. Model selection uses no test data: fixed budgets, final checkpoints.

The datasets: ``wordnet`` (WordNet-LT: noun glosses labelled by their 26 supersenses, 300 ... 12 training glosses),
``fashion`` (Fashion-MNIST-LT, 1000 ... 10 training images) and ``wordnet-many`` (WordNet-many-LT, the scale of
CIFAR-100-LT and ImageNet-LT: noun glosses labelled by their first-hypernym ancestor at depth 4 below entity.n.01,
the 128 classes with at least 35 glosses, 10 validation and 20 test glosses per class, 1,280 ... 5 training glosses,
imbalance 256; see `selmix_hf.local_datasets.load_wordnet_hypernym_classes`). ``wordnet-many`` runs SelMix for the
objectives that matter at that scale: min head-tail recall (min of the mean recalls of the head and of the tail, the
10% rarest classes: the published objective for CIFAR-100-LT and ImageNet-LT), H-mean, mean recall and min recall;
the two smaller grids run min recall, mean recall, H-mean and mean recall under a min-coverage constraint.
Every grid runs the same baselines. ``--methods`` overrides the grid's list.

SelMix runs twice per objective: with the published pair temperature (``selmix_*``: softmax(G / 0.1), G in its own
units) and scale-free (``selmix_*_sf``: softmax(G / (1.0 max |G|))). Both sets are pinned here, so a change of the
library default does not change what a method name means.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import numpy as np
import torch

from selmix_hf.metrics import confusion_counts, normalized_confusion

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import versions  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "quality")
PROBES = os.path.join(ROOT, "benchmarks", "results", "quality_probes")
CHECKPOINTS = os.path.join(ROOT, "outputs", "quality_stage1")
LOGITS = os.path.join(ROOT, "outputs", "quality_logits")  # per cell: validation / test logits and labels (.npz)
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
MARKERS = ("<!-- quality:begin -->", "<!-- quality:end -->")

# Budgets: samples per step are equal for every stage-2 method (SelMix: half as many pairs, two samples each).
# "wordnet-long" is the WordNet grid again with 3x the stage-2 steps (same stage-1 checkpoints): the probes showed
# SelMix needs them to reach the class Tops; every method gets the same longer budget.
BUDGET = {
    "wordnet": dict(task="wordnet", stage1_steps=300, stage2_steps=100, batch=32, refresh=25),
    "fashion": dict(task="fashion", stage1_steps=300, stage2_steps=100, batch=32, refresh=25),
    "wordnet-long": dict(task="wordnet", stage1_steps=300, stage2_steps=300, batch=32, refresh=25),
    # 128 classes and 31,186 training glosses: 500 stage-1 steps see half of them (300 would see 31%)
    "wordnet-many": dict(task="wordnet-many", stage1_steps=2000, stage2_steps=100, batch=32, refresh=25),
}
TEXT_TASKS = ("wordnet", "wordnet-many")
PROTOCOL_GRIDS = ["wordnet", "fashion", "wordnet-many"]
PUBLISHED_T = {"sampling_temperature": 0.1, "scale_free_temperature": False}
SCALE_FREE_T = {"sampling_temperature": 1.0, "scale_free_temperature": True}
SELMIX_OBJECTIVES = ["min_recall", "mean_recall", "h_mean", "mean_recall_min_coverage", "min_head_tail_recall"]
# The SelMix methods a grid runs when it is not the two smaller grids' (every objective but min head-tail recall, both
# temperatures). wordnet-many: its four objectives with the library's default, scale-free temperature (each cell
# costs about twice a WordNet-LT cell on 2 cores; both temperatures would double the grid).
GRID_SELMIX = {
    "wordnet-many": [f"selmix_{o}_sf" for o in ("min_head_tail_recall", "h_mean", "mean_recall", "min_recall")]
}
METHODS = {
    "none": ("none", {}),
    "ce": ("longtail", {"loss_type": "ce"}),
    "la": ("longtail", {"loss_type": "logit_adjusted"}),
    "cb_ce": ("longtail", {"loss_type": "weighted_ce"}),
    "focal": ("longtail", {"loss_type": "focal"}),
    "uniform_mixup": ("selmix", {"pair_distribution": "uniform", "objective": "mean_recall"}),
    "cost_sensitive": ("longtail", {"loss_type": "cost_sensitive"}),
    "autobalance": ("autobalance", {"neumann_lr": 0.1, "hyper_learning_rate": 0.05, "init": "la"}),
    **{f"selmix_{o}": ("selmix", {"objective": o, **PUBLISHED_T}) for o in SELMIX_OBJECTIVES},
    **{f"selmix_{o}_sf": ("selmix", {"objective": o, **SCALE_FREE_T}) for o in SELMIX_OBJECTIVES},
}
COLUMNS = [
    "mean_recall",
    "min_recall",
    "h_mean",
    "g_mean",
    "min_head_tail_recall",
    "min_coverage",
    "many_shot_recall",
    "medium_shot_recall",
    "few_shot_recall",
]
VALIDATION_COLUMNS = ["mean_recall", "min_recall", "h_mean", "g_mean", "min_head_tail_recall", "min_coverage"]


def grid_methods(dataset: str) -> list[str]:
    """The methods a grid runs by default: every baseline, and its SelMix methods (`GRID_SELMIX`)."""
    default = [m for m in METHODS if m.startswith("selmix_") and "min_head_tail_recall" not in m]
    selmix = GRID_SELMIX.get(dataset, default)
    return [m for m in METHODS if not m.startswith("selmix_") or m in selmix]


def load_task(dataset: str, seed: int):
    """(splits, class names, a fresh pretrained model, whether inputs are text). The new classifier head is drawn
    from the global RNG, so it is seeded here: unseeded, a stage 1 retrained in another process (or after other
    work in the same one) started from another head and moved test mean recall by up to 0.08 (seed 0, Fashion)."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from demo import image_task, text_task

    from selmix_hf.local_datasets import wordnet_many_lt

    torch.manual_seed(seed)
    if BUDGET[dataset]["task"] == "wordnet-many":
        return text_task(seed, 32, wordnet_many_lt(seed=seed))
    return text_task(seed, 32) if is_text(dataset) else image_task(seed, 32)


def is_text(dataset: str) -> bool:
    return BUDGET[dataset]["task"] in TEXT_TASKS


def common_args(out: str, seed: int, task_is_text: bool) -> dict:
    return dict(
        output_dir=out,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        seed=seed,
        per_device_eval_batch_size=64,
        remove_unused_columns=task_is_text,
        disable_tqdm=True,
    )


def stage1_settings(dataset: str) -> dict:
    """Stage 1's loss and budget (the semi-supervised benchmark's FixMatch-LA stage 1 uses the same)."""
    budget = BUDGET[dataset]
    return dict(
        loss_type="logit_adjusted",
        max_steps=budget["stage1_steps"],
        per_device_train_batch_size=budget["batch"],
        learning_rate=3e-4,
        warmup_steps=0.1,
    )


def stage1_model(dataset: str, seed: int, splits, model, text: bool):
    """The shared stage-1 (logit-adjusted) model of this dataset and seed, trained once and cached."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    from selmix_hf import LongTailConfig, LongTailTrainer

    path = os.path.join(CHECKPOINTS, BUDGET[dataset]["task"], f"seed{seed}")  # shared by the grids of one task
    if os.path.exists(os.path.join(path, "config.json")):
        auto = AutoModelForSequenceClassification if text else AutoModelForImageClassification
        return auto.from_pretrained(path)
    trainer = LongTailTrainer(
        model=model,
        train_dataset=splits["train"],
        args=LongTailConfig(**stage1_settings(dataset), **common_args(path + ".run", seed, text)),
    )
    started = time.time()
    trainer.train()
    trainer.save_model(path)
    seconds = time.time() - started
    write_json(
        stage1_path(dataset, seed), {"dataset": dataset, "seed": seed, "seconds": seconds, "versions": versions()}
    )
    print(f"  stage 1 {dataset} seed {seed}: {seconds:.0f} s", flush=True)
    return trainer.model


def run_cell(
    dataset: str,
    seed: int,
    method: str,
    splits,
    model,
    text: bool,
    counts: list[int],
    names: list[str] | None = None,
    overrides: dict | None = None,
    budget_overrides: dict | None = None,
    out_name: str | None = None,
) -> dict:
    """Train one stage-2 method from ``model`` and report the final model on test and validation.

    ``overrides`` / ``budget_overrides`` change the method's options / the dataset budget (probes only).
    """
    from selmix_hf import (
        AutoBalanceConfig,
        AutoBalanceTrainer,
        LongTailConfig,
        LongTailTrainer,
        SelMixConfig,
        SelMixTrainer,
        classification_report,
    )

    kind, options = METHODS[method]
    options = {**options, **(overrides or {})}
    budget = {**BUDGET[dataset], **(budget_overrides or {})}
    args = common_args(
        os.path.join(ROOT, "outputs", "quality_runs", dataset, f"seed{seed}", out_name or method), seed, text
    )
    steps = dict(max_steps=budget["stage2_steps"])
    data = dict(train_dataset=splits["train"], eval_dataset=splits["validation"])
    if kind == "none":
        trainer = LongTailTrainer(model=model, args=LongTailConfig(loss_type="ce", **args), **data)
    elif kind == "longtail":
        trainer = LongTailTrainer(
            model=model,
            **data,
            args=LongTailConfig(
                per_device_train_batch_size=budget["batch"],
                learning_rate=1e-4,
                validation_refresh_steps=budget["refresh"],
                **options,
                **steps,
                **args,
            ),
        )
    elif kind == "autobalance":
        trainer = AutoBalanceTrainer(
            model=model,
            **data,
            args=AutoBalanceConfig(
                per_device_train_batch_size=budget["batch"],
                learning_rate=1e-4,
                hyper_update_steps=budget["refresh"],
                hyper_batches=4,
                **options,
                **steps,
                **args,
            ),
        )
    else:
        settings = {"learning_rate": 3e-4, "backbone_lr_ratio": 0.1, **options}  # a probe may override the lrs
        trainer = SelMixTrainer(
            model=model,
            **data,
            args=SelMixConfig(
                per_device_train_batch_size=budget["batch"] // 2,
                gain_refresh_steps=budget["refresh"],
                **settings,
                **steps,
                **args,
            ),
        )
    started = time.time()
    if kind != "none":
        trainer.train()
    reports, arrays = {}, {}
    for split in ("test", "validation"):
        output = trainer.predict(splits[split])
        arrays[f"{split}_logits"] = output.predictions.astype(np.float32)
        arrays[f"{split}_labels"] = output.label_ids.astype(np.int64)
        reports[split] = classification_report(
            output.label_ids,
            output.predictions.argmax(-1),
            len(counts),
            class_counts=counts,
            per_class=names is not None,
            class_names=names,
        )
    seconds = time.time() - started  # training, its own validation passes, and the two predictions
    save_logits(logits_path(dataset, seed, out_name or method), arrays)
    return {
        "dataset": dataset,
        "seed": seed,
        "method": method,
        "seconds": seconds,
        "metrics": reports["test"],
        "validation_metrics": reports["validation"],
        "settings": {"kind": kind, **options, **budget},
        "refresh_logs": [e for e in trainer.state.log_history if any("/" in k for k in e)],
        "versions": versions(),
    }


def cell_path(dataset: str, seed: int, method: str) -> str:
    return os.path.join(RESULTS, dataset, f"seed{seed}", f"{method}.json")


def logits_path(dataset: str, seed: int, method: str) -> str:
    """The cell's validation and test logits (outputs/, not committed: the post-hoc pass refits rules from them)."""
    return os.path.join(LOGITS, dataset, f"seed{seed}", f"{method}.npz")


def save_logits(path: str, arrays: dict[str, np.ndarray]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(path + ".tmp", path)


def stage1_path(dataset: str, seed: int) -> str:
    """Stage-1 wall time of a seed (not a cell: the leading underscore keeps it out of the tables)."""
    return os.path.join(RESULTS, dataset, f"seed{seed}", "_stage1.json")


def write_json(path: str, value: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        json.dump(value, fh, indent=2)
    os.replace(path + ".tmp", path)


def needs_run(dataset: str, seed: int, method: str, revalidate: bool, logits: bool = False) -> bool:
    """A cell runs if it is missing, with --revalidate if it predates the validation metrics, and with --logits if
    its logits are not on disk (the post-hoc pass needs them)."""
    path = cell_path(dataset, seed, method)
    if not os.path.exists(path) or (logits and not os.path.exists(logits_path(dataset, seed, method))):
        return True
    if not revalidate:
        return False
    with open(path) as fh:
        return "validation_metrics" not in json.load(fh)


def run_grid(
    datasets: list[str],
    seeds: list[int],
    methods: list[str] | None = None,
    revalidate: bool = False,
    logits: bool = False,
) -> None:
    """The unfinished cells of every dataset and seed: ``methods``, or each grid's own (`grid_methods`)."""
    for dataset in datasets:
        for seed in seeds:
            todo = [m for m in methods or grid_methods(dataset) if needs_run(dataset, seed, m, revalidate, logits)]
            if not todo:
                continue
            splits, names, model, _ = load_task(dataset, seed)
            text = is_text(dataset)
            counts = np.bincount(splits["train"]["label"], minlength=len(names)).tolist()
            start_model = stage1_model(dataset, seed, splits, model, text)
            state = {k: v.clone() for k, v in start_model.state_dict().items()}
            for method in todo:
                torch.manual_seed(seed)
                start_model.load_state_dict(state)
                cell = run_cell(dataset, seed, method, splits, start_model, text, counts, names)
                path = cell_path(dataset, seed, method)
                if os.path.exists(path):  # --revalidate / --logits: did the rerun reproduce the recorded test metrics?
                    with open(path) as fh:
                        old = json.load(fh)
                    cell["recomputed"] = {
                        "previous_seconds": old["seconds"],
                        "test_metrics_max_abs_diff": max(
                            abs(cell["metrics"][k] - v) for k, v in old["metrics"].items() if k in cell["metrics"]
                        ),
                    }
                write_json(path, cell)
                m, v = cell["metrics"], cell["validation_metrics"]
                print(
                    f"  {dataset} seed {seed} {method}: test mean recall {m['mean_recall']:.3f}, min recall "
                    f"{m['min_recall']:.3f}, H-mean {m['h_mean']:.3f}; validation min recall {v['min_recall']:.3f} "
                    f"({cell['seconds']:.0f} s)",
                    flush=True,
                )
            write_report()


def load_cells(dataset: str) -> tuple[dict[str, list[dict]], float]:
    """The finished cells of a dataset by method, and the stage-1 seconds recorded for its seeds."""
    cells: dict[str, list[dict]] = {}
    stage1 = 0.0
    for seed_dir in sorted(os.listdir(os.path.join(RESULTS, dataset))):
        for name in sorted(os.listdir(os.path.join(RESULTS, dataset, seed_dir))):
            if not name.endswith(".json"):
                continue
            with open(os.path.join(RESULTS, dataset, seed_dir, name)) as fh:
                cell = json.load(fh)
            if name.startswith("_"):
                stage1 += cell["seconds"]
            else:
                cells.setdefault(cell["method"], []).append(cell)
    return cells, stage1


def table(cells: dict[str, list[dict]], key: str, columns: list[str]) -> list[str]:
    """Mean +- std over seeds of cell[key][column] per method, best mean per column in bold."""
    rows = [m for m in METHODS if any(key in x for x in cells.get(m, []))]
    values = {m: [x[key] for x in cells[m] if key in x] for m in rows}
    means = {m: {c: np.mean([v.get(c, np.nan) for v in values[m]]) for c in columns} for m in rows}
    stds = {m: {c: np.std([v.get(c, np.nan) for v in values[m]]) for c in columns} for m in rows}
    best = {c: max((means[m][c] for m in rows if not np.isnan(means[m][c])), default=np.nan) for c in columns}
    lines = ["| method | " + " | ".join(columns) + " | seeds |", "|---|" + "---:|" * (len(columns) + 1)]
    for m in rows:
        texts = [f"{means[m][c]:.3f} ± {stds[m][c]:.3f}" for c in columns]
        texts = [f"**{t}**" if means[m][c] == best[c] else t for t, c in zip(texts, columns)]
        lines.append(f"| {m} | " + " | ".join(texts) + f" | {len(values[m])} |")
    return lines


def write_report() -> None:
    """Mean +- std per method and metric over the finished seeds, best per column in bold, into docs/benchmarks.md."""
    sections = []
    for dataset in sorted(os.listdir(RESULTS)) if os.path.isdir(RESULTS) else []:
        cells, stage1 = load_cells(dataset)
        count = sum(len(v) for v in cells.values())
        seconds = sum(x["seconds"] for v in cells.values() for x in v)
        validated = sum("validation_metrics" in x for v in cells.values() for x in v)
        task = BUDGET.get(dataset, {}).get("task", dataset)
        compute = (
            f"{(seconds + stage1) / 60:.0f} min = cells {seconds / 60:.0f} min + stage 1 {stage1 / 60:.0f} min"
            if task == dataset
            else f"cells {seconds / 60:.0f} min; stage 1 is the {task} grid's checkpoints"
        )
        lines = [
            f"**{dataset}**, test split ({count} cells; seeds per method in the last column; compute {compute})",
            "",
        ]
        lines += table(cells, "metrics", COLUMNS)
        lines += [
            "",
            f"**{dataset}**, validation split, final model ({validated} cells record it; seeds per method in "
            "the last column)",
            "",
        ]
        lines += table(cells, "validation_metrics", VALIDATION_COLUMNS)
        sections.append("\n".join(lines))
    replace_block(MARKERS, "\n\n".join(sections) if sections else "No cell has finished yet.")


def replace_block(markers: tuple[str, str], body: str) -> None:
    """Put ``body`` between the two markers of docs/benchmarks.md (appended with them when they are not there)."""
    with open(DOC) as fh:
        doc = fh.read()
    block = f"{markers[0]}\n{body}\n{markers[1]}"
    if markers[0] in doc:
        doc = re.sub(re.escape(markers[0]) + ".*?" + re.escape(markers[1]), lambda _: block, doc, flags=re.S)
    else:
        doc += "\n" + block + "\n"
    with open(DOC, "w") as fh:
        fh.write(doc)


# -- the post-hoc pass: every cell with and without a rule fitted on its validation logits -----------------------
POSTHOC_OBJECTIVES = ["min_recall", "h_mean", "mean_recall", "mean_recall_min_coverage"]
POSTHOC_MARKERS = ("<!-- posthoc:begin -->", "<!-- posthoc:end -->")
FIGURES = os.path.join(ROOT, "docs", "figures")


def posthoc_cell(cell: dict, arrays: dict, seed: int) -> dict:
    """Per objective: the rule fitted on the cell's validation logits (cross-fitted guard), and the test and
    validation metrics of the model with it."""
    from selmix_hf import classification_report, get_objective
    from selmix_hf.posthoc import fit_decision_rule

    val_logits, val_labels = torch.as_tensor(arrays["validation_logits"]), torch.as_tensor(arrays["validation_labels"])
    test_logits, test_labels = torch.as_tensor(arrays["test_logits"]), torch.as_tensor(arrays["test_labels"])
    k = val_logits.shape[1]
    out = {}
    for name in POSTHOC_OBJECTIVES:
        objective = get_objective(name, k)
        started = time.time()
        rule = fit_decision_rule(val_logits, val_labels, objective, seed=seed)
        seconds = time.time() - started
        test_predictions = rule.predict(test_logits)
        score = {  # the objective's rule score on test (coverage objectives: feasibility first)
            when: objective.rule_score(
                normalized_confusion(confusion_counts(test_labels, predictions, k), objective.class_prior)
            )
            for when, predictions in (("without", test_logits.argmax(1)), ("with", test_predictions))
        }
        out[name] = {
            "kind": rule.kind,
            "estimates": rule.estimates,
            "offsets": rule.offsets.tolist(),
            "seconds": seconds,
            "test_score": score,
            "metrics": classification_report(test_labels, test_predictions, k),
            "validation_metrics": classification_report(val_labels, rule.predict(val_logits), k),
        }
    return out


def run_posthoc(datasets: list[str]) -> None:
    """Fit the rules for every cell and probe whose logits are on disk (recomputed each time: cheap), then write
    the tables (probes keep theirs in their JSON files)."""
    for dataset in datasets:
        for root, stem in ((RESULTS, ""), (PROBES, "probe_")):
            if not os.path.isdir(os.path.join(root, dataset)):
                continue
            for seed_dir in sorted(os.listdir(os.path.join(root, dataset))):
                posthoc_seed(root, stem, dataset, seed_dir)
    write_posthoc_report()


def posthoc_seed(root: str, stem: str, dataset: str, seed_dir: str) -> None:
    """The post-hoc entries of one seed's cells (or probes, whose logits are saved as probe_<name>.npz)."""
    seed = int(seed_dir.removeprefix("seed"))
    for name in sorted(os.listdir(os.path.join(root, dataset, seed_dir))):
        method = name.removesuffix(".json")
        path, logits = os.path.join(root, dataset, seed_dir, name), logits_path(dataset, seed, stem + method)
        if name.startswith("_") or not name.endswith(".json") or not os.path.exists(logits):
            continue
        with open(path) as fh:
            cell = json.load(fh)
        with np.load(logits) as arrays:
            cell["posthoc"] = posthoc_cell(cell, dict(arrays), seed)
        write_json(path, cell)
        summary = {
            o: f"{v['metrics'][o if o in v['metrics'] else 'mean_recall']:.3f}" for o, v in cell["posthoc"].items()
        }
        print(f"  posthoc {stem}{dataset} seed {seed} {method}: test with rule {summary}", flush=True)


def posthoc_table(cells: dict[str, list[dict]]) -> tuple[list[str], list[str]]:
    """Mean over seeds of each method as is and with its rule, per objective; and the cells the rule hurt."""
    rows = [m for m in METHODS if any("posthoc" in x for x in cells.get(m, []))]
    lines = [
        "| method | min recall → with rule | its mean recall | H-mean → with rule | its mean recall | "
        "mean recall → with rule | min coverage → with the coverage rule (its mean recall) | rules kept | seeds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    hurt = []
    for m in rows:
        done = [x for x in cells[m] if "posthoc" in x]

        def mean(values: list[float]) -> float:
            return float(np.mean(values))

        def pair(objective: str, metric: str) -> str:
            plain = mean([x["metrics"][metric] for x in done])
            ruled = mean([x["posthoc"][objective]["metrics"][metric] for x in done])
            return f"{plain:.3f} → {ruled:.3f}"

        def under(objective: str) -> str:
            return f"{mean([x['posthoc'][objective]['metrics']['mean_recall'] for x in done]):.3f}"

        kept = sum(v["kind"] != "none" for x in done for v in x["posthoc"].values())
        lines.append(
            f"| {m} | {pair('min_recall', 'min_recall')} | {under('min_recall')} | {pair('h_mean', 'h_mean')} | "
            f"{under('h_mean')} | {pair('mean_recall', 'mean_recall')} | "
            f"{pair('mean_recall_min_coverage', 'min_coverage')} ({under('mean_recall_min_coverage')}) | "
            f"{kept}/{len(done) * len(POSTHOC_OBJECTIVES)} | {len(done)} |"
        )
        for x in done:
            for objective, v in x["posthoc"].items():
                if v["test_score"]["with"] < v["test_score"]["without"] - 0.02:
                    hurt.append(
                        f"{m} seed {x['seed']} {objective}: {v['test_score']['without']:.3f} → "
                        f"{v['test_score']['with']:.3f}"
                    )
    return lines, hurt


def posthoc_figure(dataset: str, cells: dict[str, list[dict]]) -> str | None:
    """(mean recall, objective) of every method with and without its rule, one panel per objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [m for m in METHODS if any("posthoc" in x for x in cells.get(m, []))]
    if not rows:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(12, 5))
    for axis, objective in zip(axes, ("min_recall", "h_mean")):
        for m in rows:
            done = [x for x in cells[m] if "posthoc" in x]
            before = (
                np.mean([x["metrics"]["mean_recall"] for x in done]),
                np.mean([x["metrics"][objective] for x in done]),
            )
            after = (
                np.mean([x["posthoc"][objective]["metrics"]["mean_recall"] for x in done]),
                np.mean([x["posthoc"][objective]["metrics"][objective] for x in done]),
            )
            colour = (
                "tab:red" if m.startswith("selmix") and m.endswith("_sf") else "tab:blue" if m == "none" else "grey"
            )
            axis.scatter(*before, facecolors="none", edgecolors=colour)
            axis.scatter(*after, color=colour)
            axis.annotate("", after, before, arrowprops={"arrowstyle": "->", "color": colour, "alpha": 0.6})
            axis.annotate(m, after, fontsize=7, xytext=(3, 3), textcoords="offset points")
        axis.set_xlabel("test mean recall")
        axis.set_ylabel(f"test {objective.replace('_', ' ')}")
        axis.set_title(f"{dataset}: hollow = as trained, filled = with the rule for {objective}")
    figure.tight_layout()
    os.makedirs(FIGURES, exist_ok=True)
    path = os.path.join(FIGURES, f"posthoc_{dataset}.png")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return os.path.relpath(path, os.path.dirname(DOC))


def write_posthoc_report() -> None:
    """The post-hoc tables and figures into docs/benchmarks.md between the post-hoc markers."""
    sections = []
    for dataset in PROTOCOL_GRIDS:
        if not os.path.isdir(os.path.join(RESULTS, dataset)):
            continue
        cells, _ = load_cells(dataset)
        lines, hurt = posthoc_table(cells)
        if len(lines) == 2:
            continue
        figure = posthoc_figure(dataset, cells)
        seconds = [v["seconds"] for x in sum(cells.values(), []) if "posthoc" in x for v in x["posthoc"].values()]
        sections.append(
            "\n".join(
                [
                    f"**{dataset}**, test split, each cell as trained → with the rule fitted on its validation logits "
                    f"for that objective (mean over seeds; a declined rule leaves the cell as it is; fits took "
                    f"{np.median(seconds):.2f} s median, {max(seconds):.2f} s max)",
                    "",
                    *lines,
                    "",
                    "Cells where a rule lowered the test objective by more than 0.02: "
                    + (", ".join(hurt) if hurt else "none")
                    + ".",
                    *(["", f"![{dataset}: every method with and without its rule]({figure})"] if figure else []),
                ]
            )
        )
    replace_block(POSTHOC_MARKERS, "\n\n".join(sections) if sections else "No cell has post-hoc results yet.")


def run_probe(dataset: str, seed: int, name: str, method: str, overrides: dict, budget_overrides: dict) -> dict:
    """One stage-2 variant outside the grid (benchmarks/results/quality_probes/), from the same stage-1 checkpoint."""
    splits, names, model, _ = load_task(dataset, seed)
    text = is_text(dataset)
    counts = np.bincount(splits["train"]["label"], minlength=len(names)).tolist()
    start_model = stage1_model(dataset, seed, splits, model, text)
    torch.manual_seed(seed)
    cell = run_cell(
        dataset,
        seed,
        method,
        splits,
        start_model,
        text,
        counts,
        names,
        overrides,
        budget_overrides,
        out_name=f"probe_{name}",
    )
    cell["probe"] = {
        "name": name,
        "base_method": method,
        "overrides": overrides,
        "budget_overrides": budget_overrides,
        "command": " ".join([os.path.relpath(os.path.abspath(sys.argv[0]), ROOT), *sys.argv[1:]]),
    }
    write_json(os.path.join(PROBES, dataset, f"seed{seed}", f"{name}.json"), cell)
    m, v = cell["metrics"], cell["validation_metrics"]
    print(
        f"  probe {name} ({dataset} seed {seed}): test mean recall {m['mean_recall']:.3f}, min recall "
        f"{m['min_recall']:.3f}; validation mean recall {v['mean_recall']:.3f}, min recall {v['min_recall']:.3f} "
        f"({cell['seconds']:.0f} s)",
        flush=True,
    )
    return cell


def diagnose_class(dataset: str, seed: int, class_name: str) -> dict:
    """Where one class stands at the stage-1 checkpoint: its confusion rows (validation, test) and, per gain
    estimator, objective and temperature, how the first refresh's gains and pair distribution treat pairs labelled
    with it. Saved as quality_probes/<dataset>/seed<k>/diagnose_<class>.json."""
    from selmix_hf import SelMixConfig, SelMixTrainer
    from selmix_hf.gains import sampling_distribution

    splits, names, model, _ = load_task(dataset, seed)
    text = is_text(dataset)
    model = stage1_model(dataset, seed, splits, model, text)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    k = names.index(class_name)
    result: dict = {
        "class": class_name,
        "index": k,
        "train_count": int(np.bincount(splits["train"]["label"], minlength=len(names))[k]),
        "splits": {},
    }
    for estimator in ("selmix", "exact"):
        for objective in ("min_recall", "mean_recall"):
            model.load_state_dict(state)
            trainer = SelMixTrainer(
                model=model,
                train_dataset=splits["train"],
                eval_dataset=splits["validation"],
                args=SelMixConfig(
                    objective=objective,
                    gain_estimator=estimator,
                    max_steps=1,
                    **common_args(os.path.join(CHECKPOINTS, "diagnose"), seed, text),
                ),
            )
            trainer.refresh()
            gains = trainer.gains
            if not result["splits"]:
                for split in ("validation", "test"):
                    output = trainer.predict(splits[split])
                    logits, labels = output.predictions[output.label_ids == k], output.label_ids
                    predicted = output.predictions.argmax(-1)
                    row = np.bincount(predicted[labels == k], minlength=len(names))
                    probs = torch.softmax(torch.as_tensor(logits), dim=-1)[:, k]
                    result["splits"][split] = {
                        "samples": int((labels == k).sum()),
                        "times_predicted": int((predicted == k).sum()),
                        "row": {names[j]: int(c) for j, c in enumerate(row) if c},
                        "mean_probability": float(probs.mean()),
                        "rank_of_own_logit": (logits > logits[:, [k]]).sum(1).tolist(),
                        "zero_recall_classes": [
                            names[j] for j in range(len(names)) if not (predicted[labels == j] == j).any()
                        ],
                    }
            entry = {
                "max_gain": float(gains.max()),
                "max_gain_of_row": float(gains[k].max()),
                "pairs_above_best_of_row": int((gains.flatten() > gains[k].max()).sum()),
                "best_pairs": [
                    (names[i // len(names)], names[i % len(names)], float(gains.flatten()[i]))
                    for i in torch.argsort(gains.flatten(), descending=True)[:3].tolist()
                ],
            }
            for scale_free, temperature in ((False, 0.1), (True, 1.0)):
                p = sampling_distribution(gains, temperature, 1e-8, scale_free)
                entry[f"row_mass_T{temperature}{'_sf' if scale_free else ''}"] = float(p[k].sum())
            result[f"{estimator}/{objective}"] = entry
    write_json(os.path.join(PROBES, dataset, f"seed{seed}", f"diagnose_{class_name}.json"), result)
    print(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=PROTOCOL_GRIDS,
        choices=list(BUDGET),
        help="grids to run (default: the protocol's three; wordnet-long: WordNet with 300 stage-2 steps)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        help="methods to run (default: each grid's own, see GRID_SELMIX; a probe: the first, default none)",
    )
    parser.add_argument("--report", action="store_true", help="only rewrite the tables from the finished cells")
    parser.add_argument(
        "--revalidate",
        action="store_true",
        help="also rerun the selected cells that lack validation metrics (recorded before they existed)",
    )
    parser.add_argument(
        "--posthoc",
        action="store_true",
        help="fit the post-hoc rules of every cell whose logits are on disk and write their tables and figures",
    )
    parser.add_argument(
        "--logits",
        action="store_true",
        help="also rerun the selected cells whose logits are not in outputs/quality_logits (for --posthoc)",
    )
    parser.add_argument(
        "--probe",
        metavar="NAME",
        help="run one variant of --methods[0] outside the grid, for "
        "the first --datasets / --seeds, saved as quality_probes/<dataset>/seed<k>/NAME.json",
    )
    parser.add_argument(
        "--diagnose",
        metavar="CLASS",
        help="the stage-1 confusion row of CLASS and the first "
        "refresh's gains of pairs labelled CLASS (first --datasets / --seeds)",
    )
    parser.add_argument("--options", default="{}", help="probe: JSON options overriding the method's")
    parser.add_argument("--stage2-steps", type=int, help="probe: stage-2 steps instead of the budget's")
    parser.add_argument("--refresh", type=int, help="probe: refresh interval instead of the budget's")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.report:
        write_report()
        write_posthoc_report()
    elif args.posthoc:
        run_posthoc(args.datasets)
    elif args.diagnose:
        diagnose_class(args.datasets[0], args.seeds[0], args.diagnose)
    elif args.probe:
        budget = {k: v for k, v in {"stage2_steps": args.stage2_steps, "refresh": args.refresh}.items() if v}
        method = (args.methods or list(METHODS))[0]
        run_probe(args.datasets[0], args.seeds[0], args.probe, method, json.loads(args.options), budget)
    else:
        run_grid(args.datasets, args.seeds, args.methods, args.revalidate, args.logits)


if __name__ == "__main__":
    main()
