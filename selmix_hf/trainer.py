"""SelMixTrainer: a drop-in `transformers.Trainer` that fine-tunes for a non-decomposable objective.

One SelMix run, as this file implements it:
validation pass -> confusion matrix + prototypes -> objective multipliers -> gain matrix -> sampling
distribution -> pair batches -> one forward over both halves, the head's input mixed by a hook ->
cross-entropy on the first half's labels -> every `gain_refresh_steps` steps, back to the validation pass.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import broadcast
from torch.utils.data import DataLoader
from transformers import Trainer

from . import _compat
from .cards import ModelCardMixin, optimisation_settings
from .config import SelMixConfig
from .data import dataset_labels
from .features import PooledFeatures, find_head, num_labels_of, unwrap
from .gains import class_prototypes, equal_norm_prototypes, gain_matrix, sampling_distribution
from .metrics import check_labels, confusion_counts, normalized_confusion
from .objectives import Objective, multiplier_logs, objective_for_training
from .plots import log_refresh_heatmaps
from .sampling import PairBatchSampler, rank_seed
from .validation import (
    CheckpointedState,
    PeriodicRefresh,
    check_every_class,
    gathered_validation_pass,
    pick_validation_set,
    require_whole_head,
)

logger = logging.getLogger(__name__)


class SelMixTrainer(ModelCardMixin, CheckpointedState, Trainer):
    """`Trainer` whose training steps are SelMix pair mixups; evaluation and prediction are the plain model's.

    Takes the `Trainer` arguments plus ``validation_dataset`` (the labelled held-out set the gains are estimated
    on; defaults to ``eval_dataset``) and optionally ``objective`` (an `Objective` instance, e.g. a
    `CustomObjective`, instead of ``args.objective``).
    """

    # compute_loss returns the mean over one micro-batch of fixed size; the Trainer divides by the accumulation steps
    loss_is_scaled_for_ga = False
    state_file = "selmix_state_rank{rank}.pt"

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
        if args.n_gpu > 1:
            raise ValueError(
                f"{args.n_gpu} GPUs in one process would split each pair batch across replicas (DataParallel); "
                "launch one process per GPU instead: `accelerate launch` or `torchrun --nproc_per_node N`"
            )
        self.num_labels = num_labels_of(model)
        _, head = find_head(model, self.num_labels)  # fails early, naming the model class, if there is no head
        super().__init__(model=model, args=args, **kwargs)
        _compat.disable_loss_kwargs(self)
        require_whole_head(self, "SelMixTrainer")
        if self.train_dataset is None:
            raise ValueError("SelMixTrainer needs a train_dataset: the pairs are drawn from it")
        self.validation_dataset = pick_validation_set(validation_dataset, self.eval_dataset, "SelMixTrainer")
        self.train_labels = dataset_labels(self.train_dataset)
        check_labels(torch.as_tensor(self.train_labels), self.num_labels, "training labels")
        self.class_counts = np.bincount(self.train_labels, minlength=self.num_labels)
        check_every_class(self.validation_dataset, self.num_labels, "validation")
        self.objective = objective if objective is not None else objective_for_training(
            args.objective, self.num_labels, self.class_counts, args.tail_fraction, class_prior=args.class_prior,
            **args.objective_options,
        )
        if self.objective.num_classes != self.num_labels:
            raise ValueError(f"the objective has {self.objective.num_classes} classes, the model {self.num_labels}")
        self.class_prior = self._resolve_prior()

        self.pooled = PooledFeatures(head)
        self._batchnorms = [m for m in unwrap(model).modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        self._mix_generator = torch.Generator().manual_seed(rank_seed(args.seed, args.process_index) ^ 0x5E1)
        self.sampler: PairBatchSampler | None = None
        self.distribution: torch.Tensor | None = None
        self.gains: torch.Tensor | None = None
        self.max_gain_history: list[float] = []
        self.last_confusion_counts: torch.Tensor | None = None
        self._sampler_state: dict[str, Any] | None = None
        self.add_callback(PeriodicRefresh(self, args.gain_refresh_steps))

    def _resolve_prior(self) -> torch.Tensor:
        """One class prior for the confusion matrix and the gains: the config's, else the objective's."""
        if self.args.class_prior is None:
            return self.objective.class_prior
        prior = torch.as_tensor(self.args.class_prior, dtype=torch.float64)
        if prior.shape != self.objective.class_prior.shape or not torch.allclose(prior, self.objective.class_prior):
            raise ValueError("args.class_prior and the objective's class_prior differ; set the prior in one place")
        return self.objective.class_prior

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
            accumulation_steps=self.args.gradient_accumulation_steps,  # no short last step in an epoch
        )
        if self._sampler_state is not None:
            self.sampler.load_state_dict(self._sampler_state)
            self._sampler_state = None
        elif self.distribution is not None:
            self.sampler.set_distribution(self.distribution)
        return DataLoader(
            dataset,
            batch_sampler=self.sampler,
            collate_fn=collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0,
            prefetch_factor=self.args.dataloader_prefetch_factor if self.args.dataloader_num_workers > 0 else None,
            # its own generator: a new epoch's iterator must not draw from the global RNG that dropout uses
            generator=torch.Generator().manual_seed(rank_seed(self.args.seed, self.args.process_index) ^ 0xD1),
        )

    def refresh(self) -> dict[str, float]:
        """Validation pass -> confusion + prototypes -> multipliers -> gain matrix -> new sampling distribution."""
        features, logits, labels = gathered_validation_pass(self, self.validation_dataset, self.pooled)
        self.last_confusion_counts = confusion_counts(labels.cpu(), logits.argmax(dim=1).cpu(), self.num_labels)
        confusion = normalized_confusion(self.last_confusion_counts, self.class_prior)
        raw_prototypes = class_prototypes(features, labels, self.num_labels)
        prototypes = equal_norm_prototypes(raw_prototypes) if self.args.equal_norm_prototypes else raw_prototypes
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
            class_prior=self.class_prior,
            features=features,
            labels=labels,
        )
        if self.args.world_size > 1:  # every rank must act on the very same matrix
            gains = broadcast(gains.to(self.args.device).contiguous(), from_process=0)
        self.gains = gains.cpu()
        if self.args.pair_distribution == "uniform":
            self.distribution = torch.full((self.num_labels, self.num_labels), 1.0 / self.num_labels**2)
        else:
            self.distribution = sampling_distribution(
                self.gains, self.args.sampling_temperature, self.args.sampling_epsilon, self.args.scale_free_temperature
            )
        if self.sampler is not None:
            self.sampler.set_distribution(self.distribution)
        self.max_gain_history.append(float(self.gains.max()))
        return self._refresh_logs(confusion, raw_prototypes)

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
        special = sorted({"params", "model", "optimizer_dict"} & set(optimizer_kwargs))
        if special:
            raise ValueError(
                f"optim={self.args.optim!r} builds its own parameter groups ({', '.join(special)}), which would replace "
                "SelMix's head / backbone groups; choose an optimizer such as adamw_torch or sgd"
            )
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    # -- logging, early stop ----------------------------------------------------------------------
    def _refresh_logs(self, confusion: torch.Tensor, prototypes: torch.Tensor) -> dict[str, float]:
        p = self.distribution
        norms = prototypes.norm(dim=1)  # how unequal the classes' weights in the Gram z_i . z_q are
        logs = {f"selmix/{key}": value for key, value in self.objective.report(confusion).items()}
        logs["selmix/max_gain"] = float(self.gains.max())
        logs["selmix/pair_entropy"] = float(-(p * torch.log(p.clamp_min(1e-30))).sum())
        logs["selmix/prototype_norm_ratio"] = float(norms.max() / norms.min().clamp_min(torch.finfo(norms.dtype).tiny))
        logs.update(multiplier_logs(self.objective, "selmix"))
        return logs

    def after_refresh(self, control: Any) -> None:
        """G and P to TensorBoard when it is a report_to target; the published early stop, when asked for."""
        if "tensorboard" in self.args.report_to:
            log_refresh_heatmaps(self, self.class_names())
        if self.args.early_stop_on_gain_plateau and self.gain_plateaued():
            logger.info("SelMix: max gain has plateaued over %d refreshes; stopping", self.args.plateau_window)
            control.should_training_stop = True

    def class_names(self) -> list[str]:
        """The label names of the model's config (the indices when it has none)."""
        id2label = getattr(getattr(unwrap(self.model), "config", None), "id2label", None) or {}
        return [str(id2label.get(k, k)) for k in range(self.num_labels)]

    def gain_plateaued(self) -> bool:
        """Published early stop: over the last `plateau_window` refreshes, |mean - last| < tolerance |mean| of max G."""
        window = self.args.plateau_window
        if len(self.max_gain_history) < window:
            return False
        recent = self.max_gain_history[-window:]
        mean = sum(recent) / window
        return abs(mean - recent[-1]) < self.args.plateau_tolerance * abs(mean)

    def card_stage(self) -> dict[str, Any]:
        """This run as the model card's training stage."""
        a = self.args
        return {
            "title": f"SelMix fine-tuning for {self.objective.name}", "method": "selmix", "cite": ["selmix"],
            "objective": self.objective.name,
            "description": "mixup of pooled embeddings between class pairs drawn by their estimated gain in the objective",
            "settings": {
                **optimisation_settings(self, "pairs per step"), "objective_options": a.objective_options or None,
                "backbone_lr_ratio": a.backbone_lr_ratio, "gain_estimator": a.gain_estimator,
                "equal_norm_prototypes": a.equal_norm_prototypes,
                "gain_refresh_steps": a.gain_refresh_steps, "sampling_temperature": a.sampling_temperature,
                "scale_free_temperature": a.scale_free_temperature, "mix_lambda_min": a.mix_lambda_min,
                "pair_distribution": a.pair_distribution,
            },
        }

    # -- checkpoints ------------------------------------------------------------------------------
    def extra_state_dict(self) -> dict[str, Any]:
        """Everything SelMix adds to a checkpoint: multipliers, P, G, the gain history and this rank's streams."""
        return {
            "objective": self.objective.state_dict(),
            "distribution": self.distribution,
            "gains": self.gains,
            "max_gain_history": list(self.max_gain_history),
            "sampler": None if self.sampler is None else self.sampler.state_dict(),
            "mix_generator": self._mix_generator.get_state(),
        }

    def load_extra_state_dict(self, state: dict[str, Any], same_rank: bool) -> None:
        """Restore a checkpoint's SelMix state; another rank's sampler stream is not reused."""
        self.objective.load_state_dict(state["objective"])
        self.distribution, self.gains = state["distribution"], state["gains"]
        self.max_gain_history = list(state["max_gain_history"])
        if same_rank:
            self._mix_generator.set_state(state["mix_generator"])
            self._sampler_state = state["sampler"]


__all__ = ["SelMixConfig", "SelMixTrainer"]
