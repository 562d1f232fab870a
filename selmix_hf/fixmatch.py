"""FixMatchTrainer: semi-supervised stage 1 (FixMatch with the loss zoo's supervised loss: FixMatch-LA by default).

One step, as this file implements it: a labelled batch of B (the Trainer's loader) and mu B samples drawn from the
unlabelled pool -> weak views of both, a strong view of the unlabelled -> one forward when the inputs stack ->
supervised loss on the labelled weak view + lambda_u x mean(mask x CE(strong + tau log pi, argmax weak)) with
mask = top probability of the weak view >= threshold and tau = unlabeled_logit_adjustment (0 as published) -> after
the optimiser step, the EMA of the weights. Evaluation and the saved model use the EMA.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from . import _compat
from .config import FixMatchConfig
from .ema import WeightAverage
from .features import logits_of, unwrap
from .longtail_trainer import LongTailTrainer
from .sampling import SampleStream, rank_seed
from .unlabeled import UnlabeledView, unlabeled_view
from .views import TokenMasking, Views, image_views_for


class FixMatchTrainer(LongTailTrainer):
    """`LongTailTrainer` that also learns from ``unlabeled_dataset`` by FixMatch's confident pseudo-labels.

    Takes the `LongTailTrainer` arguments plus ``unlabeled_dataset`` (the training set's input columns; a label
    column, if any, is dropped unread) and ``views`` (a `Views` of weak / strong batch transforms; the default is
    `ImageViews` with the processing class's normalisation for ``pixel_values``, `TokenMasking` for ``input_ids``).
    """

    config_class = FixMatchConfig
    _name = "fixmatch"
    _paper = ("fixmatch",)
    _tag_names = ("semi-supervised", "long-tail-loss")
    state_stem = "fixmatch_state"

    def __init__(
        self,
        model: nn.Module | None = None,
        args: FixMatchConfig | None = None,
        *,
        unlabeled_dataset: Any = None,
        views: Views | tuple[Any, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, args, **kwargs)
        if unlabeled_dataset is None:
            raise ValueError("FixMatchTrainer needs unlabeled_dataset=: the pool its unlabelled loss is computed on")
        self.unlabeled_dataset: UnlabeledView = unlabeled_view(
            unlabeled_dataset, self.train_dataset, self._label_columns(), _compat.model_input_columns(self)
        )
        if isinstance(views, tuple) and len(views) == 2:
            views = Views(*views)
        if views is not None and not (isinstance(views, Views) and callable(views.weak) and callable(views.strong)):
            raise TypeError(
                f"views must be Views(weak=..., strong=...) or a (weak, strong) pair of callables (batch, seeds) -> "
                f"batch, got {type(views).__name__}"
            )
        self.views = views if views is not None else self._default_views()
        seed, rank = args.seed, args.process_index
        self.stream = SampleStream(len(self.unlabeled_dataset), seed=seed, rank=rank)
        self._labelled_seeds = torch.Generator().manual_seed(rank_seed(seed, rank) ^ 0x1AB)
        if args.ema_decay is not None:
            self.require_whole_parameters("averages the full weights (ema_decay)", ", or set ema_decay=None")
        self.average = WeightAverage(unwrap(model), args.ema_decay) if args.ema_decay is not None else None
        self._pool_collator: Any = None
        self._stats = torch.zeros(3, dtype=torch.float64)  # since the last log: unlabelled loss, mask rate, steps
        self._ema_in_model = False  # True once training ended and the EMA weights were copied into the model
        self._saving_raw: dict[str, torch.Tensor] | None = None  # the raw weights while a checkpoint is written
        self._pending_raw: dict[str, torch.Tensor] | None = None  # a checkpoint's raw weights, not yet restored
        self._final_raw: dict[str, torch.Tensor] | None = None  # the raw weights the EMA replaced at the end
        self.add_callback(_AverageAfterStep(self))
        counts = torch.as_tensor(self.class_counts, dtype=torch.float64).clamp_min(1.0)
        # added to the strong views' logits in the unlabelled loss (zero: plain CE)
        adjustment = args.unlabeled_logit_adjustment * torch.log(counts / counts.sum())
        self._pool_adjustment = adjustment.float().to(args.device)

    def _default_views(self) -> Views:
        """ImageViews for pixel_values, TokenMasking for input_ids with a tokenizer; other inputs need the user's."""
        columns = sorted(self.unlabeled_dataset.columns())  # of an item: a transform may make them (pixel_values)
        if "pixel_values" in columns:
            return image_views_for(self.processing_class)
        if "input_ids" in columns and hasattr(self.processing_class, "all_special_ids"):
            return TokenMasking(self.processing_class)
        raise ValueError(
            f"FixMatchTrainer has default views for images (pixel_values) and tokenised text (input_ids, with the "
            f"tokenizer as processing_class) only; the inputs are {columns}. Pass views=Views(weak=..., strong=...): "
            "two callables (batch, seeds) -> batch"
        )

    # -- the FixMatch step ------------------------------------------------------------------------
    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """Training: supervised loss on weak labelled views + lambda_u x FixMatch loss. Evaluation: plain CE."""
        if not model.training:
            return self.evaluation_loss(model, inputs, return_outputs)
        inputs, labels = self.split_labels(inputs)
        count = labels.shape[0]
        seeds = (torch.rand(count, generator=self._labelled_seeds, dtype=torch.float64) * 2.0**53).long()
        labelled = self.views.weak(inputs, seeds)
        pool, pool_seeds = self.unlabeled_batch(self.args.mu * count)
        weak, strong = self.views.weak(pool, pool_seeds[:, 0]), self.views.strong(pool, pool_seeds[:, 1])
        logits, outputs = self.forward_views(model, [labelled, weak, strong])
        logits_l, logits_w, logits_s = logits.split([count, len(pool_seeds), len(pool_seeds)])
        supervised = self.loss_fn(logits_l, labels)
        with torch.no_grad():
            confidence, pseudo = torch.softmax(logits_w.detach().float(), dim=1).max(dim=1)
            mask = (confidence >= self.args.confidence_threshold).float()
        strong_logits = logits_s.float() + self._pool_adjustment
        unlabelled = (F.cross_entropy(strong_logits, pseudo, reduction="none") * mask).mean()
        loss = supervised + self.args.lambda_u * unlabelled
        self.check_finite_loss(loss, inputs, logits)  # the pool's logits too
        step_stats = torch.stack(
            [unlabelled.detach().double(), mask.mean().double(), mask.new_ones((), dtype=torch.float64)]
        )
        self._stats = step_stats + self._stats.to(step_stats.device)  # summed on the device: no sync per step
        return (loss, outputs) if return_outputs else loss

    def unlabeled_batch(self, count: int) -> tuple[dict[str, Any], torch.Tensor]:
        """``count`` samples of the pool, collated like the labelled batches and on the device, with view seeds."""
        if self._pool_collator is None:
            self._pool_collator = _compat.drop_unused_columns(
                self, self.unlabeled_dataset, self.data_collator, "unlabelled"
            )[1]
        indices, seeds = self.stream.draw(count)
        batch = dict(self._pool_collator([self.unlabeled_dataset[int(i)] for i in indices]))
        batch.pop(self.label_key, None)  # the placeholder: nothing reads a pool label
        return _compat.prepare_inputs(self, batch), seeds

    def forward_views(self, model: nn.Module, batches: list[dict[str, Any]]) -> tuple[torch.Tensor, Any]:
        """The logits of the batches, concatenated, and the first forward's outputs: one forward over all when their
        inputs stack (BatchNorm sees the whole step, as published), else one forward each (e.g. text padded to
        different lengths)."""
        keys = set(batches[0])
        stackable = all(set(b) == keys for b in batches) and all(
            not torch.is_tensor(batches[0][k]) or all(b[k].shape[1:] == batches[0][k].shape[1:] for b in batches)
            for k in keys
        )
        if stackable:
            joined = {k: torch.cat([b[k] for b in batches]) if torch.is_tensor(v) else v for k, v in batches[0].items()}
            outputs = model(**joined)
            return logits_of(outputs), outputs
        outputs = [model(**b) for b in batches]
        return torch.cat([logits_of(o) for o in outputs]), outputs[0]

    # -- EMA: updated after each optimiser step, used by evaluation, saved at the end -----------------
    def optimizer_step_done(self) -> None:
        """Average in the weights just stepped (called by the EMA callback)."""
        if self.average is not None:
            self.average.update(unwrap(self.model))

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """`Trainer.evaluate` on the EMA weights (the weights FixMatch reports and saves)."""
        with self._ema_applied():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.predict` on the EMA weights."""
        with self._ema_applied():
            return super().predict(*args, **kwargs)

    def _ema_applied(self) -> Any:
        """The EMA weights in the model for a block, unless there is no EMA or the model holds it already."""
        if self.average is None or self._ema_in_model:
            return nullcontext()
        return self.average.applied(unwrap(self.model))

    def finish_weights(self) -> None:
        """At the end of training the model takes the EMA weights: what is saved is what was evaluated."""
        if self.average is not None and not self._ema_in_model:
            model = unwrap(self.model)
            self._final_raw = self._pending_raw or WeightAverage.snapshot(model)
            self._pending_raw = None
            WeightAverage.load_into(model, self.average.weights)
            self._ema_in_model = True

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """A checkpoint's model file holds the EMA weights (the evaluated model, which `load_best_model_at_end` and
        `from_pretrained` then load); the raw weights training continues from go into the method state."""
        if self.average is None or self._ema_in_model:
            return super()._save_checkpoint(model, trial)
        self._saving_raw = WeightAverage.snapshot(unwrap(self.model))
        try:
            with self.average.applied(unwrap(self.model)):
                super()._save_checkpoint(model, trial)
        finally:
            self._saving_raw = None

    def raw_weights(self) -> dict[str, torch.Tensor] | None:
        """The weights training steps on (not the average): None without an EMA."""
        if self.average is None:
            return None
        if self._saving_raw is not None:
            return self._saving_raw
        return self._final_raw if self._ema_in_model else WeightAverage.snapshot(unwrap(self.model))

    def restore_raw_weights(self) -> None:
        """On resume, after the Trainer loaded the checkpoint's (averaged) model file: the raw weights back."""
        if self._pending_raw is not None:
            WeightAverage.load_into(unwrap(self.model), self._pending_raw)
            self._pending_raw = None

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's logs, with the unlabelled loss and the share of confident pseudo-labels since the last."""
        if "loss" in logs and self._stats[2] > 0:
            steps = float(self._stats[2])
            logs = {**logs, "fixmatch/unlabeled_loss": float(self._stats[0]) / steps}
            logs["fixmatch/mask_rate"] = float(self._stats[1]) / steps
            self._stats.zero_()
        super().log(logs, *args, **kwargs)

    # -- card and checkpoints -------------------------------------------------------------------------
    def stage_title(self) -> str:
        return f"FixMatch with the {self.loss_name.replace('_', '-')} supervised loss"

    def card_stage(self) -> dict[str, Any]:
        """LongTailTrainer's stage (the loss cited), named for FixMatch."""
        return {**super().card_stage(), "method": self._name}

    def stage_description(self) -> str:
        ema = "an EMA of the weights" if self.average is not None else "the raw weights"
        return (
            f"semi-supervised: {self.args.mu} samples of an unlabelled pool of {len(self.unlabeled_dataset)} per "
            f"labelled sample, strong views trained on the weak views' pseudo-labels above "
            f"{self.args.confidence_threshold:g} confidence; the model is {ema}"
        )

    def method_state(self) -> dict[str, Any]:
        """The loss's state, the EMA and the streams (unlabelled draws, view seeds) of this rank."""
        return {
            **super().method_state(),
            "ema": None if self.average is None else self.average.state_dict(),
            "raw": self.raw_weights(),
            "stream": self.stream.state_dict(),
            "labelled_seeds": self._labelled_seeds.get_state(),
        }

    def load_method_state(self, state: dict[str, Any], same_rank: bool) -> None:
        """Restore the loss and the EMA; another rank's streams are not reused."""
        super().load_method_state(state, same_rank)
        if self.average is not None and state.get("ema") is not None:
            self.average.load_state_dict(state["ema"])
            self._pending_raw = state["raw"]  # put into the model once the Trainer has loaded the model file
        if same_rank:
            self.stream.load_state_dict(state["stream"])
            self._labelled_seeds.set_state(state["labelled_seeds"])


class _AverageAfterStep(TrainerCallback):
    """Updates the weight average after every optimiser step (before a checkpoint of that step); on resume, puts
    the checkpoint's raw weights back before the first step."""

    def __init__(self, trainer: FixMatchTrainer) -> None:
        self.trainer = trainer

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.restore_raw_weights()  # after every way of loading a checkpoint (DeepSpeed / FSDP load late)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.optimizer_step_done()


__all__ = ["FixMatchConfig", "FixMatchTrainer"]
