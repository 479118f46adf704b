"""Curvature vectors waiting on parameters for the next ``step()``, handed over like ``.grad``.

Before ``step()``, ``param.curvature`` holds the tensor's curvature vector (the parameter's
shape); ``step()`` consumes it and resets it to ``None``. Micro-batches add their share.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["get_curvature", "set_curvature", "add_curvature", "clear_curvature"]

_ATTR = "curvature"


def get_curvature(param: Tensor) -> Tensor | None:
    """The curvature vector waiting on ``param`` for the next ``step()``, or ``None``."""
    return getattr(param, _ATTR, None)


def set_curvature(param: Tensor, value: Tensor | None) -> None:
    setattr(param, _ATTR, value)


def add_curvature(param: Tensor, value: Tensor) -> None:
    """Accumulate a curvature contribution (micro-batches add up, like ``.grad``)."""
    current = get_curvature(param)
    if current is None:
        set_curvature(param, value.detach().clone())
    else:
        current.add_(value)


def clear_curvature(param: Tensor) -> None:
    if get_curvature(param) is not None:
        set_curvature(param, None)
