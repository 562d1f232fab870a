"""SelMixTrainer: a drop-in `transformers.Trainer` that fine-tunes for a non-decomposable objective.

One SelMix run, as this file implements it:
validation pass -> confusion matrix + prototypes -> objective multipliers -> gain matrix -> sampling
distribution -> pair batches -> one forward over both halves, the head's input mixed by a hook ->
cross-entropy on the first half's labels -> every `gain_refresh_steps` steps, back to the validation pass.
Semi-supervised (``unlabeled_dataset=``): each refresh also pseudo-labels the unlabelled pool, and the partners
are drawn from it by pseudo-class; the pool's own labels, if any, are never read.
For a group objective (``group_column``), the rows of the confusion matrix, the prototypes, the gains and the pairs
are the (class, group) cells of the validation set instead of the classes; a pair keeps its first cell's class.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import broadcast
from torch.utils.data import DataLoader

from . import _compat
from .base_trainer import BaseTrainer
from .config import SelMixConfig
from .features import PooledFeatures, logits_of, unwrap
from .gains import class_prototypes, equal_norm_prototypes, gain_matrix, sampling_distribution
from .groups import CellLayout, cell_confusion_counts, normalized_cell_confusion
from .metrics import confusion_counts, normalized_confusion
from .objectives import CONFUSION_CLIP, OBJECTIVES, Objective, multiplier_logs, objective_for_training, vector_logs
from .plots import log_refresh_heatmaps
from .sampling import PairBatchSampler, rank_seed
from .sharding import whole_head
from .unlabeled import (
    UNCONFIDENT,
    PoolSample,
    UnlabeledView,
    pool_distribution,
    pool_precision,
    pseudo_labels,
    unlabeled_view,
)
from .validation import gathered_validation_pass

logger = logging.getLogger(__name__)

# SelMix warns when, for NEGLIGIBLE_REFRESHES refreshes in a row, the largest gain predicts a change of the
# objective below NEGLIGIBLE_CHANGE of its scale (max(|psi|, 1): 0.001 point of recall for the registry's objectives,
# which lie in [0, 1]) over a refresh interval; a head whose weights have a
# standard deviation below FRESH_HEAD_STD is reported as untrained (transformers initialises heads at std 0.02).
NEGLIGIBLE_CHANGE = 1e-5
INDEX_KEY = "_selmix_index"  # the dataset indices a pair batch carries, for error messages and the sampler position
DRAWN_CLASS_KEY = "_selmix_drawn_class"  # with pool anchors: the class each first member was drawn as
NEGLIGIBLE_REFRESHES = 3
FRESH_HEAD_STD = 0.03
MAX_LISTED_CLASSES = 20  # classes of the unlabelled pool's distribution a card lists by name


class SelMixTrainer(BaseTrainer):
    """`Trainer` whose training steps are SelMix pair mixups; evaluation and prediction are the plain model's.

    Takes the `Trainer` arguments plus ``validation_dataset`` (the labelled held-out set the gains are estimated
    on; defaults to ``eval_dataset``), optionally ``objective`` (an `Objective` instance, e.g. a
    `CustomObjective`, instead of ``args.objective``) and ``unlabeled_dataset`` (a pool of samples with the
    training set's input columns whose pseudo-labels choose the mixing partners: semi-supervised SelMix).
    """

    config_class = SelMixConfig
    _name = "selmix"
    _paper = ("selmix",)
    _tag_names = ("mixup",)
    state_stem = "selmix_state"
    reads_head_weights = True
    supports_label_smoothing = True
    batch_unit = "pairs per step"
    random_access_reason = "draws the two samples of each mixing pair by class, by index"

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        args: SelMixConfig | None = None,
        *,
        validation_dataset: Any = None,
        objective: Objective | None = None,
        unlabeled_dataset: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, args, validation_dataset=validation_dataset, **kwargs)
        self.use_validation_set("SelMixTrainer")
        self.partners = args.partner_source(unlabeled_dataset is not None)
        self.unlabeled_dataset: UnlabeledView | None = (
            None
            if unlabeled_dataset is None
            else unlabeled_view(
                unlabeled_dataset, self.train_dataset, self._label_columns(), _compat.model_input_columns(self)
            )
        )
        # the (class, group) cells the pairs are drawn between, for a group objective; None: the classes
        self.cells = self._cell_layout() if _needs_groups(objective, args.objective) else None
        self.train_rows = self.train_labels if self.cells is None else self._training_cells()
        self.num_rows = self.num_labels if self.cells is None else self.cells.num_cells
        self.pseudo_labels: torch.Tensor | None = None  # of the pool at the last refresh (-1: not drawn)
        self.pool_precision: torch.Tensor | None = None  # partners='by_precision': per pseudo-class, estimated
        self._pool_sample: PoolSample | None = None  # with unlabeled_refresh_size: the part of the pool labelled
        self.objective = (
            objective
            if objective is not None
            else objective_for_training(
                args.objective,
                self.num_labels,
                self.class_counts,
                args.tail_fraction,
                class_prior=args.class_prior,
                **args.objective_options,
                **self._cell_options(),
            )
        )
        if self.objective.num_classes != self.num_labels:
            raise ValueError(f"the objective has {self.objective.num_classes} classes, the model {self.num_labels}")
        if self.objective.num_rows != self.num_rows:
            raise ValueError(
                f"the objective reads {self.objective.num_rows} rows of the confusion matrix, but the validation set "
                f"has {self.num_rows} {'(class, group) cells' if self.cells else 'classes'}; build a group objective "
                "by name (objective=<name>, group_column=<column>) so that its cells are the validation set's"
            )
        self.class_prior = self._resolve_prior()

        self.pooled = PooledFeatures(self.head)
        self._batchnorms = [m for m in unwrap(model).modules() if _compat.is_batchnorm(m)]
        self._mix_generator = torch.Generator().manual_seed(rank_seed(args.seed, args.process_index) ^ 0x5E1)
        self.sampler: PairBatchSampler | None = None
        self.distribution: torch.Tensor | None = None
        self.gains: torch.Tensor | None = None
        self.head_std = float("nan")  # the head weight's std at the last refresh
        self.max_gain_history: list[float] = []
        self.objective_history: list[float] = []  # the objective on validation at each refresh
        self.negligible_refreshes = 0  # consecutive refreshes whose largest gain could not move the objective
        self.objective_scale = 1.0  # max(|psi|, 1) at the last refresh: what "negligible" is relative to
        self.last_confusion_counts: torch.Tensor | None = None
        self._sampler_state: dict[str, Any] | None = None
        self._batches_used = 0  # pair batches trained on (workers may have drawn more)
        self._current_indices: torch.Tensor | None = None  # read only for an error message: no sync per step
        self.schedule_refresh(args.gain_refresh_steps)

    def _cell_layout(self) -> CellLayout:
        """The (class, group) cells of the validation set, which a group objective's pairs are drawn between."""
        if self.unlabeled_dataset is not None:
            raise ValueError(
                "a group objective draws both members of a pair by (class, group) cell, and an unlabelled pool has no "
                "groups: drop unlabeled_dataset, or optimise a class objective"
            )
        return self.validation_cells("SelMixTrainer")

    def _cell_options(self) -> dict[str, Any]:
        """The cells and their prior for a group objective built by name (nothing for a class objective)."""
        if self.cells is None:
            return {}
        prior = self.args.class_prior
        return {"cell_classes": list(self.cells.classes), "cell_prior": self.cells.prior(prior).tolist()}

    def _training_cells(self) -> torch.Tensor:
        """The cell of each training sample; cells the validation set lacks have no gain and are never drawn (-1)."""
        rows = self.cells.cell_of(self.train_labels, self.train_groups)
        missing = rows.numpy() < 0
        pairs = zip(self.train_labels[missing].tolist(), self.train_groups[missing].tolist())
        unseen = sorted({self.cells.describe_pair(k, g) for k, g in pairs})
        if unseen:
            logger.warning(
                "SelMix: %d (class, group) cells of the training set have no validation sample, so no gain: their "
                "samples are never drawn into pairs (%s%s). Add validation samples of those cells to mix them.",
                len(unseen),
                ", ".join(unseen[:10]),
                " ..." if len(unseen) > 10 else "",
            )
        return rows

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
        pool = self.unlabeled_dataset
        if pool is not None:
            dataset = torch.utils.data.ConcatDataset([dataset, pool])
        self.sampler = PairBatchSampler(
            self.train_rows,
            self.num_rows,
            self.args.per_device_train_batch_size,
            seed=self.args.seed,
            rank=self.args.process_index,
            world_size=self.args.world_size,
            accumulation_steps=self.args.gradient_accumulation_steps,  # no short last step in an epoch
            pool_size=0 if pool is None else len(pool),
            pool_fraction=self.pool_precision
            if self.pool_precision is not None
            else self.args.pool_fraction(self.partners),
            pool_anchors=self.args.unlabeled_anchors,
        )
        if self._sampler_state is not None:
            self.sampler.load_state_dict(self._sampler_state)
            self._sampler_state = None
        else:
            if self.pseudo_labels is not None:
                self.sampler.set_pool(self.pseudo_labels, self.pool_precision)
            if self.distribution is not None:
                self.sampler.set_distribution(self.distribution)
        return DataLoader(
            IndexedDataset(dataset),
            batch_sampler=self.sampler,
            collate_fn=IndexedCollator(collator),
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0,
            prefetch_factor=self.args.dataloader_prefetch_factor if self.args.dataloader_num_workers > 0 else None,
            # its own generator: a new epoch's iterator must not draw from the global RNG that dropout uses
            generator=torch.Generator().manual_seed(rank_seed(self.args.seed, self.args.process_index) ^ 0xD1),
        )

    def refresh(self) -> dict[str, float]:
        """Validation pass -> confusion + prototypes -> multipliers -> gain matrix -> new sampling distribution."""
        if self.cells is None:
            features, logits, labels = self.validation_pass(self.pooled)
            rows = labels
            self.last_confusion_counts = confusion_counts(labels.cpu(), logits.argmax(dim=1).cpu(), self.num_labels)
            confusion = normalized_confusion(self.last_confusion_counts, self.class_prior)
        else:  # rows are (class, group) cells
            features, logits, labels, groups = self.validation_pass(self.pooled, with_groups=True)
            rows = self.cells.cell_of(labels.cpu(), groups.cpu()).to(labels.device)
            predictions = logits.argmax(dim=1).cpu()
            self.last_confusion_counts = cell_confusion_counts(labels.cpu(), predictions, groups.cpu(), self.cells)
            confusion = normalized_cell_confusion(self.last_confusion_counts, self.cells, self.class_prior)
        raw_prototypes = class_prototypes(features, rows, self.num_rows)
        prototypes = equal_norm_prototypes(raw_prototypes) if self.args.equal_norm_prototypes else raw_prototypes
        self.objective.update(confusion)
        with whole_head(self.pooled.head, self.model_wrapped) as (weight, bias):  # gathered if sharded
            weight, bias = weight.float(), None if bias is None else bias.float()
        self.head_std = float(weight.std())  # read by the negligible-gain warning
        gains = gain_matrix(
            self.objective,
            confusion.to(features),
            prototypes,
            weight,
            bias,
            mix_lambda_min=self.args.mix_lambda_min,
            estimator=self.args.gain_estimator,
            class_prior=self.class_prior,
            features=features,
            labels=rows,
        )
        if self.args.world_size > 1:  # every rank must act on the very same matrix
            gains = broadcast(gains.to(self.args.device).contiguous(), from_process=0)
        self.gains = gains.cpu()
        if self.args.pair_distribution == "uniform":
            self.distribution = torch.full((self.num_rows, self.num_rows), 1.0 / self.num_rows**2)
        else:
            self.distribution = sampling_distribution(
                self.gains, self.args.sampling_temperature, self.args.sampling_epsilon, self.args.scale_free_temperature
            )
        if self.sampler is not None:
            self.sampler.set_distribution(self.distribution)
        pool_logs = self._refresh_pool() if self.unlabeled_dataset is not None else {}
        self.max_gain_history.append(float(self.gains.max()))
        self.objective_history.append(float(self.objective.value(confusion)))
        surrogate = self.objective.surrogate(confusion.clamp_min(CONFUSION_CLIP))
        self.objective_scale = max(abs(float(surrogate)), 1.0)
        return {**self._refresh_logs(confusion, raw_prototypes), **pool_logs}

    def _refresh_pool(self) -> dict[str, float]:
        """Pseudo-label the unlabelled pool (one gathered pass, each sample once) and regroup its partners."""
        pool, size = self.unlabeled_dataset, self.args.unlabeled_refresh_size
        if size is None or size >= len(pool):
            _, logits, _ = gathered_validation_pass(self, pool, purpose="pseudo-labelling", labelled=False)
            pseudo = pseudo_labels(logits.cpu(), self.args.pseudo_label_threshold)
        else:  # a fresh random subset; the rest of the pool is not drawn until a later refresh labels it
            if self._pool_sample is None:
                self._pool_sample = PoolSample(pool, size)
            chosen = self._pool_sample.draw(self.args.seed, self.state.global_step)
            _, logits, _ = gathered_validation_pass(self, self._pool_sample, purpose="pseudo-labelling", labelled=False)
            pseudo = torch.full((len(pool),), UNCONFIDENT, dtype=torch.long)
            pseudo[chosen] = pseudo_labels(logits.cpu(), self.args.pseudo_label_threshold)
        if not bool((pseudo >= 0).any()) and self.args.pool_fraction(self.partners) > 0:
            if self.pseudo_labels is None:
                raise ValueError(
                    f"no unlabelled sample reaches pseudo_label_threshold={self.args.pseudo_label_threshold} at the "
                    "first refresh, so no partner can be drawn from the pool; lower the threshold"
                )
            logger.warning(
                "SelMix: no unlabelled sample reaches pseudo_label_threshold=%s at step %d; the pool keeps the "
                "pseudo-labels of the last refresh",
                self.args.pseudo_label_threshold,
                self.state.global_step,
            )
            pseudo = self.pseudo_labels
        self.pseudo_labels = pseudo
        if self.partners == "by_precision":  # validation confusion of this refresh -> the pool's share per class
            self.pool_precision = pool_precision(self.last_confusion_counts, self.pseudo_labels)[0]
        if self.sampler is not None:
            self.sampler.set_pool(self.pseudo_labels, self.pool_precision)
        shares = pool_distribution(self.pseudo_labels, self.num_labels)
        labelled = len(self._pool_sample) if self._pool_sample is not None else len(self.pseudo_labels)
        logs = {"selmix/unlabeled_confident": float((self.pseudo_labels >= 0).sum()) / labelled}
        logs.update(vector_logs("selmix/unlabeled_share", shares))
        if self.pool_precision is not None:
            logs.update(vector_logs("selmix/pool_precision", self.pool_precision))
        return logs

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """Training: CE of the mixed pairs on the first half's labels. Evaluation: the model's plain CE."""
        if not model.training:  # evaluate() / predict(): no mixing
            return self.evaluation_loss(model, inputs, return_outputs)
        inputs, labels = self.split_labels(inputs)
        self._current_indices = inputs.pop(INDEX_KEY, None)
        drawn = inputs.pop(DRAWN_CLASS_KEY, None)
        if drawn is not None and self._current_indices is not None:
            labels = self._anchor_labels(labels, drawn)
        self._batches_used += 1
        if self.args.freeze_batchnorm:
            for module in self._batchnorms:
                module.eval()
        pairs = labels.shape[0] // 2
        lam_min = self.args.mix_lambda_min
        lam = lam_min + (1.0 - lam_min) * torch.rand(pairs, generator=self._mix_generator)
        with self.pooled.mixing(lam):
            outputs = model(**inputs)
        logits = logits_of(outputs)
        loss = F.cross_entropy(logits.float(), labels[:pairs], label_smoothing=self.args.label_smoothing_factor)
        self.check_finite_loss(loss, inputs, logits)
        return (loss, outputs) if return_outputs else loss

    def _anchor_labels(self, labels: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
        """The labels of a pair batch whose first members may come from the pool: those take the pseudo-class the
        sampler drew them as (not the latest pseudo-labels: workers draw batches ahead of a refresh)."""
        pairs, offset = labels.shape[0] // 2, len(self.train_labels)
        from_pool = (self._current_indices[:pairs] >= offset).to(labels.device)
        labels = labels.clone()
        labels[:pairs] = torch.where(from_pool, drawn[:pairs].to(labels), labels[:pairs])
        return labels

    def batch_indices(self) -> list[int] | None:
        """The dataset indices of the pair batch being trained on (first halves, then their partners)."""
        return None if self._current_indices is None else self._current_indices.tolist()

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
        if self.args.backbone_lr_ratio != 1 and not any(is_head for is_head, _ in groups):
            raise ValueError(
                "backbone_lr_ratio needs the classifier head's parameters among the model's, but the wrapped model "
                "holds none of them: FSDP1 without use_orig_params flattens them. Set fsdp_config={'use_orig_params': "
                "True} (accelerate config: fsdp_use_orig_params: true), use FSDP2, or set backbone_lr_ratio=1"
            )
        base_lr = self.args.learning_rate
        param_groups = [
            {
                "params": params,
                "lr": base_lr if is_head else base_lr * self.args.backbone_lr_ratio,
                "weight_decay": self.args.weight_decay if decays else 0.0,
            }
            for (is_head, decays), params in sorted(
                groups.items(), reverse=True
            )  # head first: its lr is the one logged
        ]
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        special = sorted({"params", "model", "optimizer_dict"} & set(optimizer_kwargs))
        if special:
            raise ValueError(
                f"optim={self.args.optim!r} builds its own parameter groups ({', '.join(special)}), which would "
                "replace SelMix's head / backbone groups; choose an optimizer such as adamw_torch or sgd"
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
        """G and P to TensorBoard; a warning when the gains cannot move the objective; the published early stop."""
        if "tensorboard" in self.args.report_to:
            log_refresh_heatmaps(self, self.row_names())
        self._warn_if_gains_negligible()
        if self.args.early_stop_on_gain_plateau and self.gain_plateaued():
            logger.info("SelMix: max gain has plateaued over %d refreshes; stopping", self.args.plateau_window)
            control.should_training_stop = True

    def gain_is_negligible(self) -> bool:
        """Whether the largest gain, at the head's learning rate over one refresh interval, moves the objective by
        less than NEGLIGIBLE_CHANGE of its scale max(|psi|, 1): first order, lr x steps x max G."""
        if self.gains is None:
            return False
        change = self.args.learning_rate * self.args.gain_refresh_steps * max(float(self.gains.max()), 0.0)
        return change < NEGLIGIBLE_CHANGE * self.objective_scale

    def _warn_if_gains_negligible(self) -> None:
        self.negligible_refreshes = self.negligible_refreshes + 1 if self.gain_is_negligible() else 0
        if self.negligible_refreshes != NEGLIGIBLE_REFRESHES:
            return
        names = self.class_names()
        never = torch.nonzero(self.last_confusion_counts.sum(0) == 0).flatten().tolist()
        reasons = []
        if never:
            reasons.append(
                f"the model never predicts {', '.join(names[k] for k in never[:10])} on the validation "
                "set, and the first-order gain of a class the model never predicts is ~0"
            )
        if self.head_std < FRESH_HEAD_STD:
            reasons.append(f"the classifier head looks freshly initialised (weight std {self.head_std:.3f})")
        why = "; ".join(reasons) or "the gains are small for every pair of classes"
        logger.warning(
            "SelMix's gains in %s have been negligible for %d refreshes in a row (largest gain %.2e: a first-order "
            "change below %.0e per refresh interval at learning_rate=%g), so the pairs are drawn almost uniformly and "
            "the run is plain mixup until the gains grow. %s. SelMix fine-tunes a classifier already trained on the "
            "task: train it first (e.g. LongTailTrainer with loss_type='logit_adjusted'), or raise learning_rate, or "
            "try gain_estimator='exact'. If no refresh of the run finds a larger gain, the model card will not claim "
            "the objective was optimised.",
            self.objective.name,
            NEGLIGIBLE_REFRESHES,
            max(self.max_gain_history[-NEGLIGIBLE_REFRESHES:]),
            NEGLIGIBLE_CHANGE,
            self.args.learning_rate,
            why[:1].upper() + why[1:],
        )

    def objective_was_moved(self) -> bool:
        """False when every refresh of the run found negligible gains: the run could not optimise its objective."""
        return not self.max_gain_history or self.negligible_refreshes < len(self.max_gain_history)

    def class_names(self) -> list[str]:
        """The label names of the model's config (the indices when it has none)."""
        id2label = getattr(getattr(unwrap(self.model), "config", None), "id2label", None) or {}
        return [str(id2label.get(k, k)) for k in range(self.num_labels)]

    def row_names(self) -> list[str]:
        """The names of the pairs' rows: the class names, or ``class/g<group>`` for (class, group) cells."""
        names = self.class_names()
        if self.cells is None:
            return names
        return [f"{names[k]}/g{g}" for k, g in zip(self.cells.classes, self.cells.groups)]

    def gain_plateaued(self) -> bool:
        """Published early stop: over the last `plateau_window` refreshes, |mean - last| < tolerance |mean| of max G."""
        window = self.args.plateau_window
        if len(self.max_gain_history) < window:
            return False
        recent = self.max_gain_history[-window:]
        mean = sum(recent) / window
        return abs(mean - recent[-1]) < self.args.plateau_tolerance * abs(mean)

    def unused_settings(self) -> set[str]:
        """Without a pool the semi-supervised settings did nothing; unlabeled_ratio acts only for 'mixed'."""
        if self.unlabeled_dataset is None:
            return set(self.args.SEMI_SUPERVISED_FIELDS)
        return set() if self.partners == "mixed" else {"unlabeled_ratio"}

    def stage_title(self) -> str:
        """The card's stage title: the objective, or that the run could not move it."""
        if self.objective_was_moved():
            return f"SelMix fine-tuning for {self.objective.name}"
        return f"SelMix run for {self.objective.name} (the objective could not be moved: gains stayed negligible)"

    def stage_objective(self) -> str | None:
        """The objective, unless the run could not move it (then the card claims none)."""
        return self.objective.name if self.objective_was_moved() else None

    def stage_description(self) -> str:
        """What SelMix did, with the validation objective at the first and last refresh."""
        units = "class pairs" if self.cells is None else f"pairs of the {self.cells.num_cells} (class, group) cells"
        text = f"mixup of pooled embeddings between {units} drawn by their estimated gain in the objective"
        if self.cells is not None:
            text += " (each mixup keeps its first cell's class)"
        if self.objective_history:
            text += (
                f"; validation {self.objective.name} {self.objective_history[0]:.3f} at the first refresh, "
                f"{self.objective_history[-1]:.3f} at the last"
            )
        if self.unlabeled_dataset is not None and self.pseudo_labels is not None:
            text += "; " + self.pool_description()
        return text

    def pool_description(self) -> str:
        """Where the partners came from, and the unlabelled pool's class distribution as the model last saw it."""
        names, pseudo = self.class_names(), self.pseudo_labels
        shares = pool_distribution(pseudo, self.num_labels)
        confident = int((pseudo >= 0).sum())
        source = {
            "unlabeled": "partners drawn from an unlabelled pool",
            "mixed": f"{self.args.unlabeled_ratio:.0%} of partners drawn from an unlabelled pool",
            "by_precision": "partners of each class drawn from an unlabelled pool with the probability that its "
            f"pseudo-label is right, estimated on validation (lowest: {self._lowest_precision()}), else labelled",
            "labeled": "first members also drawn from an unlabelled pool",
        }[self.partners]
        anchors = (
            "; its confident samples also drawn as first members, labelled by their pseudo-labels"
            if self.args.unlabeled_anchors and self.partners != "labeled"
            else ""
        )
        top = sorted(range(self.num_labels), key=lambda k: -float(shares[k]))
        listed = ", ".join(f"{names[k]} {float(shares[k]):.3f}" for k in top[:MAX_LISTED_CLASSES])
        more = f" and {self.num_labels - MAX_LISTED_CLASSES} more" if self.num_labels > MAX_LISTED_CLASSES else ""
        size = self.args.unlabeled_refresh_size
        labelled = f"a random {size} of them pseudo-labelled per refresh, " if size and size < len(pseudo) else ""
        return (
            f"{source} of {len(pseudo)} samples by pseudo-label ({labelled}{confident} above the confidence "
            f"threshold at the last refresh){anchors}; the pool's estimated class distribution: {listed}{more}"
        )

    def _lowest_precision(self, shown: int = 3) -> str:
        """The pseudo-classes whose pool partners were least trusted at the last refresh, for the card."""
        if self.pool_precision is None:
            return "not estimated"
        names = self.class_names()
        order = sorted(range(self.num_labels), key=lambda k: float(self.pool_precision[k]))[:shown]
        return ", ".join(f"{names[k]} {float(self.pool_precision[k]):.2f}" for k in order)

    # -- checkpoints ------------------------------------------------------------------------------
    def method_state(self) -> dict[str, Any]:
        """Everything SelMix adds to a checkpoint: multipliers, P, G, the histories and this rank's streams."""
        return {
            "objective": self.objective.state_dict(),
            "distribution": self.distribution,
            "gains": self.gains,
            "max_gain_history": list(self.max_gain_history),
            "objective_history": list(self.objective_history),
            "negligible_refreshes": self.negligible_refreshes,
            "sampler": self._sampler_state  # a restored position not yet handed to a sampler
            if self._sampler_state is not None or self.sampler is None
            else self.sampler.state_dict(self._batches_used),
            "mix_generator": self._mix_generator.get_state(),
            "pseudo_labels": self.pseudo_labels,
            "pool_precision": self.pool_precision,
        }

    def load_method_state(self, state: dict[str, Any], same_rank: bool) -> None:
        """Restore a checkpoint's SelMix state; another rank's sampler stream is not reused."""
        self.objective.load_state_dict(state["objective"])
        self.distribution, self.gains = state["distribution"], state["gains"]
        self.max_gain_history = list(state["max_gain_history"])
        self.objective_history = list(state.get("objective_history", []))
        self.negligible_refreshes = int(state.get("negligible_refreshes", 0))
        self.pseudo_labels = state.get("pseudo_labels")
        self.pool_precision = state.get("pool_precision")
        if same_rank:
            self._mix_generator.set_state(state["mix_generator"])
            self._sampler_state = state["sampler"]
            self._batches_used = 0 if state["sampler"] is None else int(state["sampler"]["batches_drawn"])


def _needs_groups(objective: Objective | None, name: str) -> bool:
    """Whether the objective (the given instance, else the named one) ranges over (class, group) cells."""
    if objective is not None:
        return objective.needs_groups and objective.num_rows != objective.num_classes
    return name in OBJECTIVES and OBJECTIVES[name].needs_groups


class IndexedDataset(torch.utils.data.Dataset):
    """A dataset whose items carry their index: ``(i, class drawn as, dataset[i])``, so a batch knows which samples
    it holds; the sampler gives ``(i, k)`` for a first member drawn as class k, a plain ``i`` otherwise (-1)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[int, int, Any]:
        index, drawn = key if isinstance(key, tuple) else (key, -1)
        return index, drawn, self.dataset[index]


class IndexedCollator:
    """The user's collator on the samples, plus their dataset indices under INDEX_KEY and, when the sampler gave
    them, the classes the first members were drawn as under DRAWN_CLASS_KEY (both popped before the forward)."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, items: list[tuple[int, int, Any]]) -> dict[str, Any]:
        batch = dict(self.collator([item for _, _, item in items]))
        batch[INDEX_KEY] = torch.tensor([index for index, _, _ in items])
        if any(drawn >= 0 for _, drawn, _ in items):
            batch[DRAWN_CLASS_KEY] = torch.tensor([drawn for _, drawn, _ in items])
        return batch


__all__ = ["SelMixConfig", "SelMixTrainer"]
