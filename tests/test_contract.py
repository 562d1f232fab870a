"""The drop-in contract, one table of trainers x shared checks: every selmix-hf trainer is a row (PEFT style).

Checks: gradient accumulation equals the large batch (weights and the method's own state), exact resume at batch
sizes that are not powers of two, two ranks, NaN / inf behaviour, bad configuration errors, label columns and
model outputs as `Trainer` accepts them, `load_best_model_at_end` and the card written after it.
A new trainer adds a `Subject` to SUBJECTS; it does not copy these tests.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))
from tiny import (  # noqa: E402
    ListDataset,
    TinyMLPConfig,
    TinyMLPForClassification,
    fsdp_on_cpu_ranks,
    gaussian_problem,
    run_rank,
    two_cpu_ranks,
)
from transformers import BertConfig, BertModel, TrainerCallback, TrainingArguments  # noqa: E402

from selmix_hf import (  # noqa: E402
    AutoBalanceConfig,
    AutoBalanceTrainer,
    FixMatchConfig,
    FixMatchTrainer,
    LongTailConfig,
    LongTailTrainer,
    SelMixConfig,
    SelMixTrainer,
    make_compute_metrics,
)
from selmix_hf.checkpoint_state import load_state  # noqa: E402
from selmix_hf.nonfinite import NonFiniteError  # noqa: E402
from selmix_hf.validation import gathered_validation_pass  # noqa: E402
from selmix_hf.views import Views, identity_view  # noqa: E402

K = 4
TRAIN_COUNTS = [40, 30, 20, 10]
VALIDATION_COUNTS = [6, 5, 5, 5]  # 21: the last round of a two-rank gather is padded
UNLABELED_COUNTS = [9, 8, 8, 8]  # 33: odd, so a two-rank pass over the pool is padded too
UNTRAINED_CONFIDENCE = 0.2525  # the tiny untrained MLP's top probabilities lie in 0.250-0.255: a threshold that cuts


def jitter(batch: dict[str, Any], seeds: torch.Tensor) -> dict[str, Any]:
    """A strong view of the tiny features: Gaussian noise drawn from each sample's seed."""
    x = batch["features"]
    noise = [torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return {**batch, "features": x + 0.5 * torch.stack(noise).to(x)}


@dataclass
class Subject:
    """One trainer of the library: how to configure it, and which of its state must match across runs and ranks."""

    name: str
    trainer: type
    config: type
    settings: dict[str, Any]
    shared_state: Callable[[Any], dict[str, torch.Tensor]]  # identical on every rank, and across equivalent runs
    wrongly_typed: tuple[str, Any]  # a field of its own config and a value of the wrong type
    unused_settings: set[str] = field(default_factory=set)  # config fields that do nothing in this row's run
    trainer_kwargs: Callable[[], dict[str, Any]] = dict  # extra arguments of the trainer (fresh for every build)
    reads_validation: bool = True  # the trainer passes over the validation set while it trains


SUBJECTS = [
    Subject(
        "selmix",
        SelMixTrainer,
        SelMixConfig,
        {"gain_refresh_steps": 2, "objective": "min_recall"},
        lambda t: {"gains": t.gains, "distribution": t.distribution, **t.objective.multipliers()},
        ("gain_refresh_steps", "2"),
        unused_settings=set(SelMixConfig.SEMI_SUPERVISED_FIELDS),  # no unlabelled pool in this row
    ),
    Subject(  # each refresh reads a fresh stratified sample of validation: 5 per class, so class 0 loses one of 6
        "selmix-validation-sample",
        SelMixTrainer,
        SelMixConfig,
        {"gain_refresh_steps": 2, "objective": "min_recall", "validation_refresh_per_class": 5},
        lambda t: {"gains": t.gains, "distribution": t.distribution, **t.objective.multipliers()},
        ("validation_refresh_per_class", 2.5),
        unused_settings=set(SelMixConfig.SEMI_SUPERVISED_FIELDS),
    ),
    Subject(  # a group objective: pairs drawn between the (class, group) cells of the validation set
        "selmix-groups",
        SelMixTrainer,
        SelMixConfig,
        {"gain_refresh_steps": 2, "objective": "worst_group_accuracy", "group_column": "group"},
        lambda t: {"gains": t.gains, "distribution": t.distribution, **t.objective.multipliers()},
        ("gain_refresh_steps", "2"),
        unused_settings=set(SelMixConfig.SEMI_SUPERVISED_FIELDS),
    ),
    Subject(  # semi-supervised: partners from a pool (whose own labels are dropped), anchors from its confident part
        "selmix-unlabeled",
        SelMixTrainer,
        SelMixConfig,
        {
            "gain_refresh_steps": 2,
            "objective": "min_recall",
            "partners": "mixed",
            "unlabeled_ratio": 0.5,
            "pseudo_label_threshold": UNTRAINED_CONFIDENCE,
            "unlabeled_anchors": True,
        },
        lambda t: {
            "gains": t.gains,
            "distribution": t.distribution,
            "pseudo_labels": t.pseudo_labels,
            **t.objective.multipliers(),
        },
        ("plateau_window", 2.5),
        trainer_kwargs=lambda: {"unlabeled_dataset": gaussian_problem(UNLABELED_COUNTS, seed=3)},
    ),
    Subject(  # as published (every pool sample may be a partner) but each refresh pseudo-labels 21 of the 33
        "selmix-unlabeled-subset",
        SelMixTrainer,
        SelMixConfig,
        {"gain_refresh_steps": 2, "objective": "min_recall", "partners": "unlabeled", "unlabeled_refresh_size": 21},
        lambda t: {"gains": t.gains, "distribution": t.distribution, "pseudo_labels": t.pseudo_labels},
        ("unlabeled_refresh_size", 2.5),
        unused_settings={"unlabeled_ratio"},  # partners="unlabeled": no mix to weigh
        trainer_kwargs=lambda: {"unlabeled_dataset": gaussian_problem(UNLABELED_COUNTS, seed=3)},
    ),
    Subject(  # partners of each pseudo-class from the pool at its estimated precision: a per-class share per refresh
        "selmix-by-precision",
        SelMixTrainer,
        SelMixConfig,
        {"gain_refresh_steps": 2, "objective": "min_recall", "partners": "by_precision"},
        lambda t: {"gains": t.gains, "pseudo_labels": t.pseudo_labels, "pool_precision": t.pool_precision},
        ("plateau_window", "10"),
        unused_settings={"unlabeled_ratio"},
        trainer_kwargs=lambda: {"unlabeled_dataset": gaussian_problem(UNLABELED_COUNTS, seed=3)},
    ),
    Subject(
        "longtail-cost-sensitive",
        LongTailTrainer,
        LongTailConfig,
        {"loss_type": "cost_sensitive", "validation_refresh_steps": 2},
        lambda t: dict(t.loss_fn.state_dict()),
        ("validation_refresh_steps", 2.5),
    ),
    Subject(  # GroupDRO over (class, group) cells: online group weights moved once per optimiser step
        "longtail-group-dro",
        LongTailTrainer,
        LongTailConfig,
        {"loss_type": "group_dro", "loss_options": {"step_size": 0.5}, "group_column": "group"},
        lambda t: {"group_weight": t.loss_fn.group_weight},
        ("validation_refresh_steps", "2"),
        unused_settings={"validation_refresh_steps", "validation_refresh_per_class"},
        reads_validation=False,
    ),
    Subject(  # the cost-sensitive loss of a group objective: a gain row per (class, group) cell of validation
        "longtail-cost-sensitive-groups",
        LongTailTrainer,
        LongTailConfig,
        {
            "loss_type": "cost_sensitive",
            "loss_options": {"objective": "worst_group_accuracy"},
            "validation_refresh_steps": 2,
            "group_column": "group",
        },
        lambda t: dict(t.loss_fn.state_dict()),
        ("validation_refresh_steps", 2.5),
    ),
    Subject(  # AutoBalance's group-sensitive loss (Delta, l per group and class) for worst-group accuracy
        "autobalance-groups",
        AutoBalanceTrainer,
        AutoBalanceConfig,
        {
            "hyper_update_steps": 2,
            "hyper_batches": 2,
            "neumann_lr": 0.1,
            "hyper_learning_rate": 0.1,
            "group_column": "group",
            "upper_objective": "worst_group_accuracy",
        },
        lambda t: {
            **{f"theta{i}": p for i, p in enumerate(t.hyperparameters)},
            **t.upper_objective.multipliers(),
        },
        ("hyper_update_steps", "two"),
        unused_settings={"validation_refresh_steps"},
    ),
    Subject(  # FixMatch-LA over the same pool; cost-sensitive so that it also refreshes from validation data
        "fixmatch",
        FixMatchTrainer,
        FixMatchConfig,
        {
            "loss_type": "cost_sensitive",
            "validation_refresh_steps": 2,
            "mu": 2,
            "confidence_threshold": UNTRAINED_CONFIDENCE,
            "ema_decay": 0.9,
            "lambda_u": 0.1,  # the untrained model's pseudo-labels are one class: keep them from dominating
        },
        lambda t: {**t.loss_fn.state_dict(), **(t.average.weights if t.average is not None else {})},
        ("mu", 2.5),
        trainer_kwargs=lambda: {
            "unlabeled_dataset": gaussian_problem(UNLABELED_COUNTS, seed=3),
            "views": Views(weak=identity_view, strong=jitter),
        },
    ),
    Subject(
        "autobalance",
        AutoBalanceTrainer,
        AutoBalanceConfig,
        {"hyper_update_steps": 2, "hyper_batches": 2, "neumann_lr": 0.1, "hyper_learning_rate": 0.1},
        lambda t: {f"theta{i}": p for i, p in enumerate(t.hyperparameters)},
        ("hyper_update_steps", "two"),
        unused_settings={"validation_refresh_steps"},  # the search refreshes every hyper_update_steps
    ),
]
ids = [s.name for s in SUBJECTS]


class WithGroups(torch.utils.data.Dataset):
    """A view of a dataset whose examples also carry a group id, alternating 0, 1 by index (both groups in every
    class), for the rows whose config sets group_column; mutations of the wrapped dataset show through."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], "group": i % 2}


def with_groups(subject: Subject, dataset: Any) -> Any:
    """The dataset as the subject reads it: with a group column when the subject's config names one."""
    column = subject.settings.get("group_column")
    return WithGroups(dataset) if column and hasattr(dataset, "__len__") else dataset  # a stream stays one


def build(
    subject: Subject,
    out: str,
    *,
    model: Any = None,
    train: Any = None,
    validation: Any = None,
    callbacks: list | None = None,
    compute_metrics: Any = None,
    data_collator: Any = None,
    trainer_kwargs: dict[str, Any] | None = None,
    **overrides: Any,
) -> Any:
    """The subject's trainer over a tiny MLP on Gaussian classes, seeded so that two builds are identical."""
    torch.manual_seed(0)
    settings = dict(
        output_dir=out,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        logging_strategy="no",
        per_device_train_batch_size=4,
        per_device_eval_batch_size=5,
        max_steps=6,
        optim="sgd",
        learning_rate=0.1,
        lr_scheduler_type="constant",
        seed=0,
    )
    args = subject.config(**{**settings, **subject.settings, **overrides})
    model = model if model is not None else TinyMLPForClassification(TinyMLPConfig(num_labels=K))
    return subject.trainer(
        **{**subject.trainer_kwargs(), **(trainer_kwargs or {})},
        model=model,
        args=args,
        callbacks=callbacks,
        compute_metrics=compute_metrics,
        data_collator=data_collator,
        train_dataset=with_groups(subject, train if train is not None else gaussian_problem(TRAIN_COUNTS, seed=1)),
        eval_dataset=with_groups(
            subject, validation if validation is not None else gaussian_problem(VALIDATION_COUNTS, seed=2)
        ),
    )


def assert_same(a: Any, b: Any, where: str = "state", skip: tuple[str, ...] = (), **tolerance: Any) -> None:
    """Nested states equal: tensors within tolerance, everything else exactly (keys in ``skip`` not compared)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a, b, msg=where, **tolerance)
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            if key not in skip:
                assert_same(a[key], b[key], f"{where}.{key}", skip, **tolerance)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]", skip, **tolerance)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=tolerance.get("rtol", 1e-7), abs=tolerance.get("atol", 1e-9)), where
    else:
        assert a == b, where


def weights(trainer: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


# -- gradient accumulation ------------------------------------------------------------------------------
@pytest.mark.parametrize("subject", SUBJECTS, ids=ids)
def test_gradient_accumulation_equals_the_large_batch(subject, tmp_path):
    logs = dict(logging_strategy="steps", logging_steps=1)
    whole = build(subject, str(tmp_path / "whole"), per_device_train_batch_size=8, **logs)
    split = build(
        subject, str(tmp_path / "split"), per_device_train_batch_size=2, gradient_accumulation_steps=4, **logs
    )
    whole.train()
    split.train()
    tolerance = dict(rtol=1e-5, atol=1e-6)
    losses = [[log["loss"] for log in t.state.log_history if "loss" in log] for t in (whole, split)]
    assert len(losses[0]) == 6
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)  # the logged loss is not scaled by the accumulation
    assert_same(weights(whole), weights(split), "weights", **tolerance)
    assert_same(subject.shared_state(whole), subject.shared_state(split), "method state", **tolerance)
    # the whole checkpoint state too (random streams included), but for counters of micro-batches
    assert_same(whole.method_state(), split.method_state(), "checkpoint state", skip=("batches_drawn",), **tolerance)


# -- resume ---------------------------------------------------------------------------------------------
class Crash(TrainerCallback):
    """Interrupts a run at a given step, after its checkpoints up to then were written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("batch_size", [3, 5])
@pytest.mark.parametrize("subject", SUBJECTS, ids=ids)
def test_resume_continues_exactly_where_the_run_stopped(subject, batch_size, tmp_path):
    save = dict(save_strategy="steps", save_steps=3, max_steps=7, per_device_train_batch_size=batch_size)
    straight = build(subject, str(tmp_path / "straight"), **save)
    straight.train()
    out = str(tmp_path / "interrupted")
    with pytest.raises(KeyboardInterrupt):
        build(subject, out, callbacks=[Crash(5)], **save).train()
    checkpoint = os.path.join(out, "checkpoint-3")
    files = os.listdir(checkpoint)
    state_files = [f for f in files if f.startswith(subject.trainer.state_stem)]
    assert sorted(state_files) == [
        f"{subject.trainer.state_stem}_rank0.json",
        f"{subject.trainer.state_stem}_rank0.safetensors",
    ]
    assert not [f for f in files if f.endswith((".pt", ".pkl", ".bin")) and "state" in f and "trainer" not in f]
    resumed = build(subject, out, **save)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 7
    assert_same(weights(straight), weights(resumed), "weights")
    assert_same(straight.method_state(), resumed.method_state(), "checkpoint state")


def test_old_pickled_state_is_read_only_without_code(tmp_path):
    subject = SUBJECTS[0]
    trainer = build(subject, str(tmp_path / "run"), save_strategy="steps", save_steps=2, max_steps=2)
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    stem = f"{subject.trainer.state_stem}_rank0"
    (checkpoint / f"{stem}.json").unlink()
    (checkpoint / f"{stem}.safetensors").unlink()

    class Executes:
        def __reduce__(self):
            return (print, ("pickle ran code",))

    torch.save({"payload": Executes()}, checkpoint / f"{stem}.pt")
    with pytest.raises(ValueError, match="old pickle format"):
        build(subject, str(tmp_path / "run"), max_steps=4).train(resume_from_checkpoint=str(checkpoint))


# -- two ranks ------------------------------------------------------------------------------------------
# FSDP2 settings of the sharded rows: the tiny MLP's linear layers each a unit. FSDP1 through accelerate does not
# start on CPU (torch rejects the device accelerate passes as device_id); tests/test_sharding.py runs the FSDP1
# wrapper itself on two ranks (head read, hook, mixing, step, bias edit).
SHARDING = {
    "ddp": {},
    "ddp-as-sharded": {},  # DDP with the sharded rows' settings: what they are compared with
    "fsdp2": {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": True, "min_num_params": 1}},
}
SHARDED_SETTINGS = {"fixmatch": {"ema_decay": None}}  # an EMA of sharded weights is refused (tested elsewhere)


def two_rank_run(name: str, out_dir: str, engine: str = "ddp") -> None:
    """One rank of a two-process run of a subject under DDP or FSDP (launched by torchrun from the tests below)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    subject = next(s for s in SUBJECTS if s.name == name)
    sharded = {**SHARDING[engine], **(SHARDED_SETTINGS.get(name, {}) if engine != "ddp" else {})}
    if engine.startswith("fsdp"):
        fsdp_on_cpu_ranks()
    trainer = build(
        subject, f"{out_dir}/run", max_steps=4, posthoc_objective="min_recall", posthoc_confidence=0.5, **sharded
    )
    assert dist.is_initialized() and dist.get_world_size() == 2 and trainer.args.world_size == 2
    assert trainer.is_fsdp_enabled == engine.startswith("fsdp")
    trainer.train()
    _, logits, labels = trainer.validation_pass()
    pool = getattr(trainer, "unlabeled_dataset", None)
    pool_logits = torch.zeros(0) if pool is None else gathered_validation_pass(trainer, pool, labelled=False)[1].cpu()
    rule = trainer.fit_posthoc(kind="offsets")  # after the pass above: it must not see the folded offsets
    torch.save(
        {
            "rank": trainer.args.process_index,
            "steps": trainer.state.global_step,
            "weights": whole_weights(trainer, engine),
            "shared": copy.deepcopy(subject.shared_state(trainer)),
            "validation_labels": labels.cpu(),
            # the confusion counts of the last refresh (a row per (class, group) cell for a group objective)
            "confusion_counts": getattr(trainer, "last_confusion_counts", None),
            "validation_logits": logits.cpu(),
            "pool_logits": pool_logits,
            "posthoc": {"offsets": rule.offsets, **{k: torch.tensor(v) for k, v in rule.estimates.items()}},
            "posthoc_stage": trainer.model.config.selmix_hf_stages[-1]["description"],
        },
        f"{out_dir}/rank{trainer.args.process_index}.pt",
    )


@pytest.mark.slow
@pytest.mark.parametrize("subject", SUBJECTS, ids=ids)
def test_two_ranks_agree_and_count_each_validation_sample_once(subject, tmp_path):
    result = two_cpu_ranks(__file__, subject.name, str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["steps"] == 4 for r in ranks)
    assert_same(ranks[0]["weights"], ranks[1]["weights"], "replicas")
    assert_same(ranks[0]["shared"], ranks[1]["shared"], "method state", rtol=0, atol=0)
    per_class = subject.settings.get("validation_refresh_per_class")  # a refresh's sample: min(n, count) per class
    refreshed = [min(per_class, c) for c in VALIDATION_COUNTS] if per_class else VALIDATION_COUNTS
    for r in ranks:  # the padded duplicates of the last round are dropped: 21 samples (or the sample's), each once
        assert torch.bincount(r["validation_labels"], minlength=K).tolist() == refreshed
        if r["confusion_counts"] is not None:  # each validation sample counted once in the refresh, in its row
            rows = r["confusion_counts"].sum(1).tolist()
            assert sum(rows) == sum(refreshed)
            if subject.settings.get("group_column"):  # cells (class, index % 2) of the 21 samples
                assert rows == [3, 3, 3, 2, 2, 3, 3, 2]
    assert_same(ranks[0]["confusion_counts"], ranks[1]["confusion_counts"], "confusion counts")
    torch.testing.assert_close(ranks[0]["validation_logits"], ranks[1]["validation_logits"])
    if "unlabeled_dataset" in subject.trainer_kwargs():  # the pool's padded duplicates are dropped too: 33, each once
        assert all(len(r["pool_logits"]) == sum(UNLABELED_COUNTS) for r in ranks)
        torch.testing.assert_close(ranks[0]["pool_logits"], ranks[1]["pool_logits"])
    assert_same(ranks[0]["posthoc"], ranks[1]["posthoc"], "post-hoc rule", rtol=0, atol=0)
    assert all("21 validation samples" in r["posthoc_stage"] for r in ranks)  # each sample once in the fit


# by_precision: the pool path again; validation-sample: the same refresh as selmix's over fewer samples
SHARDED_SUBJECTS = [s for s in SUBJECTS if s.name not in ("selmix-by-precision", "selmix-validation-sample")]


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory):
    """Each subject's two-rank DDP run with the sharded rows' settings, run once per module."""
    runs: dict[str, list[dict]] = {}

    def run(name: str) -> list[dict]:
        if name not in runs:
            folder = tmp_path_factory.mktemp(f"ddp-{name}")
            result = two_cpu_ranks(__file__, name, str(folder), "ddp-as-sharded")
            assert result.returncode == 0, result.stderr[-4000:]
            runs[name] = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(2)]
        return runs[name]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("subject", SHARDED_SUBJECTS, ids=[s.name for s in SHARDED_SUBJECTS])
def test_fsdp2_on_two_ranks_trains_as_ddp_does(subject, ddp_reference, tmp_path):
    """Sharded weights, the head read through the engine for refreshes and hypergradients, the offsets folded into a
    sharded bias: the run's weights, method state and post-hoc rule match DDP's."""
    result = two_cpu_ranks(__file__, subject.name, str(tmp_path), "fsdp2")
    assert result.returncode == 0, result.stderr[-4000:]
    sharded = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    reference = ddp_reference(subject.name)
    tolerance = dict(rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(sharded, reference):
        assert ours["steps"] == theirs["steps"] == 4
        assert_same(ours["weights"], theirs["weights"], "weights", **tolerance)
        assert_same(ours["shared"], theirs["shared"], "method state", **tolerance)
        assert_same(ours["posthoc"], theirs["posthoc"], "post-hoc rule", **tolerance)
        torch.testing.assert_close(ours["validation_logits"], theirs["validation_logits"], **tolerance)
        assert torch.equal(ours["validation_labels"], theirs["validation_labels"])


def whole_weights(trainer: Any, engine: str) -> dict[str, torch.Tensor]:
    """The model's weights by their unwrapped names, gathered whole under FSDP (a collective)."""
    from torch.distributed.fsdp import FSDPModule

    if engine == "fsdp2":
        for module in trainer.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()  # after a forward the root holds its parameters gathered, as plain tensors
    full = {n: p.full_tensor() if engine == "fsdp2" else p for n, p in trainer.model.named_parameters()}
    return {n: p.detach().clone() for n, p in full.items()}


def two_rank_nan_run(name: str, out_dir: str) -> None:
    """Rank 1's training samples turn NaN after step 2: both ranks must stop with an error, none may hang."""
    torch.set_num_threads(1)
    subject = next(s for s in SUBJECTS if s.name == name)
    rank = int(os.environ["RANK"])
    train = Poisoned(gaussian_problem(TRAIN_COUNTS, seed=1).examples, active=False)
    trainer = build(
        subject, f"{out_dir}/run", train=train, max_steps=8, callbacks=[Activate(train, 2)] if rank == 1 else []
    )
    try:
        trainer.train()
    except NonFiniteError as err:
        with open(f"{out_dir}/error{rank}.txt", "w") as fh:
            fh.write(str(err))
        raise


@pytest.mark.slow
@pytest.mark.parametrize("subject", SUBJECTS, ids=ids)
def test_a_nan_on_one_rank_stops_both(subject, tmp_path):
    result = two_cpu_ranks(__file__, subject.name, str(tmp_path), "nan")
    assert result.returncode != 0
    errors = [(tmp_path / f"error{r}.txt").read_text() for r in range(2)]
    assert "'features'" in errors[1] and "NaN or inf" in errors[1]
    assert "another process" in errors[0] or "'features'" in errors[0]


# -- NaN and inf ----------------------------------------------------------------------------------------
class Poisoned(ListDataset):
    """A dataset whose sample `index` holds NaN features once `active` (always, when active from the start)."""

    def __init__(self, examples: list[dict], index: int | None = None, active: bool = True) -> None:
        super().__init__(examples)
        self.index, self.active = index, active

    def __getitem__(self, i: int) -> dict:
        example = dict(self.examples[i])
        if self.active and (self.index is None or i == self.index):
            example["features"] = example["features"].clone()
            example["features"][0] = float("nan")
        return example


class Activate(TrainerCallback):
    def __init__(self, dataset: Poisoned, step: int) -> None:
        self.dataset, self.step = dataset, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.dataset.active = True


def checkpoint_files(folder: str) -> dict[str, bytes]:
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("subject", SUBJECTS, ids=ids)
def test_nan_in_training_inputs_stops_before_any_checkpoint_is_overwritten(subject, tmp_path):
    train = Poisoned(gaussian_problem(TRAIN_COUNTS, seed=1).examples, active=False)
    out = str(tmp_path / "run")
    trainer = build(
        subject, out, train=train, callbacks=[Activate(train, 3)], save_strategy="steps", save_steps=2, max_steps=8
    )
    saved: dict[str, dict[str, bytes]] = {}

    class Snapshot(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            name = f"checkpoint-{state.global_step}"
            saved[name] = checkpoint_files(os.path.join(out, name))

    trainer.add_callback(Snapshot())
    with pytest.raises(NonFiniteError) as error:
        trainer.train()
    message = str(error.value)
    assert "'features'" in message and "NaN or inf" in message and "Nothing was saved" in message
    assert f"step {trainer.state.global_step}" in message or f"step {trainer.state.global_step + 1}" in message
    assert "checkpoint-2" in saved and sorted(os.listdir(out)) == sorted(saved)  # nothing written after the error
    for name, files in saved.items():
        assert checkpoint_files(os.path.join(out, name)) == files
        weights_file = load_file(os.path.join(out, name, "model.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights_file.values())
    assert not os.path.exists(os.path.join(out, "autobalance_loss.json"))


@pytest.mark.parametrize("subject", SUBJECTS, ids=ids)
def test_nan_in_a_validation_input_is_named(subject, tmp_path):
    if not subject.reads_validation:
        pytest.skip(f"{subject.name} reads no validation data while it trains")
    validation = Poisoned(gaussian_problem(VALIDATION_COUNTS, seed=2).examples, index=7)
    trainer = build(subject, str(tmp_path / "run"), validation=validation)
    with pytest.raises(NonFiniteError, match=r"inputs \(features\) of validation sample 7 .*step 0"):
        trainer.train()
    assert not any(torch.isnan(p).any() for p in trainer.model.parameters())


def test_nan_weights_are_never_saved_as_a_checkpoint(tmp_path):
    trainer = build(
        next(s for s in SUBJECTS if s.name == "selmix-groups"),
        str(tmp_path / "run"),
        save_strategy="steps",
        save_steps=2,
        max_steps=2,
    )
    with torch.no_grad():
        trainer.model.classifier.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError):
        trainer.train()
    assert not os.path.exists(tmp_path / "run" / "checkpoint-2")


# -- configuration, labels, model outputs ----------------------------------------------------------------
@pytest.mark.parametrize("subject", SUBJECTS, ids=ids)
def test_bad_configuration_is_a_clear_error(subject, tmp_path):
    name, value = subject.wrongly_typed
    with pytest.raises(TypeError, match=rf"{subject.config.__name__}\.{name} must be int"):
        build(subject, str(tmp_path / "typed"), **{name: value})
    plain = TrainingArguments(output_dir=str(tmp_path / "plain"), use_cpu=True, report_to=[])
    with pytest.raises(TypeError, match=rf"needs args={subject.config.__name__}"):
        subject.trainer(
            model=TinyMLPForClassification(TinyMLPConfig(num_labels=K)),
            args=plain,
            train_dataset=gaussian_problem(TRAIN_COUNTS, seed=1),
        )
    headless = BertModel(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    with pytest.raises(ValueError, match="no classification head.*BertForSequenceClassification"):
        build(subject, str(tmp_path / "headless"), model=headless)
    with pytest.raises(ValueError, match="one label column"):
        build(subject, str(tmp_path / "labels"), label_names=["labels", "other"])
    if subject.reads_validation:
        with pytest.raises(ValueError, match=r"classes \[3\] have no sample in the validation set"):
            build(subject, str(tmp_path / "missing"), validation=gaussian_problem([5, 5, 5, 0], seed=2))


class Stream(torch.utils.data.IterableDataset):
    """The training samples as a torch stream (no len, no [i])."""

    def __iter__(self):
        return iter(gaussian_problem(TRAIN_COUNTS, seed=1).examples)


@pytest.mark.parametrize("subject", SUBJECTS, ids=ids)
@pytest.mark.parametrize("kind", ["torch", "datasets"])
def test_a_streamed_training_set_is_refused_naming_why_and_the_alternative(subject, kind, tmp_path):
    import datasets

    examples = [{"features": e["features"].tolist(), "labels": e["labels"]} for e in Stream()]
    stream = Stream() if kind == "torch" else datasets.Dataset.from_list(examples).to_iterable_dataset()
    with pytest.raises(TypeError, match="a stream, no len or") as error:
        build(subject, str(tmp_path / "run"), train=stream)
    assert subject.trainer.random_access_reason in str(error.value)
    assert "Dataset.from_generator" in str(error.value) and "streaming=True" in str(error.value)


@pytest.mark.parametrize("subject", SUBJECTS, ids=ids)
def test_label_smoothing_is_applied_or_refused(subject, tmp_path):
    if not subject.trainer.supports_label_smoothing:
        with pytest.raises(ValueError, match="label_smoothing_factor=0.2 is not applied"):
            build(subject, str(tmp_path / "refused"), label_smoothing_factor=0.2)
        return
    runs = {
        factor: build(subject, str(tmp_path / f"ls{factor}"), label_smoothing_factor=factor, max_steps=2)
        for factor in (0.0, 0.2)
    }
    losses = {factor: trainer.train().training_loss for factor, trainer in runs.items()}
    assert losses[0.0] != losses[0.2]
    with pytest.raises(AssertionError):  # smoothing changed the gradients, hence the weights
        assert_same(weights(runs[0.0]), weights(runs[0.2]))


def renamed(dataset: ListDataset, key: str) -> ListDataset:
    """The dataset with its label under ``key`` (a tensor for label_ids, which the default collator stacks)."""
    return ListDataset(
        [
            {"features": e["features"], key: torch.tensor(e["labels"]) if key == "label_ids" else e["labels"]}
            for e in dataset.examples
        ]
    )


class NoLabelsArgumentMLP(TinyMLPForClassification):
    """A model whose forward takes no labels (Trainer then finds no label names)."""

    def forward(self, features: torch.Tensor) -> Any:  # type: ignore[override]
        return super().forward(features)


class DictOutputMLP(TinyMLPForClassification):
    """A model whose forward returns a plain dict (as some custom heads do)."""

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> dict:  # type: ignore[override]
        return {"logits": self.classifier(self.body(features))}


@pytest.mark.parametrize("subject", SUBJECTS, ids=ids)
def test_label_columns_and_dict_outputs_as_trainer_accepts_them(subject, tmp_path):
    reference = build(subject, str(tmp_path / "reference"), max_steps=4)
    reference.train()
    for key in ("label", "label_ids"):
        trainer = build(
            subject,
            str(tmp_path / key),
            max_steps=4,
            train=renamed(gaussian_problem(TRAIN_COUNTS, seed=1), key),
            validation=renamed(gaussian_problem(VALIDATION_COUNTS, seed=2), key),
        )
        trainer.train()
        assert_same(weights(reference), weights(trainer), key)
    named = build(
        subject,
        str(tmp_path / "named"),
        max_steps=4,
        label_names=["target"],
        remove_unused_columns=False,
        train=renamed(gaussian_problem(TRAIN_COUNTS, seed=1), "target"),
        validation=renamed(gaussian_problem(VALIDATION_COUNTS, seed=2), "target"),
        data_collator=lambda rows: {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in rows[0]},
    )
    named.train()
    assert_same(weights(reference), weights(named), "label_names")
    torch.manual_seed(0)
    dict_model = DictOutputMLP(TinyMLPConfig(num_labels=K))
    trainer = build(subject, str(tmp_path / "dict"), model=dict_model, max_steps=4)
    trainer.train()
    assert_same(weights(reference), weights(trainer), "dict outputs")
    assert trainer.predict(gaussian_problem(VALIDATION_COUNTS, seed=2)).predictions.shape == (21, K)
    torch.manual_seed(0)
    trainer = build(
        subject,
        str(tmp_path / "no-labels-argument"),
        model=NoLabelsArgumentMLP(TinyMLPConfig(num_labels=K)),
        max_steps=4,
    )
    trainer.train()
    assert_same(weights(reference), weights(trainer), "forward without labels")


# -- best model and its card -----------------------------------------------------------------------------
@pytest.mark.parametrize("subject", SUBJECTS, ids=ids)
def test_best_model_loading_and_its_card_describe_the_saved_weights(subject, tmp_path):
    out = str(tmp_path / "run")
    trainer = build(
        subject,
        out,
        max_steps=8,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,
        compute_metrics=make_compute_metrics(K),
        learning_rate=0.05,
    )
    trainer.train()
    best_step = int(trainer.state.best_model_checkpoint.rsplit("-", 1)[1])
    assert best_step != trainer.state.global_step  # the highest validation loss: an early checkpoint
    saved = load_file(os.path.join(trainer.state.best_model_checkpoint, "model.safetensors"))
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(param.detach(), saved[name])
    # the method's own state (what AutoBalance exports, what SelMix's stage reports) is the best checkpoint's too
    best_state = load_state(trainer.state.best_model_checkpoint, f"{subject.trainer.state_stem}_rank0")
    assert_same(trainer.method_state(), best_state["method"], "method state")
    trainer.save_model()
    trainer.create_model_card()
    card = open(os.path.join(out, "README.md")).read()
    best_eval = next(e for e in trainer.state.log_history if e.get("step") == best_step and "eval_min_recall" in e)
    last_eval = [e for e in trainer.state.log_history if "eval_min_recall" in e][-1]
    assert f"| Mean recall | {best_eval['eval_mean_recall']:.3f} |" in card
    assert f"`steps` = {best_step};" in card
    if subject.reads_validation:  # the eval set is the set the trainer estimated on: the card says so
        assert "`validation` split" in card and "not a held-out estimate" in card and "held-out split" not in card
    else:
        assert "`evaluation` split" in card and "not a held-out estimate" not in card
    assert "5-6 samples per class, 21 in all" in card
    assert "path/to/this/model" not in card
    stages = json.load(open(os.path.join(out, "config.json")))["selmix_hf_stages"]
    assert stages[-1]["settings"]["steps"] == best_step
    if best_eval["eval_mean_recall"] != last_eval["eval_mean_recall"]:
        assert f"| Mean recall | {last_eval['eval_mean_recall']:.3f} |" not in card


@pytest.mark.parametrize("subject", SUBJECTS, ids=ids)
def test_card_settings_come_from_the_config_fields(subject, tmp_path):
    trainer = build(subject, str(tmp_path / "run"), max_steps=2)
    trainer.train()
    settings = trainer.card_stage()["settings"]
    unused = trainer.unused_settings()
    for name in subject.config.method_fields():
        if name in unused:  # e.g. validation_refresh_steps of a loss that reads no validation data
            assert name not in settings
        else:
            assert name in settings and settings[name] == getattr(trainer.args, name)
    assert unused == subject.unused_settings


# -- the post-hoc decision rule ---------------------------------------------------------------------------
POSTHOC = {"posthoc_objective": "min_recall", "posthoc_confidence": 0.5}
POSTHOC_VALIDATION = [30, 30, 30, 30]


def validation_logits(trainer: Any) -> torch.Tensor:
    """The model's logits on the whole validation set, gathered, in dataset order (not a refresh's sample)."""
    if trainer.validation_dataset is None:
        trainer.use_validation_set("the test")
    return gathered_validation_pass(trainer, trainer.validation_dataset)[1].cpu()


@pytest.mark.parametrize("subject", SUBJECTS, ids=ids)
def test_posthoc_offsets_are_fitted_after_training_folded_logged_and_carded(subject, tmp_path):
    validation = gaussian_problem(POSTHOC_VALIDATION, seed=2)
    plain = build(subject, str(tmp_path / "plain"), max_steps=4, validation=validation, **POSTHOC)
    plain.train()
    before = validation_logits(plain)
    out = str(tmp_path / "run")
    trainer = build(
        subject,
        out,
        max_steps=4,
        validation=validation,
        posthoc="offsets",
        compute_metrics=make_compute_metrics(K),
        **POSTHOC,
    )
    trainer.train()  # same seed and data as `plain`, then the rule
    logged = next(e for e in trainer.state.log_history if "posthoc/kept" in e)
    assert logged["posthoc/kept"] == 1.0 and logged["posthoc/after_min_recall"] > logged["posthoc/before_min_recall"]
    stage = trainer.model.config.selmix_hf_stages[-1]
    offsets = trainer.posthoc_rule.offsets
    after = validation_logits(trainer)
    torch.testing.assert_close(after, before + offsets.float(), atol=1e-5, rtol=0)  # folded into the bias
    trainer.save_model()
    reloaded = TinyMLPForClassification.from_pretrained(out).eval()
    x = torch.stack([e["features"] for e in validation.examples])
    with torch.no_grad():
        assert torch.equal(reloaded(features=x).logits.argmax(1), (before + offsets).argmax(1))
    trainer.create_model_card()
    card = open(os.path.join(out, "README.md")).read()
    assert "post-hoc per-class offsets for min_recall" in card and "folded into the classifier's bias" in card
    assert "predictions with the post-hoc offsets in the saved weights" in card
    assert f"| Min recall (optimised) | {trainer.posthoc_metrics['min_recall']:.3f} |" in card
    assert stage["method"] == "posthoc" and "120 validation samples" in stage["description"]


def test_a_gain_matrix_rule_is_stored_in_the_config_and_applied_by_predict_and_the_helper(tmp_path):
    from selmix_hf.posthoc import predict_with_rule

    subject = SUBJECTS[0]
    validation = gaussian_problem(POSTHOC_VALIDATION, seed=2)
    out = str(tmp_path / "run")
    trainer = build(
        subject, out, max_steps=4, validation=validation, compute_metrics=make_compute_metrics(K), **POSTHOC
    )
    trainer.train()
    raw = validation_logits(trainer)
    rule = trainer.fit_posthoc(kind="gain_matrix")
    assert rule.kind == "gain_matrix"
    assert torch.equal(validation_logits(trainer), raw)  # the weights are unchanged: the rule lives in the config
    predicted = torch.as_tensor(trainer.predict(validation).predictions).argmax(1)
    assert torch.equal(predicted, rule.predict(raw)) and not torch.equal(predicted, raw.argmax(1))
    trainer.save_model()
    reloaded = TinyMLPForClassification.from_pretrained(out).eval()
    x = torch.stack([e["features"] for e in validation.examples])
    with torch.no_grad():
        assert torch.equal(predict_with_rule(reloaded, reloaded(features=x).logits), rule.predict(raw))
    stored = json.load(open(os.path.join(out, "config.json")))["selmix_hf_decision_rule"]
    assert stored["kind"] == "gain_matrix" and len(stored["gain"]) == K
    trainer.create_model_card()
    card = open(os.path.join(out, "README.md")).read()
    assert "post-hoc gain-matrix rule for min_recall" in card and "predict_with_rule" in card
    assert "predictions with the gain-matrix rule of config.json applied" in card


@pytest.mark.parametrize(
    "config, settings, message",
    [
        (SelMixConfig, {"posthoc": "bias"}, "unknown posthoc 'bias'"),
        (LongTailConfig, {"posthoc": "offsets"}, "needs posthoc_objective=<name>"),
        (AutoBalanceConfig, {"posthoc": "offsets"}, "needs posthoc_objective=<name>"),
        (LongTailConfig, {"posthoc": "offsets", "posthoc_objective": "recall"}, "unknown objective 'recall'"),
        (SelMixConfig, {"posthoc": "offsets", "posthoc_objective_options": {"omgea": 1}}, "omgea"),
        (LongTailConfig, {"posthoc": "offsets", "posthoc_objective": "min_recall", "posthoc_tau": 1.0}, "set one"),
        (SelMixConfig, {"posthoc_folds": 1}, "posthoc_folds must be >= 2"),
        (SelMixConfig, {"posthoc_confidence": 0.2}, r"posthoc_confidence must lie in \[0.5, 1\]"),
    ],
)
def test_bad_posthoc_settings_fail_when_the_config_is_built(config, settings, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        config(output_dir=str(tmp_path), **settings)


def test_posthoc_objectives_default_to_what_training_optimised(tmp_path):
    selmix = SelMixConfig(output_dir=str(tmp_path), objective="h_mean", posthoc="offsets")
    assert selmix.posthoc_target() == ("h_mean", {"class_prior": None, "tail_fraction": 0.1})
    cost = LongTailConfig(output_dir=str(tmp_path), loss_type="cost_sensitive", loss_options={"objective": "g_mean"})
    assert cost.posthoc_target()[0] == "g_mean"
    auto = AutoBalanceConfig(output_dir=str(tmp_path), upper_objective="min_recall", posthoc="offsets")
    assert auto.posthoc_target() == ("min_recall", {})


if __name__ == "__main__":
    if sys.argv[3:] == ["nan"]:
        run_rank(two_rank_nan_run, sys.argv[1], sys.argv[2])
    else:  # an optional third argument: the engine (ddp, ddp-as-sharded, fsdp2)
        run_rank(two_rank_run, *sys.argv[1:])
