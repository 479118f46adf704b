"""The typed inputs of one fused Ginger step: the tensors that share ``beta1`` (``StepBatch``), and each
tensor's block views for the passes (``TensorView``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .functional import Hyper

__all__ = ["StepBatch", "TensorView", "view_of"]


@dataclass
class StepBatch:
    """Tensors that take one fused step together (one batched solve per rank, one kernel call per pass).

    Per tensor: the parameter (this rank's slice of an FSDP2 tensor), gradient, curvature vector (``None``
    between refreshes), state (a local view for FSDP2), hyper-parameters, whether its blocks span ranks
    (their sums are completed by ``sharding.exchange``) and its whole block length (``None``: its own).
    """

    beta1: float
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    curvatures: list[Tensor | None] = field(default_factory=list)
    states: list[dict[str, Any]] = field(default_factory=list)
    hypers: list[Hyper] = field(default_factory=list)
    spans: list[bool] = field(default_factory=list)
    block_lengths: list[int | None] = field(default_factory=list)
    group: Any = None  # the process group of sharded tensors, or None

    def add(self, param, grad, curvature, state, hyper, spans=False, block_length=None) -> None:
        for name, value in (("params", param), ("grads", grad), ("curvatures", curvature), ("states", state),
                            ("hypers", hyper), ("spans", spans), ("block_lengths", block_length)):
            getattr(self, name).append(value)

    def lengths(self) -> list[int] | None:
        """Each tensor's whole block length, where a tensor is sharded; ``None`` if none is."""
        if self.group is None:
            return None
        return [k if k is not None else p.numel() // max(st["s"].shape[0], 1)
                for k, p, st in zip(self.block_lengths, self.params, self.states)]


@dataclass
class TensorView:
    """One tensor's views for the passes: ``U (n, B, k)``, ``m``, ``g``, ``c``, ``p`` as ``(B, k)``."""

    U: Tensor
    m: Tensor
    g: Tensor
    c: Tensor | None
    p: Tensor | None  # None in a pack that only pass 1 reads (device_step._packed)
    backend: str

    @property
    def n(self) -> int:
        return self.U.shape[0]

    @property
    def B(self) -> int:
        return self.U.shape[1]

    @property
    def k(self) -> int:
        return self.U.shape[2]


def _flat(x: Tensor, B: int, k: int) -> Tensor:
    return (x if x.is_contiguous() else x.contiguous()).view(B, k)


def view_of(p: Tensor, g: Tensor, c: Tensor | None, st: dict[str, Any], backend: str) -> TensorView:
    B, n = st["s"].shape[0], st["U"].shape[0]
    k = p.numel() // B if B else 0
    return TensorView(U=st["U"].view(n, B, k), m=st["m"].view(B, k), g=_flat(g, B, k),
                      c=None if c is None else _flat(c, B, k), p=p.view(B, k), backend=backend)
