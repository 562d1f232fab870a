"""The recipes end to end on generated miniatures: both stages, the metric table, the figures, the card, bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from miniatures import imagenet_lt_folder, text_csv, tiny_bert, tiny_timm, tiny_vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_COUNTS = [24, 12, 6, 4]
TEXT_COUNTS = [40, 20, 12, 10]
FAST = ["--use_cpu", "true", "--bf16", "false", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
        "--per_device_train_batch_size", "4", "--stage1_per_device_train_batch_size", "16", "--max_steps", "12",
        "--stage1_max_steps", "40", "--gain_refresh_steps", "6", "--stage1_learning_rate", "3e-3",
        "--learning_rate", "1e-2", "--save_strategy", "no", "--report_to", "none", "--logging_steps", "5"]


def recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", os.path.join(ROOT, "recipes", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet_lt")
    return str(imagenet_lt_folder(str(root / "data"), IMAGE_COUNTS)), tiny_vit(str(root / "vit"))


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_lt")
    return text_csv(str(root / "train.csv"), TEXT_COUNTS), tiny_bert(str(root / "bert"))


def image_args(image_data, out, *extra):
    data, vit = image_data
    return ["--image_root", data, "--model_name_or_path", vit, "--num_labels", "4", "--output_dir", str(out), *FAST, *extra]


def text_args(text_data, out, *extra):
    csv, bert = text_data
    return ["--train_file", csv, "--text_column", "sentence", "--label_column", "topic", "--holdout_per_class", "3",
            "--model_name_or_path", bert, "--output_dir", str(out), *FAST, *extra]


def card_yaml(folder) -> dict:
    text = open(os.path.join(folder, "README.md")).read()
    assert text.startswith("---\n") and "More information needed" not in text
    return yaml.safe_load(text.split("---\n")[1])


def predictions(model_dir: str, inputs: dict) -> np.ndarray:
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    auto = AutoModelForImageClassification if "pixel_values" in inputs else AutoModelForSequenceClassification
    model = auto.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(**inputs).logits.numpy()


def test_vit_recipe_end_to_end(image_data, tmp_path):
    out = tmp_path / "vit_run"
    result = recipe("vit_imagenet_lt").main(image_args(image_data, out, "--report_to", "tensorboard"))
    before, after = result["before"], result["after"]
    assert before["mean_recall"] > 1 / len(IMAGE_COUNTS) + 0.1  # stage 1 learned the colours
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "README.md", "test_results.json",
                 "per_class_recall.png", "gain_matrix.png", "sampling_distribution.png"):
        assert (out / name).is_file(), name
    assert (out / "_stage1" / "model.safetensors").is_file()
    saved = json.load(open(out / "test_results.json"))
    assert saved["test_min_recall"] == pytest.approx(after["min_recall"])
    config = json.load(open(out / "config.json"))
    assert [s["method"] for s in config["selmix_hf_stages"]] == ["logit_adjusted", "selmix"]
    assert config["selmix_hf_stages"][1]["settings"]["steps"] == 12
    meta = card_yaml(out)
    metrics = {m["type"]: m for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["min_recall"]["value"] == pytest.approx(after["min_recall"], abs=1e-4)
    assert metrics["min_recall"]["config"] == "min_recall" and "optimised" in metrics["min_recall"]["name"]
    assert meta["pipeline_tag"] == "image-classification"
    # the figures also went to TensorBoard: G and P at every refresh, the per-class recall at the end
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for folder, _, files in os.walk(out / "runs"):
        if any(f.startswith("events") for f in files):
            events = EventAccumulator(folder, size_guidance={"images": 0})
            events.Reload()
            tags |= set(events.Tags()["images"])
    assert {"selmix/gains", "selmix/distribution", "per_class_recall"} <= tags


def test_vit_recipe_runs_a_timm_model_with_timms_own_transforms(image_data, tmp_path):
    data, _ = image_data
    timm_model = tiny_timm(str(tmp_path / "timm"))
    out = tmp_path / "timm_run"
    args = image_args((data, timm_model), out)
    result = recipe("vit_imagenet_lt").main(args)
    assert type(result["trainer"].model).__name__ == "TimmWrapperForImageClassification"
    assert [s["method"] for s in json.load(open(out / "config.json"))["selmix_hf_stages"]] == ["logit_adjusted", "selmix"]
    assert card_yaml(out)["pipeline_tag"] == "image-classification"
    from transformers import AutoImageProcessor

    assert type(AutoImageProcessor.from_pretrained(out)).__name__ == "TimmWrapperImageProcessor"  # transforms kept


def test_text_recipe_end_to_end_with_string_labels(text_data, tmp_path):
    out = tmp_path / "text_run"
    result = recipe("bert_text_lt").main(text_args(text_data, out, "--card_license", "apache-2.0",
                                                   "--card_language", "en"))
    assert result["before"]["mean_recall"] > 1 / len(TEXT_COUNTS) + 0.1
    config = json.load(open(out / "config.json"))
    assert config["id2label"] == {"0": "topic_a", "1": "topic_b", "2": "topic_c", "3": "topic_d"}
    meta = card_yaml(out)
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"]
    card = open(out / "README.md").read()
    for name, count in zip(["topic_a", "topic_b", "topic_c", "topic_d"], TEXT_COUNTS):
        assert f"| {name} | {count - 6} |" in card  # per-class table with training counts (3 + 3 held out)
    assert "imbalance ratio" in card and "SelMix" in card and "ramasubramanian2024selmix" in card
    # the saved model and tokenizer reproduce the trainer's test predictions
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    inputs = tokenizer(["apple pear plum apple dog", "car bus train car red"], return_tensors="pt", padding=True)
    logits = predictions(str(out), dict(inputs))
    trainer_logits = result["trainer"].model.eval()(**{k: v for k, v in inputs.items()}).logits.detach().numpy()
    np.testing.assert_allclose(logits, trainer_logits, atol=1e-5)


@pytest.mark.parametrize("variant", ["stage2_only", "stage1_only", "from_stage1_checkpoint"])
def test_either_stage_can_be_skipped(variant, text_data, tmp_path):
    out = tmp_path / variant
    extra = {"stage2_only": ["--run_stage1", "false"], "stage1_only": ["--run_stage2", "false"]}.get(variant, [])
    if variant == "from_stage1_checkpoint":
        first = tmp_path / "first"
        recipe("bert_text_lt").main(text_args(text_data, first, "--run_stage2", "false"))
        extra = ["--stage1_checkpoint", str(first)]
    result = recipe("bert_text_lt").main(text_args(text_data, out, *extra))
    methods = [s["method"] for s in json.load(open(out / "config.json"))["selmix_hf_stages"]]
    expected = {"stage2_only": ["selmix"], "stage1_only": ["logit_adjusted"],
                "from_stage1_checkpoint": ["logit_adjusted", "selmix"]}[variant]
    assert methods == expected
    assert (result["before"] is not None) == (variant == "from_stage1_checkpoint")
    assert (out / "README.md").is_file() and (out / "model.safetensors").is_file()
    assert (out / "gain_matrix.png").is_file() == (variant != "stage1_only")


@pytest.mark.slow
def test_resumed_run_continues_where_it_stopped(text_data, tmp_path):
    out = tmp_path / "resumed"
    common = ["--save_strategy", "steps", "--save_steps", "6"]
    recipe("bert_text_lt").main(text_args(text_data, out, *common))  # stage 2 stops at step 12 (checkpoint-12)
    stage1_weights = os.path.getmtime(out / "_stage1" / "model.safetensors")
    recipe("bert_text_lt").main(text_args(text_data, out, *common, "--max_steps", "18", "--resume_from_checkpoint", "true"))
    assert os.path.getmtime(out / "_stage1" / "model.safetensors") == stage1_weights  # stage 1 was not redone
    state = json.load(open(out / "checkpoint-18" / "trainer_state.json"))
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert state["global_step"] == 18 and steps == sorted(set(steps))  # one history, no step trained twice


@pytest.mark.slow
def test_two_processes_with_accelerate_launch(text_data, tmp_path):
    out = tmp_path / "two_ranks"
    # accelerate's multi-process launcher; with no GPU the processes talk over gloo (--use_cpu true in FAST)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
               "1", "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(ROOT, "recipes", "bert_text_lt.py"),
               *text_args(text_data, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world size 2" in done.stdout and done.stdout.count("test metrics (") == 1  # printed once
    stages = json.load(open(out / "config.json"))["selmix_hf_stages"]
    assert stages[1]["settings"]["pairs per step"] == 2 * 4  # two processes of 4 pairs
    assert stages[0]["settings"]["samples per step"] == 2 * 16
    assert card_yaml(out)["model-index"][0]["results"][0]["metrics"]


# -- bad input --------------------------------------------------------------------------------------------------
def test_missing_split_file_is_named(image_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="ImageNet_LT_test_missing.txt"):
        recipe("vit_imagenet_lt").main(image_args(image_data, tmp_path / "o", "--test_split_file", "ImageNet_LT_test_missing.txt"))


def test_missing_image_is_named(image_data, tmp_path):
    data, vit = image_data
    broken = tmp_path / "broken"
    broken.mkdir()
    for split in ("train", "val", "test"):
        lines = open(os.path.join(data, f"ImageNet_LT_{split}.txt")).read()
        if split == "val":
            lines += "images/n000/not_there.png 0\n"
        (broken / f"ImageNet_LT_{split}.txt").write_text(lines)
    with pytest.raises(FileNotFoundError, match=r"ImageNet_LT_val.txt:\d+: image .*not_there.png does not exist"):
        recipe("vit_imagenet_lt").main(image_args(image_data, tmp_path / "o", "--splits_dir", str(broken)))


def test_label_out_of_range_is_named_with_its_line(image_data, tmp_path):
    data, vit = image_data
    first_of_class_3 = sum(IMAGE_COUNTS[:3]) + 1
    with pytest.raises(ValueError, match=rf"ImageNet_LT_train.txt:{first_of_class_3}: label 3 is outside 0 .. 2"):
        recipe("vit_imagenet_lt").main(image_args(image_data, tmp_path / "o", "--num_labels", "3"))


def test_unknown_config_key_is_named(text_data, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("objective: min_recall\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match="unknown key.*learning_rat"):
        recipe("bert_text_lt").main(["--config", str(config), *text_args(text_data, tmp_path / "o")])


def test_unknown_command_line_flag_is_named(text_data, tmp_path):
    with pytest.raises(ValueError, match="--no_such_flag"):
        recipe("bert_text_lt").main(text_args(text_data, tmp_path / "o", "--no_such_flag", "1"))


def test_unknown_objective_lists_the_valid_names(text_data, tmp_path):
    with pytest.raises(ValueError, match="min_recall"):
        recipe("bert_text_lt").main(text_args(text_data, tmp_path / "o", "--objective", "worst_recall"))


def test_shipped_configs_only_use_known_keys():
    for name in ("vit_imagenet_lt", "bert_text_lt"):
        module = recipe(name)
        values = yaml.safe_load(open(module.DEFAULT_CONFIG))
        parsed = module.parse_recipe_arguments(
            tuple(t for t in (getattr(module, n, None) for n in ("ModelArguments", "ImageDataArguments",
                                                                  "TextDataArguments")) if t)
            + (module.SelMixConfig, module.StageArguments, module.CardArguments), ["--use_cpu", "true"],
            module.DEFAULT_CONFIG,
        )
        flat = {k: v for part in parsed for k, v in vars(part).items()}
        for key in ("objective", "learning_rate", "stage1_learning_rate", "max_steps"):
            assert flat[key] == values[key]


# -- publishing -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_push_to_hub_uploads_a_loadable_model_with_its_card(image_data, tmp_path):
    """The ViT recipe with --push_to_hub against a local Hub on 127.0.0.1 (HF_ENDPOINT, dummy token)."""
    from PIL import Image

    from hub_server import LocalHub

    out = tmp_path / "pushed_run"
    with LocalHub(tmp_path / "hub") as hub:
        command = [sys.executable, os.path.join(ROOT, "recipes", "vit_imagenet_lt.py"),
                   *image_args(image_data, out, "--push_to_hub", "true", "--hub_model_id", "user/vit-lt",
                               "--card_license", "apache-2.0")]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=str(tmp_path),
                              env=hub.client_env(tmp_path / "hf_home"))
        assert done.returncode == 0, done.stderr[-3000:] + f"\nhub log: {hub.log}"
        assert not hub.unhandled
        repo = hub.repo_dir("user/vit-lt")
        uploaded = {p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()}
        assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md",
                "per_class_recall.png", "test_results.json"} <= uploaded
        assert not any(name.startswith(("_stage1", "checkpoint-")) for name in uploaded)
        assert any("selmix-hf" in commit.message for commit in hub.commits("user/vit-lt"))
    meta = card_yaml(repo)
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    local = json.load(open(out / "test_results.json"))
    assert metrics["min_recall"] == pytest.approx(local["test_min_recall"], abs=1e-4)
    assert meta["license"] == "apache-2.0" and "user/vit-lt" in open(repo / "README.md").read()
    # the uploaded files alone reproduce the trained model's predictions on test images
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(repo)
    data, _ = image_data
    paths = [line.split()[0] for line in open(os.path.join(data, "ImageNet_LT_test.txt"))][::3]
    images = [Image.open(os.path.join(data, p)).convert("RGB") for p in paths]
    inputs = dict(processor(images, return_tensors="pt"))
    np.testing.assert_allclose(predictions(str(repo), inputs), predictions(str(out), inputs), atol=1e-6)
