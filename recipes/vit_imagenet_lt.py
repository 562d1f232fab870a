"""ImageNet-LT with a ViT / DeiT / timm model: logit-adjusted fine-tuning, then SelMix for a non-decomposable objective.

    accelerate launch recipes/vit_imagenet_lt.py                              # recipes/configs/vit_imagenet_lt.yaml
    accelerate launch recipes/vit_imagenet_lt.py --image_root /data/imagenet --objective h_mean --push_to_hub true
    python recipes/vit_imagenet_lt.py --config my.yaml --stage1_checkpoint out/_stage1 --run_stage1 false

Data: ``--image_root`` holding the images and ImageNet-LT's split files (ImageNet_LT_{train,val,test}.txt, lines
"relative/path label"; ``--splits_dir`` if they live elsewhere), or ``--dataset_name`` for a Hub dataset with an
image and a label column. Outputs in ``--output_dir``: the model and its image processor, test_results.json, the
figures and README.md (the model card); ``--push_to_hub true`` uploads them. With unlabelled images
(``--unlabeled_dir`` or ``--unlabeled_dataset_name``), stage 1 is FixMatch-LA and SelMix mixes with unlabelled partners.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from transformers import AutoImageProcessor, AutoModelForImageClassification

from selmix_hf import SelMixConfig
from selmix_hf.adapters import AdapterArguments
from selmix_hf.recipe import (
    CardArguments,
    SemiSupervisedArguments,
    SplitArguments,
    StageArguments,
    display_path,
    end_launch,
    hub_splits,
    parse_recipe_arguments,
    run_two_stages,
)
from selmix_hf.split_files import (
    check_class_ids,
    image_folder,
    load_split_files,
    with_image_transform,
)

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "vit_imagenet_lt.yaml")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="google/vit-base-patch16-224",
        metadata={"help": "A ViT/DeiT/Swin/ConvNeXt checkpoint or a timm model ('timm/<name>'), Hub id or folder."},
    )
    revision: str = field(default="main", metadata={"help": "Revision of the checkpoint on the Hub."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache Hub downloads."})


@dataclass
class ImageDataArguments(SplitArguments):
    image_root: str | None = field(default=None, metadata={"help": "Folder of the images (ImageNet-LT root)."})
    splits_dir: str | None = field(default=None, metadata={"help": "Folder of the split files; default image_root."})
    train_split_file: str = field(default="ImageNet_LT_train.txt", metadata={"help": "Training split file name."})
    validation_split_file: str = field(default="ImageNet_LT_val.txt", metadata={"help": "Validation split file name."})
    test_split_file: str = field(default="ImageNet_LT_test.txt", metadata={"help": "Test split file name."})
    check_images: bool = field(default=True, metadata={"help": "Check that every listed image exists before training."})
    image_column: str = field(default="image", metadata={"help": "Image column of the Hub dataset."})
    num_labels: int | None = field(default=None, metadata={"help": "Number of classes; default the labels seen."})
    class_names_file: str | None = field(default=None, metadata={"help": "Class names, one per line, in label order."})
    unlabeled_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of unlabelled images (every image file below it): FixMatch-LA + SelMix."},
    )


def image_transforms(processor, train: bool):
    """The processor's own transforms (timm models carry them), else resize/crop/normalise built from its settings."""
    own = getattr(processor, "train_transforms" if train else "val_transforms", None)
    if own is not None:
        return own
    from torchvision import transforms as T

    size = processor.size
    side = size.get("shortest_edge") or (size["height"], size["width"])
    crop = side if isinstance(side, tuple) else (side, side)
    normalise = [T.ToTensor(), T.Normalize(processor.image_mean, processor.image_std)]
    if train:
        return T.Compose([T.RandomResizedCrop(crop), T.RandomHorizontalFlip(), *normalise])
    return T.Compose([T.Resize(crop), T.CenterCrop(crop), *normalise])


def load_splits(
    data: ImageDataArguments, seed: int, num_labels_origin: str | None = None
) -> tuple[dict, list[str] | None]:
    """train / validation / test with ``image_path`` (or ``image``) and ``label`` columns, and class names if known;
    ``num_labels_origin`` (where num_labels was set) is named when num_labels disagrees with the split files."""
    if data.image_root:
        files = {"train": data.train_split_file, "validation": data.validation_split_file, "test": data.test_split_file}
        splits = load_split_files(
            data.image_root, files, data.splits_dir, data.num_labels, data.check_images, num_labels_origin
        )
        return dict(splits), None
    if not data.dataset_name:
        raise ValueError(
            "give the data: --image_root (a folder with ImageNet-LT split files) or --dataset_name (Hub id)"
        )
    from datasets import load_dataset

    dataset = load_dataset(data.dataset_name, data.dataset_config_name)
    splits = hub_splits(dataset, data.label_column, data.split_names(), data.holdout_per_class, seed)
    feature = splits["train"].features["label"]
    return splits, list(feature.names) if hasattr(feature, "names") else None


def class_names(data: ImageDataArguments, splits: dict, names: list[str] | None, num_labels_origin: str) -> list[str]:
    """The class names in label order (the names file's, the dataset's or ``class_<k>``), one per class of the data;
    a num_labels or a names file that disagrees with the labels is an error saying where it came from."""
    source = "the dataset's label feature"
    if data.class_names_file:
        with open(data.class_names_file) as fh:
            names = [line.strip() for line in fh if line.strip()]
        source = f"the class names file {display_path(data.class_names_file)}"
    if data.num_labels is not None and names is not None and len(names) != data.num_labels:
        raise ValueError(
            f"num_labels is {data.num_labels} ({num_labels_origin}), but {source} has {len(names)} "
            f"class names; set num_labels to {len(names)} or give one name per class"
        )
    if data.num_labels is not None:
        num_labels, origin = data.num_labels, num_labels_origin
    elif names is not None:
        num_labels, origin = len(names), f"the number of class names in {source}"
    else:
        num_labels, origin = None, None
    described = (
        f"the data (split files in {data.splits_dir or data.image_root})"
        if data.image_root
        else f"the data ({data.dataset_name})"
    )
    num_labels = check_class_ids(
        {name: split["label"] for name, split in splits.items()}, num_labels, origin, data=described
    )
    return names or [f"class_{k}" for k in range(num_labels)]


def load_pool(data: ImageDataArguments, semi: SemiSupervisedArguments, seed: int):
    """The unlabelled images (``--unlabeled_dir`` or a Hub split), with the labelled splits' image column, or None."""
    if data.unlabeled_dir and semi.unlabeled_dataset_name:
        raise ValueError("give one unlabelled source: --unlabeled_dir or --unlabeled_dataset_name")
    if data.unlabeled_dir:
        pool = semi.subsample(image_folder(data.unlabeled_dir), seed)
        return pool if data.image_root else pool.rename_column("image_path", data.image_column)
    pool = semi.load_hub_pool(seed)
    if pool is None:
        return None
    if data.image_column not in pool.column_names:
        raise ValueError(f"the unlabelled split has no {data.image_column!r} column; its columns: {pool.column_names}")
    pool = pool.select_columns([data.image_column])
    return pool.rename_column(data.image_column, "image_path") if data.image_root else pool


def main(argv: list[str] | None = None) -> dict:
    parsed = parse_recipe_arguments(
        (
            ModelArguments,
            ImageDataArguments,
            SelMixConfig,
            StageArguments,
            CardArguments,
            SemiSupervisedArguments,
            AdapterArguments,
        ),
        argv,
        DEFAULT_CONFIG,
    )
    model_args, data, args, stages, card, semi, adapter = parsed
    origin = parsed.origin("num_labels")
    splits, names = load_splits(data, args.seed, origin)
    names = class_names(data, splits, names, origin)
    source = stages.stage1_checkpoint or model_args.model_name_or_path
    hub = dict(revision=model_args.revision, cache_dir=model_args.cache_dir)
    processor = AutoImageProcessor.from_pretrained(source, **hub)
    model = AutoModelForImageClassification.from_pretrained(
        source,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: k for k, n in enumerate(names)},
        ignore_mismatched_sizes=True,
        **hub,
    )
    column = "image_path" if data.image_root else data.image_column
    prepared = {
        name: with_image_transform(split, image_transforms(processor, name == "train"), column)
        for name, split in splits.items()
    }
    pool = load_pool(data, semi, args.seed)
    if pool is not None:  # deterministic like the validation images: FixMatch's views do the augmenting
        pool = with_image_transform(pool, image_transforms(processor, False), column)
    return run_two_stages(
        model=model,
        args=args,
        stages=stages,
        card=card,
        splits=prepared,
        class_names=names,
        processing_class=processor,
        dataset_id=data.dataset_name,
        dataset_name=data.dataset_name or f"ImageNet-LT format split files in {data.image_root}",
        unlabeled=pool,
        semi=semi,
        adapter=adapter,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
    end_launch()
