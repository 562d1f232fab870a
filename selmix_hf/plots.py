"""Figures of a run: per-class recall before/after, gain matrix and pair-sampling heatmaps; PNG and TensorBoard."""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)
MAX_TICK_LABELS = 60  # beyond this many classes the axes are not labelled class by class
MAX_BARS = 100  # beyond this many classes per-class bars are unreadable: recall against frequency rank instead


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'selmix-hf[plots]' (or pip install matplotlib)") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def per_class_recall_figure(
    names: Sequence[str],
    after: Sequence[float],
    before: Sequence[float] | None = None,
    labels: tuple[str, str] = ("before", "after"),
    counts: Sequence[int] | None = None,
) -> Any:
    """Bars of each class's recall, before and after side by side, classes in the given order; beyond MAX_BARS
    classes (and given the training counts) recall against frequency rank instead."""
    if len(names) > MAX_BARS and counts is not None:
        return recall_by_frequency_figure(counts, after, before, labels)
    plt = _pyplot()
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(min(24, max(6, 0.3 * len(names))), 4))
    width = 0.4 if before is not None else 0.8
    if before is not None:
        ax.bar(x - width / 2, before, width, label=labels[0])
    ax.bar(x + (width / 2 if before is not None else 0), after, width, label=labels[1])
    if len(names) <= MAX_TICK_LABELS:
        ax.set_xticks(x, [str(n) for n in names], rotation=60, ha="right", fontsize=7)
    else:
        ax.set_xlabel("class index")
    ax.set_ylabel("recall")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def recall_by_frequency_figure(
    counts: Sequence[int],
    after: Sequence[float],
    before: Sequence[float] | None = None,
    labels: tuple[str, str] = ("before", "after"),
) -> Any:
    """Many classes: each class's recall as a dot at its training-frequency rank, a running mean over neighbouring
    ranks as a line, before and after, with the many / medium / few-shot groups shaded."""
    from .metrics import shot_groups

    plt = _pyplot()
    order = np.argsort(-np.asarray(counts), kind="stable")  # most frequent first
    window = max(5, len(order) // 40)
    fig, ax = plt.subplots(figsize=(10, 4))
    for name, (values, colour) in {labels[0]: (before, "tab:blue"), labels[1]: (after, "tab:orange")}.items():
        if values is None:
            continue
        ranked = np.asarray(values, dtype=np.float64)[order]
        ax.scatter(np.arange(len(ranked)), ranked, s=4, alpha=0.35, color=colour, linewidths=0)
        smooth = np.convolve(ranked, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(len(smooth)) + (window - 1) / 2, smooth, color=colour, label=f"{name} (mean of {window})")
    start = 0
    for (group, members), shade in zip(shot_groups(counts).items(), ("0.95", "0.88", "0.95")):
        if members:
            ax.axvspan(start - 0.5, start + len(members) - 0.5, color=shade, zorder=0)
            ax.text(start + len(members) / 2, 1.02, f"{group}-shot ({len(members)})", ha="center", fontsize=8)
            start += len(members)
    ax.set_xlabel("class, by training samples (most first)")
    ax.set_ylabel("recall")
    ax.set_ylim(0, 1.08)
    ax.legend(loc="lower left", fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def heatmap_figure(matrix: Any, names: Sequence[str], title: str, colorbar: str) -> Any:
    """A K x K heatmap (rows: class i, the label kept; columns: class j, mixed in), e.g. the gains or P(i, j)."""
    plt = _pyplot()
    values = np.asarray(matrix, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(values, cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=colorbar)
    if len(names) <= MAX_TICK_LABELS // 2:
        ticks = np.arange(len(names))
        ax.set_xticks(ticks, [str(n) for n in names], rotation=90, fontsize=6)
        ax.set_yticks(ticks, [str(n) for n in names], fontsize=6)
    ax.set_xlabel("j (mixed-in class)")
    ax.set_ylabel("i (label kept)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def save_figure(fig: Any, path: str, tensorboard_writer: Any = None, tag: str | None = None, step: int = 0) -> str:
    """Write the figure as PNG (atomically) and, given a TensorBoard writer, log it there too; then close it."""
    plt = _pyplot()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    if tensorboard_writer is not None:
        tensorboard_writer.add_figure(
            tag or os.path.splitext(os.path.basename(path))[0], fig, global_step=step, close=False
        )
        tensorboard_writer.flush()
    plt.close(fig)
    return path


def tensorboard_writer(trainer: Any) -> tuple[Any, bool]:
    """(SummaryWriter, whether the caller must close it) when ``report_to`` includes tensorboard, else (None, False).

    During training this is the Trainer's own writer; after training (the Trainer closes it) a new writer on the
    same log directory, so the figures land in the run the scalars are in.
    """
    from transformers.integrations import TensorBoardCallback

    if not trainer.is_world_process_zero():
        return None, False
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            if callback.tb_writer is not None:
                return callback.tb_writer, False
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(log_dir=callback.logging_dir or os.path.join(trainer.args.output_dir, "runs")), True
    return None, False


def log_refresh_heatmaps(trainer: Any, names: Sequence[str]) -> bool:
    """At a SelMix refresh: the new G and P as TensorBoard images (when report_to has tensorboard); True if logged."""
    writer, owned = tensorboard_writer(trainer)
    if writer is None:
        return False
    try:
        _pyplot()
    except ImportError as err:  # the scalars still reach TensorBoard; only the images need matplotlib
        if not getattr(trainer, "_warned_no_matplotlib", False):
            logger.warning("no G / P heatmaps in TensorBoard: %s", err)
            trainer._warned_no_matplotlib = True
        return False
    for attribute, title, bar in (
        ("gains", "estimated gain G(i, j)", "gain"),
        ("distribution", "pair distribution P(i, j)", "probability"),
    ):
        fig = heatmap_figure(getattr(trainer, attribute).numpy(), names, title, bar)
        writer.add_figure(f"selmix/{attribute}", fig, global_step=trainer.state.global_step)
    writer.flush()
    if owned:
        writer.close()
    return True


def save_run_figures(
    trainer: Any,
    output_dir: str,
    names: Sequence[str],
    after: dict[str, float] | None,
    before: dict[str, float] | None = None,
    labels: tuple[str, str] = ("before", "after"),
) -> list[str]:
    """The run's PNGs in output_dir (per-class recall; for SelMix the last gain matrix and P), also to TensorBoard."""
    if not trainer.is_world_process_zero():
        return []
    writer, owned = tensorboard_writer(trainer)
    step = trainer.state.global_step
    written = []
    keys = [f"recall_{str(n).replace(' ', '_')}" for n in names]
    if after is not None and all(k in after for k in keys):
        previous = [before[k] for k in keys] if before is not None and all(k in before for k in keys) else None
        fig = per_class_recall_figure(names, [after[k] for k in keys], previous, labels, trainer.class_counts)
        written.append(
            save_figure(fig, os.path.join(output_dir, "per_class_recall.png"), writer, "per_class_recall", step)
        )
    for attribute, filename, title, bar in (
        ("gains", "gain_matrix.png", "estimated gain G(i, j)", "gain"),
        ("distribution", "sampling_distribution.png", "pair distribution P(i, j)", "probability"),
    ):
        matrix = getattr(trainer, attribute, None)
        if matrix is not None:
            fig = heatmap_figure(matrix.numpy(), names, title, bar)
            written.append(save_figure(fig, os.path.join(output_dir, filename), writer, f"selmix/{attribute}", step))
    if owned:
        writer.close()
    return written


__all__ = [
    "heatmap_figure",
    "per_class_recall_figure",
    "recall_by_frequency_figure",
    "save_figure",
    "save_run_figures",
    "log_refresh_heatmaps",
    "tensorboard_writer",
]
