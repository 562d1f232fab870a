"""The main job (`make demo`): gain-driven mixup must lift the worst class on held-out data."""

import importlib.util
import pathlib

DEMO = pathlib.Path(__file__).resolve().parent.parent / "examples" / "engine_demo.py"


def load_demo():
    spec = importlib.util.spec_from_file_location("engine_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_selmix_beats_its_start_and_uniform_mixup_on_min_recall():
    reports = load_demo().run(["--quiet", "--seed", "0"])
    start, uniform, selmix = (reports[name]["min_recall"] for name in ("CE head", "uniform mixup", "SelMix"))
    assert selmix > start + 0.3
    assert selmix > uniform + 0.05
