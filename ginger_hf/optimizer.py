"""The ``Ginger`` optimizer: a thin ``torch.optim.Optimizer`` shell over ``ginger_hf.fused``.

The shell resolves and validates hyper-parameters, creates state lazily, decides which
tensors refresh their curvature model this step and sums ``mc`` curvature over
data-parallel ranks. The math lives in ``fused.py`` (the fast two-pass step), checked
against the reference ``functional.py``.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import functional as F
from . import fused
from . import sharding
from .comm import all_reduce_curvature, check_not_sharded, world_size
from .pending import clear_curvature, get_curvature

__all__ = ["Ginger", "PRESETS", "CURVATURE_MODES", "CURVATURE_SCALES", "unwrap_ginger", "state_bytes"]

CURVATURE_MODES = ("mc", "empirical")
CURVATURE_SCALES = ("mean", "sqrt")
ALGORITHMS = ("ginger", "adamw")

# What Ginger(params, lr) computes unless told otherwise, and the paper's configuration
# (GINGER.md section 5), one argument away. Why each value: docs/research.md.
PRESETS: dict[str, dict[str, Any]] = {
    "recommended": dict(betas=(0.9, 0.99), tau=4, blocks="row", power=0.5, damping=1e-12, relative_damping=0.1,
                        rho=None, bias_correction=True, curvature="mc", curvature_interval=4, curvature_scale="mean"),
    "paper": dict(betas=(0.9, 0.99), tau=4, blocks="tensor", power=1.0, damping=1e-5, relative_damping=0.0,
                  rho=1.0, bias_correction=False, curvature="mc", curvature_interval=1, curvature_scale="sqrt"),
}
DEFAULT_LR = 1e-3


class _Preset:
    """Marks an argument left to the preset."""

    def __repr__(self) -> str:
        return "<preset>"


PRESET = _Preset()


def _is_real_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_hyperparameters(group: dict[str, Any]) -> None:
    """Raise ``ValueError``/``TypeError`` naming the argument and its allowed values."""
    tau = group["tau"]
    if isinstance(tau, bool) or not isinstance(tau, int):
        raise TypeError(f"Ginger: tau must be an integer >= 1, got {tau!r}")
    if tau < 1:
        raise ValueError(f"Ginger: tau must be an integer >= 1, got {tau!r}")
    lr = group["lr"]
    if isinstance(lr, Tensor):
        raise TypeError("Ginger: lr must be a float >= 0, got a Tensor")
    if not _is_real_number(lr) or lr < 0:
        raise ValueError(f"Ginger: lr must be a finite float >= 0, got {lr!r}")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Ginger: betas must be a pair (beta1, beta2), each in [0, 1), got {betas!r}")
    for name, beta in zip(("beta1", "beta2"), betas):
        if not _is_real_number(beta) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Ginger: betas: {name} must be in [0, 1), got {beta!r}")
    damping = group["damping"]
    if not _is_real_number(damping) or damping <= 0:
        raise ValueError(f"Ginger: damping must be a finite float > 0, got {damping!r}")
    rel = group["relative_damping"]
    if not _is_real_number(rel) or rel < 0:
        raise ValueError(f"Ginger: relative_damping must be a finite float >= 0, got {rel!r}")
    power = group["power"]
    if not _is_real_number(power) or not 0 < power <= 1:
        raise ValueError(f"Ginger: power must be in (0, 1] (1: G^-1 as in the paper, 0.5: G^-1/2), got {power!r}")
    if group["blocks"] not in F.BLOCKS:
        raise ValueError(f"Ginger: blocks must be one of {F.BLOCKS}, got {group['blocks']!r}")
    if not isinstance(group["bias_correction"], bool):
        raise TypeError(f"Ginger: bias_correction must be True or False, got {group['bias_correction']!r}")
    rho = group["rho"]
    if rho is not None and (not _is_real_number(rho) or rho <= 0):
        raise ValueError(f"Ginger: rho must be a float > 0, or None to disable clipping, got {rho!r}")
    weight_decay = group["weight_decay"]
    if not _is_real_number(weight_decay) or weight_decay < 0:
        raise ValueError(f"Ginger: weight_decay must be a finite float >= 0, got {weight_decay!r}")
    if group["curvature"] not in CURVATURE_MODES:
        raise ValueError(f"Ginger: curvature must be one of {CURVATURE_MODES}, got {group['curvature']!r}")
    interval = group["curvature_interval"]
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"Ginger: curvature_interval must be an integer >= 1, got {interval!r}")
    state_dtype = group["state_dtype"]
    if state_dtype is not None and not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
        raise TypeError(f"Ginger: state_dtype must be None or a floating torch.dtype, got {state_dtype!r}")
    if group["algorithm"] not in ALGORITHMS:
        raise ValueError(f"Ginger: algorithm must be one of {ALGORITHMS}, got {group['algorithm']!r}")
    eps = group["eps"]
    if not _is_real_number(eps) or eps <= 0:
        raise ValueError(f"Ginger: eps (of algorithm='adamw' groups) must be a finite float > 0, got {eps!r}")
    if not isinstance(group["joint"], bool):
        raise TypeError(f"Ginger: joint must be True or False, got {group['joint']!r}")
    if group["joint"]:
        if group["algorithm"] != "ginger":
            raise ValueError("Ginger: joint=True (one block for the whole group) needs algorithm='ginger'")
        kinds = {(p.dtype, p.device) for p in group["params"] if isinstance(p, Tensor)}
        if len(kinds) > 1:
            raise ValueError(f"Ginger: a joint=True group needs one dtype and device for all its params, got {kinds}")
    for p in group["params"]:
        if not isinstance(p, Tensor):
            raise TypeError(f"Ginger: params must be tensors, got {type(p).__name__}")
        if p.is_complex() or not p.is_floating_point():
            raise TypeError(f"Ginger: parameters must be real floating point tensors, got dtype {p.dtype}")


def default_state_dtype(param: Tensor, state_dtype: torch.dtype | None) -> torch.dtype:
    """float32 state for half-precision parameters, otherwise the parameter's own dtype."""
    if state_dtype is not None:
        return state_dtype
    if param.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return param.dtype


def state_bytes(shape: tuple[int, ...], tau: int, blocks: str, state_dtype: torch.dtype) -> int:
    """Bytes of one tensor's state: ``(n + 1) * numel`` state-dtype numbers (m, U), float64 s, R and e per block."""
    B, k = F.block_shape(tuple(shape), blocks)
    n = min(tau, k)
    itemsize = torch.empty((), dtype=state_dtype).element_size()
    return (n + 1) * B * k * itemsize + B * (n + n * n + 1) * 8


def unwrap_ginger(optimizer) -> Ginger | None:
    """The ``Ginger`` inside wrappers such as accelerate's ``AcceleratedOptimizer``, or ``None``."""
    for _ in range(8):
        if optimizer is None or isinstance(optimizer, Ginger):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


class Ginger(Optimizer):
    """Ginger: momentum preconditioned by a damped low-rank model of the curvature, per block.

    Each block (a row of a weight matrix, or a whole tensor) keeps ``G = gamma I + U^T diag(s) U``
    of rank ``tau``, refreshed from curvature vectors, and the step is ``lr * G^-power m_hat``
    (Woodbury-style closed form: linear time and memory). The defaults are the recommended
    configuration (``PRESETS["recommended"]``); ``preset="paper"`` gives the paper's. Any
    argument left out comes from the preset; all of them can be set per param group.

    Args:
        params: parameters or param groups.
        lr: learning rate (the one value to tune).
        betas: ``(beta1, beta2)``: EMA rates of the momentum and of the curvature model.
        tau: rank of each block's curvature model.
        blocks: ``"row"`` (one block per row of a tensor with 2+ dims) or ``"tensor"`` (the paper).
        power: the step is ``G^-power m_hat``: 1 as in the paper, 0.5 the root (Adam, Shampoo, GGT).
        damping: absolute part of ``gamma``.
        relative_damping: ``lambda``: ``gamma = damping + lambda * e_hat / k``, with ``e_hat`` the
            EMA (rate ``beta2``, updated every step, bias-corrected) of the block's squared gradient
            norm and ``k`` its length: a damping on the scale of the block's mean squared gradient
            per coordinate (Adam-mini's per-block second moment), so that it bounds the step between
            curvature refreshes too.
        rho: elementwise clip of the preconditioned direction; ``None`` disables it.
        bias_correction: divide the curvature model by ``1 - beta2^q`` (``q`` = refreshes so
            far) and ``e`` by ``1 - beta2^t`` (``t`` = steps), like Adam's second moment.
        weight_decay: decoupled weight decay.
        curvature: ``"mc"`` (the caller supplies ``param.curvature``, e.g. with
            ``ginger_hf.add_sampled_label_curvature``) or ``"empirical"`` (the gradient).
        curvature_interval: refresh the curvature model on steps 1, 1+k, 1+2k, ...
        curvature_scale: how ``ginger_hf.add_sampled_label_curvature`` (and the Trainer hook)
            normalise sampled-label vectors for this optimizer: ``"mean"`` (``/ N``: a mini-batch
            gradient at sampled labels, the scale of the gradient itself and of
            ``curvature="empirical"``, so learning rates sit where Adam's do) or ``"sqrt"``
            (``/ sqrt(N)``: the paper's; ``c c^T`` then estimates the GGN).
        state_dtype: dtype of ``m`` and ``U``; default float32 for half-precision
            parameters, else the parameter dtype.
        preset: ``"recommended"`` (default) or ``"paper"``: where omitted arguments come from.
        backend: ``None`` (the fastest available), ``"kernel"``, ``"compile"`` or ``"torch"``
            (see ``ginger_hf.fused``).

    Per-group options (for mixed models, e.g. LoRA):
        algorithm: ``"ginger"`` (default) or ``"adamw"``: a first-order AdamW update
            (``lr``, ``betas``, ``eps``, ``weight_decay`` of the group; state ``exp_avg``,
            ``exp_avg_sq``) for parameters that should not carry Ginger state.
        eps: AdamW's epsilon, used by ``algorithm="adamw"`` groups only.
        joint: if True, all params of the group form ONE Ginger block (their flattened
            concatenation); its state lives on the group's first parameter.

    Distributed data parallel: ``curvature_group`` (default ``None``: no communication)
    is the process group over which ``mc`` curvature vectors are summed on refresh
    steps; set it with ``ginger_hf.sync_curvature(optimizer, ddp_model)``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = DEFAULT_LR,
        betas: tuple[float, float] = PRESET,
        tau: int = PRESET,
        blocks: str = PRESET,
        power: float = PRESET,
        damping: float = PRESET,
        relative_damping: float = PRESET,
        rho: float | None = PRESET,
        bias_correction: bool = PRESET,
        weight_decay: float = 0.0,
        curvature: str = PRESET,
        curvature_interval: int = PRESET,
        state_dtype: torch.dtype | None = None,
        *,
        curvature_scale: str = PRESET,
        preset: str = "recommended",
        backend: str | None = None,
        algorithm: str = "ginger",
        eps: float = 1e-8,
        joint: bool = False,
    ):
        if preset not in PRESETS:
            raise ValueError(f"Ginger: preset must be one of {tuple(PRESETS)}, got {preset!r}")
        if backend not in fused.BACKENDS:
            raise ValueError(f"Ginger: backend must be one of {fused.BACKENDS}, got {backend!r}")
        given = dict(betas=betas, tau=tau, blocks=blocks, power=power, damping=damping,
                     relative_damping=relative_damping, rho=rho, bias_correction=bias_correction,
                     curvature=curvature, curvature_interval=curvature_interval)
        defaults = {**PRESETS[preset], **{k: v for k, v in given.items() if v is not PRESET}}
        scale = defaults.pop("curvature_scale") if curvature_scale is PRESET else curvature_scale
        defaults.pop("curvature_scale", None)
        if scale not in CURVATURE_SCALES:
            raise ValueError(f"Ginger: curvature_scale must be one of {CURVATURE_SCALES}, got {scale!r}")
        if isinstance(defaults["betas"], list):
            defaults["betas"] = tuple(defaults["betas"])
        defaults.update(lr=lr, weight_decay=weight_decay, state_dtype=state_dtype, algorithm=algorithm, eps=eps,
                        joint=joint)
        validate_hyperparameters({**defaults, "params": []})
        self.backend = backend
        self.curvature_scale = scale
        self.curvature_group = None
        self.step_stats: dict[str, float] | None = None  # a dict collects ginger_hf.stats sums
        # What steps the Ginger tensors: ``fused.ginger``, or a research variant with its signature composed
        # from ``functional``'s stages (scripts/explore_variants.py sets it on the Trainer's optimizer).
        self.tensor_step = fused.ginger
        self._warned_unsynced = False
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        param_group = {**param_group, "params": params}
        if isinstance(param_group.get("betas"), list):
            param_group["betas"] = tuple(param_group["betas"])
        group = {**self.defaults, **param_group}
        validate_hyperparameters(group)  # before anything is added
        self._check_placement(params, group)
        super().add_param_group(param_group)

    @staticmethod
    def _check_placement(params, group: dict[str, Any]) -> None:
        """FSDP2 (``Shard(0)`` DTensors) is supported; other sharding is refused with a ``TypeError``."""
        dtensors = [p for p in params if sharding.is_dtensor(p)]
        for p in dtensors:
            sharding.sharding_of(p, group["blocks"])  # raises for other placements and meshes
        if dtensors and group["joint"]:
            raise TypeError("Ginger: joint=True blocks (lora_blocks=joint) are not supported with FSDP2 parameters")
        check_not_sharded([p for p in params if not sharding.is_dtensor(p)])

    # -- curvature schedule ------------------------------------------------------------

    @staticmethod
    def _key(param: Tensor, group: dict[str, Any]) -> Tensor:
        """The parameter that holds the block's state (a joint group's first parameter)."""
        return group["params"][0] if group["joint"] else param

    def _refreshes(self, param: Tensor, group: dict[str, Any]) -> bool:
        """Whether the tensor's next step (its step count + 1) refreshes the curvature model."""
        if group["algorithm"] != "ginger":
            return False
        state = self.state.get(self._key(param, group))
        return (state["step"] if state else 0) % group["curvature_interval"] == 0

    def needs_curvature(self) -> bool:
        """True if the next ``step()`` will consume ``param.curvature`` for some ``mc`` tensor.

        Training loops call this to skip the extra backward pass on steps between refreshes.
        """
        return bool(self.curvature_params())

    def curvature_params(self) -> list[Tensor]:
        """Parameters whose ``curvature`` the next ``step()`` will read."""
        return [
            p
            for group in self.param_groups
            if group["curvature"] == "mc"
            for p in group["params"]
            if p.requires_grad and self._refreshes(p, group)
        ]

    def zero_curvature(self) -> None:
        """Drop every pending curvature vector (e.g. after a step skipped for overflow)."""
        for group in self.param_groups:
            for p in group["params"]:
                clear_curvature(p)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and drop pending curvature, which lives and dies with them.

        A step that a gradient scaler skips never reaches ``step()``; the loop's
        ``zero_grad()`` then keeps that step's curvature out of the next one.
        """
        super().zero_grad(set_to_none=set_to_none)
        self.zero_curvature()

    # -- the step -----------------------------------------------------------------------

    def _curvature_of(self, p: Tensor, group: dict[str, Any]) -> Tensor | None:
        """The curvature vector a refreshing tensor reads; raises if an ``mc`` tensor has none."""
        if group["curvature"] == "empirical":
            return p.grad
        curv = get_curvature(p)
        if curv is None:
            raise RuntimeError(
                "Ginger(curvature='mc') needs a curvature vector on this refresh step, but parameter "
                f"of shape {tuple(p.shape)} has none. Before optimizer.step(), compute it with "
                "ginger_hf.add_sampled_label_curvature(logits, labels, optimizer) (or set "
                "`param.curvature` yourself), or construct Ginger with curvature='empirical'."
            )
        if sharding.is_dtensor(p) and not sharding.is_dtensor(curv):  # this rank's slice of an FSDP2 parameter
            if curv.shape != sharding.local(p).shape:
                raise ValueError(f"Ginger: param.curvature shape {tuple(curv.shape)} != this rank's slice of the "
                                 f"parameter {tuple(sharding.local(p).shape)}")
        elif curv.shape != p.shape:
            raise ValueError(f"Ginger: param.curvature shape {tuple(curv.shape)} != parameter shape {tuple(p.shape)}")
        return curv

    def _collect(self) -> list[tuple[dict[str, Any], list[tuple[Tensor, list[Tensor], Tensor, Tensor | None]]]]:
        """Tensors that take a step as ``(state key, params, grad, curvature)``; raises before any change.

        A joint group is one block whose gradient and curvature are the flattened
        concatenations over its params (zeros for a param without gradient). Empty
        parameters take no step: there is nothing to move.
        """
        plan = []
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            for p in with_grad:
                if p.grad.is_sparse:
                    raise TypeError("Ginger does not support sparse gradients; use a dense embedding (sparse=False)")
                if self._key(p, group) not in self.state:
                    self._check_placement((p,), group)  # accelerate's FSDP swaps param_groups after construction
                if p.grad.shape != p.shape:
                    raise ValueError(f"Ginger: gradient shape {tuple(p.grad.shape)} != parameter shape {tuple(p.shape)}")
            entries = []
            if group["joint"] and with_grad and any(p.numel() for p in group["params"]):
                params = group["params"]
                grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
                curv = None
                if self._refreshes(params[0], group):
                    if group["curvature"] == "empirical":
                        curv = grad
                    else:
                        curv = torch.cat([self._curvature_of(p, group).reshape(-1) for p in params])
                entries.append((params[0], params, grad, curv))
            elif not group["joint"]:
                for p in with_grad:
                    if p.numel() == 0:  # nothing to step (Ginger's blocks need at least one element)
                        continue
                    curv = self._curvature_of(p, group) if self._refreshes(p, group) else None
                    entries.append((p, [p], p.grad, curv))
            plan.append((group, entries))
        return plan

    def _sync_curvature(self, plan) -> None:
        """Sum the step's ``mc`` curvature vectors over ``curvature_group``: one all-reduce, none if there are none.

        FSDP2 parameters are skipped: their vectors arrive summed already (``ginger_hf.sharded_curvature``).
        """
        slots = [(entries, i) for _, entries in plan for i, (key, _, g, c) in enumerate(entries)
                 if c is not None and c is not g and not sharding.is_dtensor(key)]
        if not slots:
            return
        if self.curvature_group is None:
            dist = torch.distributed
            if not self._warned_unsynced and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                self._warned_unsynced = True
                warnings.warn(
                    "Ginger(curvature='mc') runs in a multi-process job but sums no curvature across ranks. If the "
                    "model is DDP-wrapped, call ginger_hf.sync_curvature(optimizer, model) after wrapping; "
                    "independent processes can ignore this.", stacklevel=3,
                )
            return
        if world_size(self.curvature_group) == 1:
            return
        summed = all_reduce_curvature([entries[i][3] for entries, i in slots], self.curvature_group)
        for (entries, i), c in zip(slots, summed):
            entries[i] = (*entries[i][:3], c)

    def _state_for(self, key: Tensor, group: dict[str, Any], target: Tensor) -> dict[str, Any]:
        """The tensor's state, created on first use (and completed for checkpoints of older versions)."""
        state = self.state[key]
        dtype = default_state_dtype(key, group["state_dtype"])
        if group["algorithm"] == "adamw":
            if not state:
                state.update(exp_avg=torch.zeros_like(key, dtype=dtype), exp_avg_sq=torch.zeros_like(key, dtype=dtype),
                             step=0, skipped=0)
            return state
        if not state:
            blocks = "tensor" if group["joint"] else group["blocks"]
            placed = sharding.sharding_of(key, blocks)
            if placed is None:
                state.update(F.init_state(target, group["tau"], blocks, dtype))
            else:
                state.update(sharding.init_sharded_state(key, placed, group["tau"], blocks, dtype))
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        if self._only_initializing():
            return loss
        plan = self._collect()
        self._sync_curvature(plan)
        if self.step_stats is not None:
            squares = [torch.linalg.vector_norm(c, dtype=torch.float64).square() for _, entries in plan
                       for _, _, _, c in entries if c is not None]
            if squares:
                self.step_stats["curvature_sq"] = float(sum(x.to("cpu") for x in squares))

        # Ginger tensors of all groups that share beta1 go through one fused call (one batched
        # solve per rank, one kernel call per pass); every other hyper-parameter goes per tensor.
        calls: dict[float, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        joints, sharded = [], []
        for group, entries in plan:
            beta1, beta2 = group["betas"]
            for key, params, g, c in entries:
                target = torch.cat([p.reshape(-1) for p in params]) if group["joint"] else key
                state = self._state_for(key, group, target)
                if group["algorithm"] == "adamw":
                    self._adamw_step(key, g, state, group)
                    continue
                call = calls[beta1]
                placed = sharding.sharding_of(key, group["blocks"])
                if placed is not None:  # FSDP2: this rank's slices; the sharded state keeps its counters
                    view = sharding.local_state(state)
                    sharded.append((state, view))
                    target, g, c, state = sharding.local(key), sharding.local(g), sharding.local(c), view
                    call["group"] = placed.group
                call["spans"].append(placed is not None and placed.spans)
                call["block_lengths"].append(placed.block_numel if placed is not None else None)
                call["params"].append(target)
                call["grads"].append(g)
                call["curvatures"].append(c)
                call["states"].append(state)
                call["hypers"].append(F.Hyper(
                    lr=group["lr"], beta2=beta2, damping=group["damping"], relative_damping=group["relative_damping"],
                    power=group["power"], rho=group["rho"], weight_decay=group["weight_decay"],
                    bias_correction=group["bias_correction"], blocks="tensor" if group["joint"] else group["blocks"]))
                if group["joint"]:
                    joints.append((target, params))
        for beta1, call in calls.items():
            sync, lengths = None, None
            if "group" in call:
                sync = sharding.make_sync(call["spans"], call["group"])
                lengths = [k if k is not None else p.numel() // max(st["s"].shape[0], 1)
                           for k, p, st in zip(call["block_lengths"], call["params"], call["states"])]
            self.tensor_step(call["params"], call["grads"], call["curvatures"], call["states"], call["hypers"],
                             beta1=beta1, backend=self.backend, stats=self.step_stats, sync=sync, block_lengths=lengths)
        for state, view in sharded:
            sharding.store_counters(state, view)
        for flat, params in joints:
            for p, piece in zip(params, flat.split([p.numel() for p in params])):
                p.copy_(piece.view_as(p))
        self.zero_curvature()
        return loss

    def _only_initializing(self) -> bool:
        """A first step with all-zero gradients and no curvature vector only creates the state.

        That is what ``torch.distributed.checkpoint`` does before loading a checkpoint into a
        fresh optimizer (``set_optimizer_state_dict`` steps once with zero gradients and lr 0).
        """
        if self.state:
            return False
        entries = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not entries or any(get_curvature(p) is not None for _, p in entries):
            return False
        if any(bool(sharding.local(p.grad).any()) for _, p in entries):
            return False
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            if group["joint"] and with_grad:
                self._state_for(group["params"][0], group, torch.cat([p.reshape(-1) for p in group["params"]]))
            elif not group["joint"]:
                for p in with_grad:
                    self._state_for(p, group, p)
        return True

    @staticmethod
    def _adamw_step(param: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if not bool(torch.isfinite(grad).all()):
            state["skipped"] += 1
            return
        state["step"] += 1
        beta1, beta2 = group["betas"]
        F.adamw([param], [grad], [state["exp_avg"]], [state["exp_avg_sq"]], [state["step"]], lr=group["lr"],
                beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])

    # -- checkpointing ------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like ``Optimizer.load_state_dict`` but keeps the saved state dtypes.

        The base class casts floating state to the parameter dtype, which would turn
        float32 state of a bf16 model into bf16 and the float64 eigenvalues into float32.
        """
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            for key, value in saved.items():
                if isinstance(value, Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)

    def state_bytes(self) -> int:
        """Bytes held in state tensors, summed over all blocks."""
        return sum(v.numel() * v.element_size() for st in self.state.values() for v in st.values() if isinstance(v, Tensor))
