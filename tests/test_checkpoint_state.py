"""Trainer state in checkpoints: safetensors + JSON round trips, no code run on load, old pickles read safely."""

import math
import os

import pytest
import torch

from selmix_hf.checkpoint_state import load_state, save_state


def optimiser_state() -> dict:
    parameter = torch.nn.Parameter(torch.randn(3))
    optimiser = torch.optim.Adam([parameter], lr=0.1, betas=(0.8, 0.99))
    parameter.grad = torch.ones(3)
    optimiser.step()
    return optimiser.state_dict()  # int keys, tuples, tensors and floats


def test_every_kind_of_state_comes_back_equal(tmp_path):
    state = {
        "optimizer": optimiser_state(),
        "generator": torch.Generator().manual_seed(3).get_state(),
        "nothing": None,
        "nested": (1, (2.5, "x"), [True, None]),
        "empty": torch.zeros(0),
        "half": torch.ones(2, dtype=torch.bfloat16),
        "flags": torch.tensor([True, False]),
        "nan": float("nan"),
        "big": 2**62,
        "a.b": torch.zeros(2),
        "a": {"b": torch.ones(2)},  # the same dotted path as the key above: must not collide
        "__dunder": 1,
    }
    save_state(state, str(tmp_path), "s")
    assert sorted(os.listdir(tmp_path)) == ["s.json", "s.safetensors"]
    back = load_state(str(tmp_path), "s")
    assert back["optimizer"]["state"][0]["step"] == state["optimizer"]["state"][0]["step"]
    torch.testing.assert_close(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.99)
    assert torch.equal(back["generator"], state["generator"])
    assert back["nothing"] is None and back["nested"] == (1, (2.5, "x"), [True, None])
    assert back["empty"].shape == (0,) and back["half"].dtype == torch.bfloat16 and back["flags"].tolist() == [1, 0]
    assert math.isnan(back["nan"]) and back["big"] == 2**62 and back["__dunder"] == 1
    assert back["a.b"].tolist() == [0.0, 0.0] and back["a"]["b"].tolist() == [1.0, 1.0]
    torch.optim.Adam([torch.nn.Parameter(torch.randn(3))], lr=0.1).load_state_dict(back["optimizer"])


def test_an_unstorable_value_is_named(tmp_path):
    with pytest.raises(TypeError, match=r"cannot store a object at state\.inner\.thing"):
        save_state({"inner": {"thing": object()}}, str(tmp_path), "s")
    assert not os.path.exists(tmp_path / "s.json")


def test_an_old_pickled_state_is_read_only_when_it_holds_plain_data(tmp_path):
    torch.save({"gains": torch.ones(2), "history": [0.5]}, tmp_path / "plain.pt")
    assert load_state(str(tmp_path), "plain")["history"] == [0.5]

    class Executes:
        def __reduce__(self):
            return (os.system, ("echo pickle ran code",))

    torch.save({"payload": Executes()}, tmp_path / "code.pt")
    with pytest.raises(ValueError, match="old pickle format that cannot be read safely"):
        load_state(str(tmp_path), "code")


def test_a_file_that_is_not_a_state_is_refused(tmp_path):
    (tmp_path / "s.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="is not a selmix-hf trainer state"):
        load_state(str(tmp_path), "s")
    with pytest.raises(FileNotFoundError):
        load_state(str(tmp_path), "missing")
