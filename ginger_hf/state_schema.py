"""The state of one Ginger tensor, in one place: its keys, how it is created (unsharded and FSDP2), its counters
and its size. (The hyper-parameters a param group gives its step, ``Hyper``, live with the reference step in
``functional``.)

State of one tensor; ``U[j]`` has the parameter's shape so that the state shards like the parameter:

* ``m``  parameter-shaped     first moment, state dtype;
* ``U``  ``(n, *shape)``     basis rows of every block, state dtype;
* ``s``  ``(B, n)``           eigenvalues of the low-rank parts, float64;
* ``R``  ``(B, n, n)``        float64: each block's eigenbasis is ``R U``;
* ``e``  ``(B,)``             EMA of ``|g|^2`` per block (the scale of relative damping), float64;
* counters (``COUNTERS``): ``step`` (steps applied: the bias correction's ``t``), ``curvature_steps``
  (refreshes applied), ``skipped`` (steps refused for a non-finite gradient), ``curvature_skipped``
  (refreshes refused for a non-finite curvature vector);
* ``clock``: the tensor's ``step()`` calls, applied or skipped: a host int, the ``curvature_interval``
  schedule's clock, so that which tensors refresh is known without reading the device.

The counters depend on finiteness decisions taken on the parameter's device. The C++ kernel path
(CPU) keeps them as Python ints; the device path keeps them as 0-d int64 tensors on the parameter's
device (as torch's capturable Adam keeps ``step``) so that it never waits for the device.
``host_counters`` / ``device_counters`` convert a state between the two (a checkpoint saved on one
loads on the other); ``int(state["step"])`` reads either.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["BLOCKS", "TENSORS", "COUNTERS", "default_state_dtype", "state_bytes", "block_shape",
           "init_state", "init_sharded_state", "host_counters", "device_counters", "clock", "tick", "local_state",
           "store_counters"]

BLOCKS = ("tensor", "row")
TENSORS = ("m", "U", "s", "R", "e")
COUNTERS = ("step", "curvature_steps", "skipped", "curvature_skipped")


def default_state_dtype(param: Tensor, state_dtype: torch.dtype | None) -> torch.dtype:
    """float32 state for half-precision parameters, otherwise the parameter's own dtype."""
    if state_dtype is not None:
        return state_dtype
    if param.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return param.dtype


def state_bytes(shape: tuple[int, ...], tau: int, blocks: str, state_dtype: torch.dtype) -> int:
    """Bytes of one tensor's state: ``(n + 1) * numel`` state-dtype numbers (m, U), float64 s, R and e per block."""
    B, k = block_shape(tuple(shape), blocks)
    n = min(tau, k)
    itemsize = torch.empty((), dtype=state_dtype).element_size()
    return (n + 1) * B * k * itemsize + B * (n + n * n + 1) * 8


def block_shape(shape: torch.Size | tuple[int, ...], blocks: str) -> tuple[int, int]:
    """``(B, k)``: ``B`` contiguous blocks of ``k`` elements.

    ``"tensor"``: one block (the paper). ``"row"``: one block per slice along dim 0 of a
    tensor with two or more dims (per output unit of a weight matrix, per token of an
    embedding); 0-D and 1-D tensors stay one block.
    """
    numel = math.prod(shape)
    if blocks == "row" and len(shape) >= 2 and shape[0] > 0:
        return shape[0], numel // shape[0]
    return 1, numel


def _unit_rows(n: int, rows: int, k: int, start: int, dtype: torch.dtype, device) -> Tensor:
    """``(n, rows, k)``: row ``j`` of every block is the unit vector ``e_{j - start}`` (zero where that is outside).

    Built by comparison, not ``U[j, :, j] = 1``: fake devices refuse Python indexing (and ``contiguous``).
    """
    j = torch.arange(n, device=device).view(n, 1, 1)
    x = torch.arange(k, device=device).view(1, 1, k) + start
    return (x == j).to(dtype).expand(n, rows, k).clone(memory_format=torch.contiguous_format)


def _small_state(rows: int, n: int, device) -> dict[str, Tensor]:
    return {"s": torch.zeros(rows, n, dtype=torch.float64, device=device),
            "R": torch.eye(n, dtype=torch.float64, device=device).repeat(rows, 1, 1),
            "e": torch.zeros(rows, dtype=torch.float64, device=device)}


def _fresh_counters() -> dict[str, int]:
    return {**dict.fromkeys(COUNTERS, 0), "clock": 0}


def init_state(param: Tensor, tau: int, blocks: str, state_dtype: torch.dtype) -> dict[str, Any]:
    """Fresh state: ``m = 0``, ``s = 0``, ``e = 0``, ``R = I``, each block's ``U`` its first ``n`` unit vectors."""
    B, k = block_shape(param.shape, blocks)
    n = min(tau, k)
    dev = param.device
    U = _unit_rows(n, B, k, 0, state_dtype, dev)
    return {"m": torch.zeros(param.shape, dtype=state_dtype, device=dev), "U": U.view(n, *param.shape),
            **_small_state(B, n, dev), **_fresh_counters()}


def _from_local(t: Tensor, sh, placement, shape) -> Tensor:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(t, sh.mesh, [placement], run_check=False, shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())


def init_sharded_state(local_param: Tensor, sh, tau: int, blocks: str, state_dtype: torch.dtype) -> dict[str, Any]:
    """The state unsharded Ginger would create, each rank keeping its slice (as DTensors placed like the parameter).

    ``sh`` is the parameter's ``sharding.Sharding``; ``local_param`` this rank's slice. ``m`` is placed like the
    parameter, ``U`` on dim 1, the small state on dim 0 for row blocks and replicated for a spanning block.
    """
    from torch.distributed.tensor import Replicate, Shard

    p = local_param
    dev = p.device
    B_global, k = block_shape(sh.shape, blocks)
    n = min(tau, k)
    if sh.rows:  # each local row is a whole block
        rows, placement = p.shape[0], Shard(0)
        U = _unit_rows(n, rows, k, 0, state_dtype, dev)
    else:  # one block: its first n unit vectors, which only the ranks holding those elements see
        rows, placement = 1, Replicate()
        row_numel = sh.shape[1:].numel() if len(sh.shape) else 1
        U = _unit_rows(n, 1, p.numel(), sh.offset * row_numel, state_dtype, dev)
    small = {key: _from_local(value, sh, placement, (B_global, *value.shape[1:]))
             for key, value in _small_state(rows, n, dev).items()}
    return {"m": _from_local(torch.zeros(p.shape, dtype=state_dtype, device=dev), sh, Shard(0), sh.shape),
            "U": _from_local(U.view(n, *p.shape), sh, Shard(1), (n, *sh.shape)), **small, **_fresh_counters()}


def host_counters(state: dict[str, Any]) -> None:
    """Counters as Python ints (the C++ kernel path), in place."""
    for key in COUNTERS:
        if isinstance(state[key], Tensor):
            state[key] = int(state[key])


def device_counters(state: dict[str, Any], device: torch.device, keys: tuple[str, ...] = COUNTERS) -> None:
    """Counters as 0-d int64 tensors on ``device`` (the device path), in place; no copy where they are already."""
    for key in keys:
        value = state[key]
        if not isinstance(value, Tensor):
            state[key] = torch.full((), value, dtype=torch.int64, device=device)
        elif value.device != device or value.dtype != torch.int64:
            state[key] = value.to(device=device, dtype=torch.int64)


def clock(state: dict[str, Any] | None) -> int:
    """The schedule's clock: ``step()`` calls so far (a state from before the clock existed: steps + skips)."""
    if not state:
        return 0
    if "clock" not in state:  # completed once, on the first step after loading an older checkpoint
        state["clock"] = int(state["step"]) + int(state["skipped"])
    return state["clock"]


def tick(state: dict[str, Any]) -> None:
    state["clock"] = clock(state) + 1


def local_state(state: dict[str, Any], local) -> dict[str, Any]:
    """The rank's views of a sharded state (``local`` of each tensor) and its counters; see ``store_counters``."""
    return {key: local(state[key]) if key in TENSORS else state[key] for key in (*TENSORS, *COUNTERS)}


def store_counters(state: dict[str, Any], view: dict[str, Any]) -> None:
    for key in COUNTERS:
        state[key] = view[key]
