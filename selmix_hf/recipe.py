"""The two-stage recipe shared by the scripts in recipes/: logit-adjusted fine-tuning, then SelMix, then the outputs.

Stage 1 (`LongTailTrainer`) trains in ``<output_dir>/_stage1`` (left out of Hub uploads), stage 2 (`SelMixTrainer`)
in ``output_dir``; then the final model, its processor, the test metrics, the figures and the card are written to
``output_dir`` and, with ``--push_to_hub``, uploaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import yaml
from transformers import HfArgumentParser, TrainingArguments

from . import FixMatchConfig, FixMatchTrainer, LongTailConfig, LongTailTrainer, SelMixConfig, SelMixTrainer, _compat
from .adapters import AdapterArguments, load_adapter_weights, wrap_with_lora
from .data import dataset_labels
from .losses import LOSSES
from .metrics import classification_report, make_compute_metrics
from .plots import save_run_figures

logger = logging.getLogger(__name__)

REPORTED = (
    "mean_recall",
    "min_recall",
    "h_mean",
    "g_mean",
    "min_coverage",
    "min_head_tail_recall",
    "many_shot_recall",
    "medium_shot_recall",
    "few_shot_recall",
    "accuracy",
)


@dataclass
class StageArguments:
    """Which stages run and stage 1's own settings (stage 2 uses the SelMix / Trainer arguments)."""

    run_stage1: bool = field(default=True, metadata={"help": "Run stage 1 (long-tailed loss fine-tuning)."})
    run_stage2: bool = field(default=True, metadata={"help": "Run stage 2 (SelMix for the objective)."})
    stage1_checkpoint: str | None = field(
        default=None, metadata={"help": "Start stage 2 from this stage-1 model (a folder or Hub id); skips stage 1."}
    )
    stage1_loss_type: str = field(
        default="logit_adjusted", metadata={"help": f"Stage-1 loss, one of: {', '.join(LOSSES)}."}
    )
    stage1_loss_options: str | None = field(default=None, metadata={"help": "Stage-1 loss options as JSON."})
    stage1_learning_rate: float = field(default=1e-4, metadata={"help": "Stage-1 learning rate (whole model)."})
    stage1_optim: str = field(
        default="adamw_torch", metadata={"help": "Stage-1 optimizer (a TrainingArguments optim)."}
    )
    stage1_weight_decay: float = field(default=0.01, metadata={"help": "Stage-1 weight decay."})
    stage1_num_train_epochs: float = field(
        default=3.0, metadata={"help": "Stage-1 epochs (ignored if stage1_max_steps > 0)."}
    )
    stage1_max_steps: int = field(default=-1, metadata={"help": "Stage-1 optimiser steps; -1: use the epochs."})
    stage1_per_device_train_batch_size: int | None = field(
        default=None,
        metadata={"help": "Stage-1 samples per device and step; default twice the SelMix pairs (same volume)."},
    )
    plots: bool = field(default=True, metadata={"help": "Write the figures (needs matplotlib)."})


@dataclass
class SemiSupervisedArguments:
    """An unlabelled pool, and FixMatch-LA as stage 1 when one is given (SelMix then draws partners from it)."""

    unlabeled_dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id of an unlabelled pool (its labels, if any, are never read)."}
    )
    unlabeled_dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration."})
    unlabeled_split: str = field(default="train", metadata={"help": "The split of it that is the pool."})
    unlabeled_max_samples: int | None = field(
        default=None, metadata={"help": "Keep at most this many pool samples (a seeded random subset)."}
    )
    fixmatch: bool = field(
        default=True, metadata={"help": "With a pool: stage 1 is FixMatch-LA (false: the supervised stage 1)."}
    )
    fixmatch_mu: int = field(default=2, metadata={"help": "FixMatch: unlabelled samples per labelled sample."})
    fixmatch_confidence_threshold: float = field(
        default=0.95, metadata={"help": "FixMatch: pseudo-labels below this confidence are masked."}
    )
    fixmatch_lambda_u: float = field(default=1.0, metadata={"help": "FixMatch: weight of the unlabelled loss."})
    fixmatch_ema_decay: float | None = field(
        default=0.999, metadata={"help": "FixMatch: EMA decay of the evaluated and saved weights (null: none)."}
    )

    def fixmatch_settings(self) -> dict[str, Any]:
        """The FixMatchConfig fields these arguments set."""
        return {
            "mu": self.fixmatch_mu,
            "confidence_threshold": self.fixmatch_confidence_threshold,
            "lambda_u": self.fixmatch_lambda_u,
            "ema_decay": self.fixmatch_ema_decay,
        }

    def subsample(self, pool: Any, seed: int) -> Any:
        """The pool, cut to ``unlabeled_max_samples`` (seeded) when set; an empty pool is an error."""
        if len(pool) == 0:
            raise ValueError("the unlabelled pool is empty; point the unlabeled_* arguments at samples")
        if self.unlabeled_max_samples is not None and len(pool) > self.unlabeled_max_samples:
            pool = pool.shuffle(seed=seed).select(range(self.unlabeled_max_samples))
        return pool

    def load_hub_pool(self, seed: int) -> Any:
        """The Hub pool named by ``unlabeled_dataset_name``, or None."""
        if not self.unlabeled_dataset_name:
            return None
        from datasets import load_dataset

        pool = load_dataset(self.unlabeled_dataset_name, self.unlabeled_dataset_config_name, split=self.unlabeled_split)
        return self.subsample(pool, seed)


@dataclass
class SplitArguments:
    """Where the data's splits come from: a Hub dataset's split names, and what is held out when one is missing."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    label_column: str = field(default="label", metadata={"help": "Column with the label (class id or name)."})
    train_split: str = field(default="train", metadata={"help": "Name of the training split."})
    validation_split: str = field(default="validation", metadata={"help": "Name of the validation split."})
    test_split: str = field(default="test", metadata={"help": "Name of the test split."})
    holdout_per_class: int = field(default=20, metadata={"help": "Per class, held out of train for a missing split."})

    def split_names(self) -> dict[str, str]:
        return {"train": self.train_split, "validation": self.validation_split, "test": self.test_split}


@dataclass
class CardArguments:
    """What the model card says that the run cannot know."""

    card_license: str | None = field(default=None, metadata={"help": "License of the model, e.g. apache-2.0."})
    card_language: str | None = field(
        default=None, metadata={"help": "Language code(s) of a text model, comma-separated."}
    )
    card_model_name: str | None = field(
        default=None, metadata={"help": "Title of the card; default the Hub repo's name."}
    )
    card_max_class_table: int = field(
        default=50, metadata={"help": "List every class up to this many; beyond, the worst half."}
    )


def display_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it (as the user typed it), else absolute."""
    relative = os.path.relpath(os.path.abspath(path))
    return relative if not relative.startswith(os.pardir) else os.path.abspath(path)


def _flag_values(value: Any) -> list[str]:
    """A YAML value as the command-line words that give it (a list is several words, a mapping is JSON)."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if isinstance(value, dict):
        return [json.dumps(value)]
    return [str(value)]


class _ConfigDefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows, for an argument the YAML config sets, the YAML value: the default that will apply."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        """The help text with ``(default from <yaml>: <value>)`` when the YAML sets the argument, else argparse's;
        a ``--no_x`` complement says what it does (its own default, False, is not the value that applies)."""
        if isinstance(action, argparse._StoreFalseAction):
            return f"The same as --{action.dest} false."
        origin = getattr(action, "config_default", None)
        if origin is None:
            return super()._get_help_string(action)
        added = f" (default from {origin[0]}: {origin[1]})".replace("%", "%%")  # help strings are %-formatted
        return (action.help or "") + added


class ParsedArguments(tuple):
    """The parsed dataclasses (unpack them like a tuple) and where each argument's value came from, for errors."""

    config: str | None = None  # the YAML file read
    from_config: frozenset[str] = frozenset()  # the arguments it set
    from_command_line: frozenset[str] = frozenset()  # the arguments the command line set (they win)

    def origin(self, name: str) -> str:
        """Where ``name``'s value came from and how to change it, as a phrase for an error message."""
        if name in self.from_command_line:
            return f"from the command-line flag --{name}; change the flag"
        if name in self.from_config:
            where = display_path(self.config)
            return f"from the YAML config {where}; edit `{name}:` there or override it with --{name}"
        return f"the built-in default; set it with --{name}"


def _command_line_names(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The argument names (dests) that ``argv`` sets, ``--no_x`` and ``--x=value`` included."""
    names = set()
    for word in argv:
        if word.startswith("--"):
            action = parser._option_string_actions.get(word.split("=", 1)[0])
            if action is not None:
                names.add(action.dest)
    return names


def parse_recipe_arguments(
    dataclass_types: Sequence[type], argv: Sequence[str] | None, default_config: str | None
) -> ParsedArguments:
    """HfArgumentParser over the dataclasses; a YAML file (``--config``, default the recipe's) gives the defaults,
    the command line overrides them. An unknown key in the YAML or on the command line is an error naming it;
    ``--help`` shows the YAML's values as the defaults, since they are the ones that apply."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    config = default_config
    for at, word in enumerate(argv):
        if word == "--config" or word.startswith("--config="):
            if word == "--config" and at + 1 >= len(argv):
                raise SystemExit("--config needs a YAML file")
            config = word.split("=", 1)[1] if "=" in word else argv[at + 1]
            del argv[at : at + (1 if "=" in word else 2)]
            break
    parser = HfArgumentParser(dataclass_types, formatter_class=_ConfigDefaultsHelpFormatter)
    parser.allow_abbrev = False  # a mistyped flag is an error, not silently the flag it abbreviates
    shown = display_path(config) if config else None
    parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,  # read above, before parsing; SUPPRESS keeps it out of the namespace
        help=(f"YAML file of defaults (default: {shown})" if shown else "YAML file of defaults").replace("%", "%%")
        + "; its keys are the other options, and flags given on the command line override it.",
    )
    parser.description = (
        f"Defaults shown as 'default from {shown}' come from that YAML file; the others are the "
        "built-in defaults. Flags override both."
        if shown
        else None
    )
    given = _command_line_names(parser, argv)
    values: dict[str, Any] = {}
    if config:
        if not os.path.isfile(config):
            raise FileNotFoundError(f"config file {config} does not exist")
        with open(config) as fh:
            values = yaml.safe_load(fh) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{config} must be a YAML mapping of argument names to values")
        known = {f.name for cls in dataclass_types for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{config}: unknown key(s) {', '.join(unknown)}; see `--help` for the valid arguments")
        values = {key: value for key, value in values.items() if value is not None}  # null: the built-in default
        for action in parser._actions:
            if action.dest in values:
                action.config_default = (shown, " ".join(_flag_values(values[action.dest])))
        # YAML values become command-line defaults: the arguments given on the command line still win.
        prefix = [word for key, value in values.items() for word in (f"--{key}", *_flag_values(value))]
        argv = prefix + argv
    parsed = ParsedArguments(parser.parse_args_into_dataclasses(args=argv))
    parsed.config, parsed.from_config, parsed.from_command_line = config, frozenset(values), frozenset(given)
    return parsed


def stage1_config(
    args: SelMixConfig, stages: StageArguments, final: bool = False, fixmatch: dict[str, Any] | None = None
) -> LongTailConfig:
    """Stage 1's TrainingArguments: the run's own, with stage 1's lr, length, batch and loss, in ``_stage1``
    (in output_dir itself, pushed as the run's model, when stage 1 is the ``final`` stage); a `FixMatchConfig`
    with the ``fixmatch`` settings when given."""
    shared = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    shared.update(
        output_dir=args.output_dir if final else os.path.join(args.output_dir, "_stage1"),
        learning_rate=stages.stage1_learning_rate,
        optim=stages.stage1_optim,
        optim_args=None,
        weight_decay=stages.stage1_weight_decay,
        num_train_epochs=stages.stage1_num_train_epochs,
        max_steps=stages.stage1_max_steps,
        per_device_train_batch_size=stages.stage1_per_device_train_batch_size or 2 * args.per_device_train_batch_size,
        push_to_hub=args.push_to_hub and final,
        resume_from_checkpoint=None,
    )
    if final:  # the run's model: the post-hoc rule, for the run's objective, is fitted on it
        shared.update(
            {name: getattr(args, name) for name in args.POSTHOC_FIELDS},
            posthoc_objective=args.posthoc_objective or args.objective,
        )
        if not args.posthoc_objective:
            shared["posthoc_objective_options"] = args.posthoc_objective_options or args.objective_options
    for name in ("logging_dir",):  # derived from output_dir in __post_init__; recompute it for _stage1
        if name in shared:
            shared[name] = None
    config_class = LongTailConfig if fixmatch is None else FixMatchConfig
    return config_class(
        loss_type=stages.stage1_loss_type, loss_options=stages.stage1_loss_options, **shared, **(fixmatch or {})
    )


def set_class_names(model: Any, names: Sequence[str]) -> None:
    """Name the classes the model is trained on in its config (num_labels, id2label, label2id and timm's
    label_names), so that the saved config, the model card and pipeline predictions use the dataset's names."""
    config = model.config
    names = [str(name) for name in names]
    if config.num_labels != len(names):
        raise ValueError(
            f"{type(model).__name__} has {config.num_labels} outputs (config.num_labels) for "
            f"{len(names)} classes; load it with num_labels={len(names)}"
        )
    if len(set(names)) != len(names):
        logger.warning("the class names are not unique: label2id keeps the last id of a repeated name")
    config.id2label = dict(enumerate(names))
    config.label2id = {name: k for k, name in enumerate(names)}
    # TimmWrapperConfig keeps the loaded checkpoint's label_names and writes them over id2label when saved
    for attribute, value in (("label_names", names), ("num_classes", len(names))):
        if attribute in vars(config):
            setattr(config, attribute, value)


def hub_splits(
    dataset: Any, label_column: str, split_names: dict[str, str], holdout_per_class: int, seed: int
) -> dict[str, Any]:
    """train / validation / test from a loaded DatasetDict; a missing validation or test split is held out of train
    (``holdout_per_class`` samples of every class, seeded), and the label column is renamed to ``label``."""
    from .data import balanced_split

    if split_names["train"] not in dataset:
        raise ValueError(f"the dataset has no {split_names['train']!r} split; its splits are {list(dataset)}")
    out = {"train": dataset[split_names["train"]]}
    for role in ("test", "validation"):
        name = split_names[role]
        if name and name in dataset:
            out[role] = dataset[name]
        else:
            logger.warning(
                "no %r split: holding out %d samples per class of train as %s", name, holdout_per_class, role
            )
            out[role], out["train"] = balanced_split(
                out["train"], holdout_per_class, label_column=label_column, seed=seed + (role == "validation")
            )
    if label_column != "label":
        out = {k: v.rename_column(label_column, "label") for k, v in out.items()}
    return out


def _resume_point(output_dir: str, wanted: bool) -> str | None:
    """The last checkpoint in output_dir when resuming was asked for and there is one."""
    if not wanted or not os.path.isdir(output_dir):
        return None
    return _compat.get_last_checkpoint(output_dir)


def test_report(trainer: Any, test: Any, names: Sequence[str], counts: Sequence[int]) -> dict[str, float]:
    """The full metric table of the trainer's model on the test split (gathered over processes)."""
    output = trainer.predict(test, metric_key_prefix="test")
    return classification_report(
        output.label_ids,
        np.asarray(output.predictions).argmax(-1),
        len(names),
        class_counts=counts,
        per_class=True,
        class_names=names,
    )


def format_table(before: dict[str, float] | None, after: dict[str, float]) -> str:
    """The before/after metric table as fixed-width text for the log."""
    lines = [f"{'test metric':28s}{'before' if before else '':>10s}{'after':>10s}"]
    for key in REPORTED:
        if key in after:
            lines.append(f"{key:28s}{(f'{before[key]:.3f}' if before else ''):>10s}{after[key]:10.3f}")
    return "\n".join(lines)


def end_launch() -> None:
    """Release the process group a launched recipe's ranks share, so each rank exits cleanly.

    Left to interpreter shutdown, torch warns about it, and a gloo (CPU) rank can abort at exit with
    "terminate called without an active exception" when its worker threads meet Python's finalisation.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_two_stages(
    *,
    model: Any,
    args: SelMixConfig,
    stages: StageArguments,
    card: CardArguments,
    splits: dict[str, Any],
    class_names: Sequence[str],
    processing_class: Any = None,
    data_collator: Callable | None = None,
    dataset_id: str | None = None,
    dataset_name: str | None = None,
    unlabeled: Any = None,
    semi: SemiSupervisedArguments | None = None,
    views: Any = None,
    adapter: AdapterArguments | None = None,
) -> dict[str, Any]:
    """Stage 1 -> test report -> stage 2 -> test report -> model, figures, metrics, card (and the Hub upload).

    With an ``unlabeled`` pool, stage 1 is FixMatch-LA (unless ``semi.fixmatch`` is false; ``views`` are its
    weak / strong views, default by input kind) and SelMix draws its partners from the pool (``--partners``).
    With ``adapter.lora_r`` > 0 both stages train a LoRA adapter and the head's copy instead of the whole model.
    """
    for name in ("train", "validation", "test"):
        if splits.get(name) is None:
            raise ValueError(f"the recipe needs a {name} split")
    if stages.stage1_checkpoint:
        stages.run_stage1 = False
    if not stages.run_stage1 and not stages.run_stage2:
        raise ValueError("both stages are switched off (run_stage1 and run_stage2 are false): nothing to train")
    resume = bool(args.resume_from_checkpoint)
    names = [str(name) for name in class_names]
    set_class_names(model, names)
    lora = adapter is not None and adapter.lora_r > 0
    if lora:
        model = wrap_with_lora(model, adapter)
    counts = np.bincount(dataset_labels(splits["train"]), minlength=len(names)).tolist()
    common = dict(
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        processing_class=processing_class,
        data_collator=data_collator,
        compute_metrics=make_compute_metrics(len(names), class_counts=counts),
    )
    before, trainer = None, None
    semi = semi or SemiSupervisedArguments()
    use_fixmatch = unlabeled is not None and semi.fixmatch
    if stages.run_stage1:
        fixmatch = semi.fixmatch_settings() if use_fixmatch else None
        config1 = stage1_config(args, stages, final=not stages.run_stage2, fixmatch=fixmatch)
        done = os.path.join(config1.output_dir, "config.json")
        if resume and stages.run_stage2 and os.path.exists(done):  # this run's stage 1 finished before: reuse it
            logger.info("resuming: stage 1 already finished in %s", config1.output_dir)
            if lora:  # stage 1 saved the adapter and the head's copy: put them into the wrapped model
                load_adapter_weights(model, config1.output_dir)
            else:
                model = type(model).from_pretrained(config1.output_dir)
                set_class_names(model, names)
        else:
            trainer = (
                FixMatchTrainer(model=model, args=config1, unlabeled_dataset=unlabeled, views=views, **common)
                if use_fixmatch
                else LongTailTrainer(model=model, args=config1, **common)
            )
            trainer.train(resume_from_checkpoint=_resume_point(config1.output_dir, resume))
            if stages.run_stage2:
                trainer.save_model(config1.output_dir)
            model = trainer.model
    if stages.run_stage2:
        partners_from_pool = unlabeled is not None and (args.partners != "labeled" or args.unlabeled_anchors)
        trainer = SelMixTrainer(
            model=model, args=args, unlabeled_dataset=unlabeled if partners_from_pool else None, **common
        )
        if stages.run_stage1 or stages.stage1_checkpoint:  # the starting point's test metrics, for the comparison
            before = test_report(trainer, splits["test"], names, counts)
        trainer.train(resume_from_checkpoint=_resume_point(args.output_dir, resume))
    after = test_report(trainer, splits["test"], names, counts)
    if trainer.is_world_process_zero():
        print(f"\ntest metrics ({args.output_dir}, world size {args.world_size}):\n{format_table(before, after)}")
    test_counts = np.bincount(dataset_labels(splits["test"]), minlength=len(names)).tolist()
    return finish(trainer, after, before, names, stages, card, dataset_id, dataset_name, test_counts)


def finish(
    trainer: Any,
    after: dict[str, float],
    before: dict[str, float] | None,
    names: Sequence[str],
    stages: StageArguments,
    card: CardArguments,
    dataset_id: str | None,
    dataset_name: str | None,
    test_counts: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Final model + processor, metrics JSON, figures and card into output_dir; the Hub upload when asked."""
    out = trainer.args.output_dir
    trainer.save_model(out)
    if trainer.is_world_process_zero():
        trainer.save_metrics("test", {f"test_{k}": v for k, v in after.items()}, combined=False)
        with open(os.path.join(out, "test_metrics_before_after.json"), "w") as fh:
            json.dump({"before": before, "after": after}, fh, indent=2)
    figures = (
        save_run_figures(trainer, out, names, after, before, ("start of stage 2", "final model"))
        if stages.plots
        else []
    )
    card_kwargs = dict(
        license=card.card_license,
        language=card.card_language.split(",") if card.card_language else None,
        model_name=card.card_model_name,
        dataset=dataset_id,
        dataset_name=dataset_name,
        results=after,
        before=before,
        eval_split="test",
        eval_counts=test_counts,
        plot_file="per_class_recall.png" if any(f.endswith("per_class_recall.png") for f in figures) else None,
        max_class_table=card.card_max_class_table,
    )
    trainer.create_model_card(**card_kwargs)
    pushed = None
    if trainer.args.push_to_hub:
        pushed = trainer.push_to_hub(commit_message="selmix-hf: final model, metrics and card", **card_kwargs)
    return {"before": before, "after": after, "figures": figures, "trainer": trainer, "pushed": pushed}


__all__ = [
    "CardArguments",
    "ParsedArguments",
    "SemiSupervisedArguments",
    "SplitArguments",
    "StageArguments",
    "display_path",
    "format_table",
    "hub_splits",
    "parse_recipe_arguments",
    "run_two_stages",
    "set_class_names",
    "stage1_config",
]
