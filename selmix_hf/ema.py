"""An exponential moving average of a model's weights, as FixMatch evaluates and saves."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class WeightAverage:
    """EMA of a model's floating parameters (buffers such as BatchNorm statistics are copied, not averaged).

    Update t uses decay min(decay, (1 + t) / (10 + t)): a warm-up, so a run of a few hundred steps from pretrained
    weights is not averaged back to its starting point.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay, self.updates = decay, 0
        self.weights = {name: t.detach().clone() for name, t in self._tensors(model)}

    @staticmethod
    def _tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        yield from ((n, p) for n, p in model.named_parameters() if p.dtype.is_floating_point)
        yield from ((n, b) for n, b in model.named_buffers() if b is not None)

    def update(self, model: nn.Module) -> None:
        """Average in the model's current weights (after an optimiser step)."""
        decay = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        self.updates += 1
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in self._tensors(model):
                average = self.weights[name]
                if name in parameters:
                    average.mul_(decay).add_(tensor.detach().to(average), alpha=1.0 - decay)
                else:
                    average.copy_(tensor.detach())

    @classmethod
    def snapshot(cls, model: nn.Module) -> dict[str, torch.Tensor]:
        """A copy of the model's weights (the tensors an average covers)."""
        return {name: tensor.detach().clone() for name, tensor in cls._tensors(model)}

    @classmethod
    def load_into(cls, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Copy weights (of `snapshot` or an average) into the model in place."""
        with torch.no_grad():
            for name, tensor in cls._tensors(model):
                tensor.copy_(weights[name])

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The averaged weights in the model inside the block, its own weights restored after."""
        saved = self.snapshot(model)
        self.load_into(model, self.weights)
        try:
            yield
        finally:
            self.load_into(model, saved)

    def state_dict(self) -> dict[str, object]:
        return {"weights": dict(self.weights), "updates": self.updates}

    def load_state_dict(self, state: dict[str, object]) -> None:
        for name, tensor in state["weights"].items():
            self.weights[name].copy_(tensor)
        self.updates = int(state["updates"])


__all__ = ["WeightAverage"]
