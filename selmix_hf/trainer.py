"""SelMixTrainer: a drop-in `transformers.Trainer` that fine-tunes for a non-decomposable objective.

One SelMix run, as this file implements it:
validation pass -> confusion matrix + prototypes -> objective multipliers -> gain matrix -> sampling
distribution -> pair batches -> one forward over both halves, the head's input mixed by a hook ->
cross-entropy on the first half's labels -> every `gain_refresh_steps` steps, back to the validation pass.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import broadcast
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback

from . import _compat
from .config import SelMixConfig
from .data import dataset_labels
from .features import PooledFeatures, find_head, unwrap
from .gains import class_prototypes, gain_matrix, sampling_distribution
from .metrics import check_labels, confusion_counts, normalized_confusion
from .objectives import Objective, get_objective
from .sampling import PairBatchSampler, rank_seed

logger = logging.getLogger(__name__)

STATE_FILE = "selmix_state_rank{rank}.pt"
_MAX_LOGGED_MULTIPLIERS = 16


class SelMixTrainer(Trainer):
    """`Trainer` whose training steps are SelMix pair mixups; evaluation and prediction are the plain model's.

    Takes the `Trainer` arguments plus ``validation_dataset`` (the labelled held-out set the gains are estimated
    on; defaults to ``eval_dataset``) and optionally ``objective`` (an `Objective` instance, e.g. a
    `CustomObjective`, instead of ``args.objective``).
    """

    # compute_loss returns the mean over one micro-batch of fixed size; the Trainer divides by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        args: SelMixConfig | None = None,
        *,
        validation_dataset: Any = None,
        objective: Objective | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, SelMixConfig):
            raise TypeError("SelMixTrainer needs args=SelMixConfig(...) (TrainingArguments plus the SelMix settings)")
        if model is None:
            raise ValueError("SelMixTrainer needs a model (model_init is not supported)")
        self.num_labels = _num_labels(model)
        _, head = find_head(model, self.num_labels)  # fails early, naming the model class, if there is no head
        super().__init__(model=model, args=args, **kwargs)
        if self.train_dataset is None:
            raise ValueError("SelMixTrainer needs a train_dataset: the pairs are drawn from it")
        self.validation_dataset = self._pick_validation(validation_dataset)
        self.train_labels = dataset_labels(self.train_dataset)
        check_labels(torch.as_tensor(self.train_labels), self.num_labels, "training labels")
        self.class_counts = np.bincount(self.train_labels, minlength=self.num_labels)
        self._check_validation_labels()
        self.objective = objective if objective is not None else self._build_objective()
        if self.objective.num_classes != self.num_labels:
            raise ValueError(f"the objective has {self.objective.num_classes} classes, the model {self.num_labels}")

        self.pooled = PooledFeatures(head)
        self._batchnorms = [m for m in unwrap(model).modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        self._mix_generator = torch.Generator().manual_seed(rank_seed(args.seed, args.process_index) ^ 0x5E1)
        self.sampler: PairBatchSampler | None = None
        self.distribution: torch.Tensor | None = None
        self.gains: torch.Tensor | None = None
        self.max_gain_history: list[float] = []
        self.last_confusion_counts: torch.Tensor | None = None
        self._resumed_state: dict[str, Any] | None = None
        self.add_callback(_GainRefreshCallback(self))

    # -- set-up checks ----------------------------------------------------------------------------
    def _pick_validation(self, validation_dataset: Any) -> Any:
        dataset = validation_dataset if validation_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("SelMixTrainer needs a labelled validation set: pass validation_dataset= or eval_dataset=")
        if isinstance(dataset, dict):
            raise ValueError("eval_dataset is a dict of datasets; pass the one to estimate gains on as validation_dataset=")
        if len(dataset) == 0:
            raise ValueError("the validation set is empty; SelMix estimates its gains on it, so it needs every class")
        return dataset

    def _check_validation_labels(self) -> None:
        labels = dataset_labels(self.validation_dataset)
        check_labels(torch.as_tensor(labels), self.num_labels, "validation labels")
        missing = np.flatnonzero(np.bincount(labels, minlength=self.num_labels) == 0).tolist()
        if missing:
            raise ValueError(
                f"classes {missing[:20]} have no sample in the validation set; SelMix needs every class there "
                "(its recall and prototype). Build the split with selmix_hf.data.balanced_split."
            )

    def _build_objective(self) -> Objective:
        options = dict(self.args.objective_options)
        if "head_tail" in self.args.objective and not {"head", "tail", "class_counts"} & set(options):
            options.update(class_counts=self.class_counts.tolist(), tail_fraction=self.args.tail_fraction)
        return get_objective(self.args.objective, self.num_labels, class_prior=self.args.class_prior, **options)

    # -- the SelMix loop --------------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        """A plain DataLoader over the pair sampler: each rank draws its own pairs, nothing is resharded."""
        dataset, collator = _compat.drop_unused_columns(self, self.train_dataset, self.data_collator, "training")
        self.sampler = PairBatchSampler(
            self.train_labels,
            self.num_labels,
            self.args.per_device_train_batch_size,
            seed=self.args.seed,
            rank=self.args.process_index,
            world_size=self.args.world_size,
        )
        if self._resumed_state is not None:
            self.sampler.load_state_dict(self._resumed_state["sampler"])
        elif self.distribution is not None:
            self.sampler.set_distribution(self.distribution)
        return DataLoader(
            dataset,
            batch_sampler=self.sampler,
            collate_fn=collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            # its own generator: a new epoch's iterator must not draw from the global RNG that dropout uses
            generator=torch.Generator().manual_seed(rank_seed(self.args.seed, self.args.process_index) ^ 0xD1),
        )

    def refresh_gains(self) -> dict[str, float]:
        """Validation pass -> confusion + prototypes -> multipliers -> gain matrix -> new sampling distribution."""
        features, logits, labels = self.validation_pass()
        self.last_confusion_counts = confusion_counts(labels.cpu(), logits.argmax(dim=1).cpu(), self.num_labels)
        confusion = normalized_confusion(self.last_confusion_counts, self.args.class_prior)
        prototypes = class_prototypes(features, labels, self.num_labels)
        self.objective.update(confusion)
        head = self.pooled.head
        gains = gain_matrix(
            self.objective,
            confusion.to(features),
            prototypes,
            head.weight.detach().float(),
            None if head.bias is None else head.bias.detach().float(),
            mix_lambda_min=self.args.mix_lambda_min,
            estimator=self.args.gain_estimator,
            class_prior=self.args.class_prior,
            features=features,
            labels=labels,
        )
        if self.args.world_size > 1:  # every rank must act on the very same matrix
            gains = broadcast(gains.to(self.args.device).contiguous(), from_process=0)
        self.gains = gains.cpu()
        if self.args.pair_distribution == "uniform":
            self.distribution = torch.full((self.num_labels, self.num_labels), 1.0 / self.num_labels**2)
        else:
            self.distribution = sampling_distribution(self.gains, self.args.sampling_temperature, self.args.sampling_epsilon)
        if self.sampler is not None:
            self.sampler.set_distribution(self.distribution)
        self.max_gain_history.append(float(self.gains.max()))
        return self._refresh_logs(confusion)

    def validation_pass(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pooled features, logits and labels of the whole validation set, gathered: identical on every rank."""
        loader = self.get_eval_dataloader(self.validation_dataset)
        model = unwrap(self.model)
        was_training = model.training
        model.eval()
        features, logits, labels = [], [], []
        with torch.no_grad(), self.pooled.capture():
            for batch in loader:
                batch = _compat.prepare_inputs(self, batch)
                batch_labels = batch.pop("labels")
                with self.compute_loss_context_manager():
                    batch_logits = model(**batch).logits
                gathered = self.accelerator.gather_for_metrics(
                    (self.pooled.captured.float(), batch_logits.float(), batch_labels)
                )
                for store, tensor in zip((features, logits, labels), gathered):
                    store.append(tensor)
        model.train(was_training)
        return torch.cat(features), torch.cat(logits), torch.cat(labels).long()

    def compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """Training: CE of the mixed pairs on the first half's labels. Evaluation: the model's plain CE."""
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        if not model.training:  # evaluate() / predict(): no mixing
            outputs = model(**inputs)
            loss = F.cross_entropy(outputs.logits.float(), labels)
            return (loss, outputs) if return_outputs else loss
        if self.args.freeze_batchnorm:
            for module in self._batchnorms:
                module.eval()
        pairs = labels.shape[0] // 2
        lam_min = self.args.mix_lambda_min
        lam = lam_min + (1.0 - lam_min) * torch.rand(pairs, generator=self._mix_generator)
        with self.pooled.mixing(lam):
            outputs = model(**inputs)
        loss = F.cross_entropy(outputs.logits.float(), labels[:pairs])
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """Head and backbone in separate parameter groups: backbone lr = backbone_lr_ratio x head lr."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        head_ids = {id(p) for p in self.pooled.head.parameters()}
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                groups.setdefault((id(param) in head_ids, name in decay), []).append(param)
        base_lr = self.args.learning_rate
        param_groups = [
            {
                "params": params,
                "lr": base_lr if is_head else base_lr * self.args.backbone_lr_ratio,
                "weight_decay": self.args.weight_decay if decays else 0.0,
            }
            for (is_head, decays), params in sorted(groups.items(), reverse=True)  # head first: its lr is the one logged
        ]
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    # -- logging, early stop ----------------------------------------------------------------------
    def _refresh_logs(self, confusion: torch.Tensor) -> dict[str, float]:
        p = self.distribution
        logs = {f"selmix/{key}": value for key, value in self.objective.report(confusion).items()}
        logs["selmix/max_gain"] = float(self.gains.max())
        logs["selmix/pair_entropy"] = float(-(p * torch.log(p.clamp_min(1e-30))).sum())
        for key, value in self.objective.multipliers().items():
            flat = value.flatten()
            if flat.numel() <= _MAX_LOGGED_MULTIPLIERS:
                logs.update({f"selmix/{key}_{i}": float(v) for i, v in enumerate(flat)})
            else:
                logs.update({f"selmix/{key}_max": float(flat.max()), f"selmix/{key}_min": float(flat.min())})
        return logs

    def gain_plateaued(self) -> bool:
        """Published early stop: over the last `plateau_window` refreshes, |mean - last| < tolerance |mean| of max G."""
        window = self.args.plateau_window
        if len(self.max_gain_history) < window:
            return False
        recent = self.max_gain_history[-window:]
        mean = sum(recent) / window
        return abs(mean - recent[-1]) < self.args.plateau_tolerance * abs(mean)

    # -- checkpoints ------------------------------------------------------------------------------
    def selmix_state_dict(self) -> dict[str, Any]:
        """Everything SelMix adds to a checkpoint: multipliers, P, G, the gain history and this rank's streams."""
        return {
            "objective": self.objective.state_dict(),
            "distribution": self.distribution,
            "gains": self.gains,
            "max_gain_history": list(self.max_gain_history),
            "sampler": None if self.sampler is None else self.sampler.state_dict(),
            "mix_generator": self._mix_generator.get_state(),
        }

    def load_selmix_state_dict(self, state: dict[str, Any]) -> None:
        self.objective.load_state_dict(state["objective"])
        self.distribution, self.gains = state["distribution"], state["gains"]
        self.max_gain_history = list(state["max_gain_history"])
        self._mix_generator.set_state(state["mix_generator"])
        self._resumed_state = state if state["sampler"] is not None else None

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Write this rank's SelMix state atomically before the Trainer's files (trainer_state.json comes last)."""
        folder = _compat.checkpoint_folder(self, trial)
        os.makedirs(folder, exist_ok=True)
        _atomic_save(self.selmix_state_dict(), os.path.join(folder, STATE_FILE.format(rank=self.args.process_index)))
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, **kwargs: Any) -> Any:
        """`Trainer.train`; on resume, the SelMix state of the checkpoint is restored first."""
        if resume_from_checkpoint is True or resume_from_checkpoint == "True":
            resume_from_checkpoint = _compat.get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint found in {self.args.output_dir} to resume from")
        if resume_from_checkpoint:
            self.load_selmix_state_dict(_load_rank_state(resume_from_checkpoint, self.args.process_index))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)


class _GainRefreshCallback(TrainerCallback):
    """Runs the refresh before the first step and every `gain_refresh_steps` steps; applies the plateau stop."""

    def __init__(self, trainer: SelMixTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: SelMixConfig, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer._resumed_state is None:
            self._log(self.trainer.refresh_gains(), control)
        self.trainer._resumed_state = None

    def on_step_end(self, args: SelMixConfig, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % args.gain_refresh_steps or state.global_step >= state.max_steps:
            return
        self._log(self.trainer.refresh_gains(), control)
        if args.early_stop_on_gain_plateau and self.trainer.gain_plateaued():
            logger.info("SelMix: max gain has plateaued over %d refreshes; stopping", args.plateau_window)
            control.should_training_stop = True

    def _log(self, logs: dict[str, float], control: Any) -> None:
        """Log the refresh without swallowing the Trainer's own log of this step (`log` clears should_log)."""
        should_log = control.should_log
        self.trainer.log(logs)
        control.should_log = self.trainer.control.should_log = should_log


def _num_labels(model: torch.nn.Module) -> int:
    num_labels = getattr(getattr(unwrap(model), "config", None), "num_labels", None)
    if not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(f"cannot read num_labels (>= 2) from {type(unwrap(model)).__name__}.config")
    return num_labels


def _atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written state file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_rank_state(checkpoint: str, rank: int) -> dict[str, Any]:
    path = os.path.join(checkpoint, STATE_FILE.format(rank=rank))
    if os.path.exists(path):
        return torch.load(path, weights_only=False)
    first = os.path.join(checkpoint, STATE_FILE.format(rank=0))
    if not os.path.exists(first):
        raise FileNotFoundError(
            f"{checkpoint} has no SelMix state ({STATE_FILE.format(rank=rank)}); resume from a checkpoint written by "
            "SelMixTrainer, or start a new SelMix run from the model weights instead"
        )
    logger.warning("no SelMix state for rank %d in %s (world size changed?): using rank 0's with a fresh sampler", rank, checkpoint)
    state = torch.load(first, weights_only=False)
    return {**state, "sampler": None}


__all__ = ["SelMixConfig", "SelMixTrainer"]
