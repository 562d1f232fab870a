"""Long-tailed text classification with a BERT-family model: logit-adjusted fine-tuning, then SelMix.

    accelerate launch recipes/bert_text_lt.py --dataset_name <hub id> --text_column text --label_column label
    accelerate launch recipes/bert_text_lt.py --train_file train.csv --test_file test.csv --objective h_mean
    python recipes/bert_text_lt.py --train_file data.parquet --imbalance_ratio 100 --push_to_hub true

Data: a Hub dataset id or local csv / json / jsonl / parquet files; the text (and optional text pair) and label
columns are named by flags; string labels are mapped to class ids in sorted order. A missing validation or test
split is held out of train (``--holdout_per_class`` per class). ``--imbalance_ratio`` subsamples the training split
to an exponential long-tailed profile, for experiments on balanced data. Outputs as in vit_imagenet_lt.py.
With unlabelled texts (``--unlabeled_file`` or ``--unlabeled_dataset_name``), stage 1 is FixMatch-LA (strong view:
token masking) and SelMix mixes with unlabelled partners.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from datasets import ClassLabel, load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from selmix_hf import SelMixConfig
from selmix_hf.adapters import AdapterArguments
from selmix_hf.data import make_long_tailed
from selmix_hf.recipe import (
    CardArguments,
    SemiSupervisedArguments,
    SplitArguments,
    StageArguments,
    end_launch,
    hub_splits,
    parse_recipe_arguments,
    run_two_stages,
)

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "bert_text_lt.yaml")
BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="bert-base-uncased", metadata={"help": "BERT-family checkpoint (Hub id or folder)."}
    )
    revision: str = field(default="main", metadata={"help": "Revision of the checkpoint on the Hub."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache Hub downloads."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer texts are truncated."})


@dataclass
class TextDataArguments(SplitArguments):
    train_file: str | None = field(default=None, metadata={"help": "Local training file: csv, json, jsonl or parquet."})
    validation_file: str | None = field(
        default=None, metadata={"help": "Local validation file (else held out of train)."}
    )
    test_file: str | None = field(default=None, metadata={"help": "Local test file (else held out of train)."})
    text_column: str = field(default="text", metadata={"help": "Column with the text."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Column with a second text, for pair tasks."})
    imbalance_ratio: float | None = field(
        default=None, metadata={"help": "Subsample train to this max/min class ratio."}
    )
    imbalance_n_max: int | None = field(default=None, metadata={"help": "Size of the largest class after subsampling."})
    unlabeled_file: str | None = field(
        default=None, metadata={"help": "Unlabelled texts (csv, json, jsonl or parquet): FixMatch-LA, then SelMix."}
    )


def load_raw(data: TextDataArguments):
    """The DatasetDict named by the flags, with clear errors for missing or unsupported files."""
    if data.dataset_name:
        return load_dataset(data.dataset_name, data.dataset_config_name)
    if not data.train_file:
        raise ValueError("give the data: --dataset_name (Hub id) or --train_file (csv, json, jsonl or parquet)")
    files = {}
    for split, path in (
        (data.train_split, data.train_file),
        (data.validation_split, data.validation_file),
        (data.test_split, data.test_file),
    ):
        if path is None:
            continue
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file {path} does not exist")
        files[split] = path
    kinds = {BUILDERS.get(os.path.splitext(p)[1].lower()) for p in files.values()}
    if None in kinds or len(kinds) != 1:
        raise ValueError(f"data files must all be one of {', '.join(BUILDERS)}; got {', '.join(files.values())}")
    return load_dataset(kinds.pop(), data_files=files)


def encode_labels(raw, column: str):
    """Class ids and names: string labels become ids in sorted order, the same in every split."""
    for name, split in raw.items():
        if column not in split.column_names:
            raise ValueError(f"split {name!r} has no label column {column!r}; its columns are {split.column_names}")
    feature = next(iter(raw.values())).features[column]
    if isinstance(feature, ClassLabel):
        return raw, list(feature.names)
    values = sorted({v for split in raw.values() for v in split[column]}, key=lambda v: (isinstance(v, str), v))
    if all(isinstance(v, int) for v in values):
        if values[0] < 0:
            raise ValueError(f"label {values[0]} in column {column!r} is negative; class ids must be 0 .. K-1")
        names = [str(k) for k in range(values[-1] + 1)]
    else:
        names = [str(v) for v in values]
        raw = raw.map(lambda b: {column: [str(v) for v in b[column]]}, batched=True)
    return raw.cast_column(column, ClassLabel(names=names)), names


def load_pool(data: TextDataArguments, semi: SemiSupervisedArguments, seed: int):
    """The unlabelled texts (``--unlabeled_file`` or a Hub split), their text columns only, or None."""
    if data.unlabeled_file and semi.unlabeled_dataset_name:
        raise ValueError("give one unlabelled source: --unlabeled_file or --unlabeled_dataset_name")
    if data.unlabeled_file:
        if not os.path.isfile(data.unlabeled_file):
            raise FileNotFoundError(f"unlabelled file {data.unlabeled_file} does not exist")
        kind = BUILDERS.get(os.path.splitext(data.unlabeled_file)[1].lower())
        if kind is None:
            raise ValueError(f"the unlabelled file must be one of {', '.join(BUILDERS)}; got {data.unlabeled_file}")
        pool = semi.subsample(load_dataset(kind, data_files={"train": data.unlabeled_file})["train"], seed)
    else:
        pool = semi.load_hub_pool(seed)
    if pool is None:
        return None
    columns = [c for c in (data.text_column, data.text_pair_column) if c]
    missing = [c for c in columns if c not in pool.column_names]
    if missing:
        raise ValueError(f"the unlabelled texts have no column {missing}; their columns: {pool.column_names}")
    return pool.select_columns(columns)


def main(argv: list[str] | None = None) -> dict:
    model_args, data, args, stages, card, semi, adapter = parse_recipe_arguments(
        (
            ModelArguments,
            TextDataArguments,
            SelMixConfig,
            StageArguments,
            CardArguments,
            SemiSupervisedArguments,
            AdapterArguments,
        ),
        argv,
        DEFAULT_CONFIG,
    )
    raw, names = encode_labels(load_raw(data), data.label_column)
    for split in raw.values():
        for column in filter(None, (data.text_column, data.text_pair_column)):
            if column not in split.column_names:
                raise ValueError(f"no text column {column!r}; the columns are {split.column_names}")
    splits = hub_splits(raw, data.label_column, data.split_names(), data.holdout_per_class, args.seed)
    if data.imbalance_ratio:
        splits["train"] = make_long_tailed(
            splits["train"], data.imbalance_ratio, n_max=data.imbalance_n_max, seed=args.seed
        )
    source = stages.stage1_checkpoint or model_args.model_name_or_path
    hub = dict(revision=model_args.revision, cache_dir=model_args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(source, **hub)
    model = AutoModelForSequenceClassification.from_pretrained(
        source,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: k for k, n in enumerate(names)},
        ignore_mismatched_sizes=True,
        **hub,
    )

    def tokenize(batch):
        pair = batch[data.text_pair_column] if data.text_pair_column else None
        return tokenizer(batch[data.text_column], pair, truncation=True, max_length=model_args.max_seq_length)

    splits = {name: split.map(tokenize, batched=True, desc=f"tokenizing {name}") for name, split in splits.items()}
    pool = load_pool(data, semi, args.seed)
    if pool is not None:
        pool = pool.map(tokenize, batched=True, desc="tokenizing the unlabelled texts")
    return run_two_stages(
        model=model,
        args=args,
        stages=stages,
        card=card,
        splits=splits,
        class_names=names,
        processing_class=tokenizer,
        dataset_id=data.dataset_name,
        dataset_name=data.dataset_name or os.path.basename(data.train_file),
        unlabeled=pool,
        semi=semi,
        adapter=adapter,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
    end_launch()
