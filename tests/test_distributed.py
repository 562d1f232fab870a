"""Two CPU processes (gloo), SelMix specifics: identical gains on every rank, each validation sample counted once,
per-rank pairs. What every trainer must do on two ranks is in tests/test_contract.py.

The ranks run under `torchrun --standalone` in fresh processes: forking a pytest process whose OpenMP pool has
already run (as accelerate.debug_launcher does) can deadlock the children.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny import TinyMLPConfig, TinyMLPForClassification, gaussian_problem, run_rank, two_cpu_ranks  # noqa: E402

from selmix_hf.config import SelMixConfig  # noqa: E402
from selmix_hf.trainer import SelMixTrainer  # noqa: E402

K = 4
VALIDATION_COUNTS = [6, 5, 5, 5]  # 21 samples: the last eval round is padded with duplicates across the ranks


class RecordingCollator:
    """Stacks examples and remembers which dataset ids each batch held."""

    def __init__(self):
        self.batches = []

    def __call__(self, examples):
        self.batches.append([int(e["id"]) for e in examples])
        return {
            "features": torch.stack([e["features"] for e in examples]),
            "labels": torch.tensor([e["labels"] for e in examples]),
        }


def with_ids(dataset):
    for i, example in enumerate(dataset.examples):
        example["id"] = i
    return dataset


def two_rank_run(out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    torch.manual_seed(0)
    args = SelMixConfig(
        output_dir=f"{out_dir}/run",
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        max_steps=6,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        gain_refresh_steps=2,
        remove_unused_columns=False,
        logging_strategy="no",
        optim="sgd",
        learning_rate=0.1,
    )
    assert dist.is_initialized() and dist.get_world_size() == 2 and args.world_size == 2
    collator = RecordingCollator()
    trainer = SelMixTrainer(
        model=TinyMLPForClassification(TinyMLPConfig(num_labels=K)),
        args=args,
        data_collator=collator,
        train_dataset=with_ids(gaussian_problem([40, 30, 20, 10], seed=1)),
        eval_dataset=with_ids(gaussian_problem(VALIDATION_COUNTS, seed=2)),
    )
    trainer.train()
    train_batches = [b for b in collator.batches if len(b) == 8]  # pair batches (eval batches hold <= 4)
    torch.save(
        {
            "rank": args.process_index,
            "steps": trainer.state.global_step,
            "gains": trainer.gains,
            "distribution": trainer.distribution,
            "counts": trainer.last_confusion_counts,
            "multipliers": trainer.objective.multipliers(),
            "train_batches": train_batches,
            "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
        },
        f"{out_dir}/rank{args.process_index}.pt",
    )


def launch(tmp_path, mode: str) -> list[dict]:
    result = two_cpu_ranks(__file__, mode, str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.slow
def test_two_processes_share_gains_and_draw_their_own_pairs(tmp_path):
    ranks = launch(tmp_path, "selmix")
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["steps"] == 6 for r in ranks)
    torch.testing.assert_close(ranks[0]["gains"], ranks[1]["gains"], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["distribution"], ranks[1]["distribution"], rtol=0, atol=0)
    for key, value in ranks[0]["multipliers"].items():
        torch.testing.assert_close(value, ranks[1]["multipliers"][key], rtol=0, atol=0)
    # the confusion counts are computed on each rank from its gathered tensors (not broadcast): equal means same data
    assert torch.equal(ranks[0]["counts"], ranks[1]["counts"])
    for r in ranks:  # each of the 21 validation samples counted exactly once, despite the padded last round
        assert int(r["counts"].sum()) == sum(VALIDATION_COUNTS)
        assert r["counts"].sum(1).tolist() == VALIDATION_COUNTS
    assert len(ranks[0]["train_batches"]) == len(ranks[1]["train_batches"]) == 6
    assert ranks[0]["train_batches"] != ranks[1]["train_batches"]
    for name, value in ranks[0]["params"].items():  # DDP kept the replicas in step
        torch.testing.assert_close(value, ranks[1]["params"][name])


if __name__ == "__main__":
    run_rank({"selmix": two_rank_run}[sys.argv[1]], sys.argv[2])
