"""The ``Ginger`` optimizer: a thin ``torch.optim.Optimizer`` shell over ``ginger_hf.fused``.

The shell resolves and validates hyper-parameters, creates state lazily (``state_schema``), decides
on the host which tensors refresh their curvature model this step, gathers the step's tensors and
sums ``mc`` curvature over data-parallel ranks (``step_plan``), and hands each ``beta1`` batch
(``step_batch.StepBatch``) to ``fused.ginger``, the front over the C++ kernel and the
device-resident step, checked against the reference ``functional.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import functional as F
from . import fused
from . import legacy
from . import sharding, step_plan
from . import state_schema as schema
from .comm import check_not_sharded
from .hyperparameters import (ALGORITHMS, CURVATURE_MODES, CURVATURE_SCALES, DEFAULT_LR, PRESET, PRESETS,
                              apply_group_preset, check_preset, split_named_params, validate_hyperparameters)
from .state_schema import state_bytes
from .step_batch import StepBatch
from .pending import clear_curvature, get_curvature

__all__ = ["Ginger", "PRESETS", "CURVATURE_MODES", "CURVATURE_SCALES", "ALGORITHMS", "unwrap_ginger", "state_bytes",
           "validate_hyperparameters"]


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
        check_preset(preset)
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
        self.preset = preset
        self.backend = backend
        self.curvature_scale = scale
        self.curvature_group = None
        self.step_stats: dict[str, float] | None = None  # a dict collects ginger_hf.stats sums
        self._warned_unsynced = False
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group as torch does (names kept in ``param_names``), checked before anything changes.

        A ``preset`` key fills the group's omitted keys from that preset (``PRESETS``) and is
        not kept: the group then holds the values themselves.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"Ginger: param_group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError("Ginger: params must be an ordered collection (a list), not a set: the order of a "
                            "set changes between runs")
        params, names = split_named_params([params] if isinstance(params, Tensor) else list(params))
        param_group = apply_group_preset({**param_group, "params": params}, self.curvature_scale)
        if names is not None:
            param_group["param_names"] = names
        if isinstance(param_group.get("betas"), list):
            param_group["betas"] = tuple(param_group["betas"])
        group = {**self.defaults, **param_group}
        validate_hyperparameters(group)  # before anything is added
        self._check_placement(params, group)
        super().add_param_group(param_group)

    # -- copies and checkpoints ---------------------------------------------------------

    # What steps the Ginger tensors: ``fused.ginger``, or a research variant with its signature composed
    # from ``functional``'s stages (scripts/explore_variants.py sets it on one optimizer; copies drop it).
    tensor_step = staticmethod(fused.ginger)

    # Attributes a copy keeps (torch's Optimizer.__getstate__ keeps only defaults, state and
    # param_groups). ``curvature_group`` is not one: a process group does not pickle, and a
    # copy sums no curvature over ranks until ``ginger_hf.sync_curvature`` is called on it.
    _COPIED = {"preset": "recommended", "backend": None, "curvature_scale": "mean", "step_stats": None}
    _NOT_COPIED = {"curvature_group": None, "_warned_unsynced": False}

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), **{k: getattr(self, k) for k in self._COPIED}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Also what ``load_state_dict`` calls (with state and param_groups only): only missing attributes are set."""
        super().__setstate__(state)
        for key, default in {**self._COPIED, **self._NOT_COPIED}.items():
            self.__dict__.setdefault(key, default)

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
        """Whether the tensor's next step refreshes the curvature model: every ``curvature_interval``-th
        ``step()`` call, counted on the host (``state_schema.clock``), skipped steps included."""
        if group["algorithm"] != "ginger":
            return False
        return schema.clock(self.state.get(self._key(param, group))) % group["curvature_interval"] == 0

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

    def _state_for(self, key: Tensor, group: dict[str, Any], target: Tensor) -> dict[str, Any]:
        """The tensor's state, created on first use (and completed for checkpoints of older versions)."""
        state = self.state[key]
        dtype = schema.default_state_dtype(key, group["state_dtype"])
        if group["algorithm"] == "adamw":
            if not state:
                state.update(exp_avg=torch.zeros_like(key, dtype=dtype), exp_avg_sq=torch.zeros_like(key, dtype=dtype),
                             step=0, skipped=0)
            return state
        if not state:
            blocks = "tensor" if group["joint"] else group["blocks"]
            placed = sharding.sharding_of(key, blocks)
            if placed is None:
                state.update(schema.init_state(target, group["tau"], blocks, dtype))
            else:
                state.update(schema.init_sharded_state(sharding.local(key), placed, group["tau"], blocks, dtype))
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """One step of every tensor with a gradient. On the device path nothing here waits for the device
        (``device_step``); ``step_stats`` (opt-in) reads it."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        gate = self._only_initializing()
        if gate is True:
            return loss
        gate = gate if isinstance(gate, Tensor) else None
        plan = step_plan.collect(self)
        step_plan.sync_curvature(self, plan)
        if self.step_stats is not None:
            squares = [torch.linalg.vector_norm(c, dtype=torch.float64).square() for _, entries in plan
                       for _, _, _, c in entries if c is not None]
            if squares:
                self.step_stats["curvature_sq"] = float(sum(x.to("cpu") for x in squares))

        # Ginger tensors of all groups that share beta1 take one fused step (one batched solve per rank, one
        # kernel call per pass); every other hyper-parameter goes per tensor.
        batches: dict[float, StepBatch] = {}
        joints, sharded = [], []
        for group, entries in plan:
            beta1 = group["betas"][0]
            hyper = None if group["algorithm"] == "adamw" else F.hyper_of(group)
            for key, params, g, c in entries:
                target = torch.cat([p.reshape(-1) for p in params]) if group["joint"] else key
                state = self._state_for(key, group, target)
                if group["algorithm"] == "adamw":
                    self._adamw_step(key, g, state, group, on_device=self.backend in ("torch", "compile"))
                    continue
                schema.tick(state)
                batch = batches.setdefault(beta1, StepBatch(beta1))
                placed = sharding.sharding_of(key, group["blocks"])
                if placed is not None:  # FSDP2: this rank's slices; the sharded state keeps its counters
                    target, g, c, view = sharding.localise(key, state, g, c)
                    sharded.append((state, view))
                    state, batch.group = view, placed.group
                batch.add(target, g, c, state, hyper, spans=placed is not None and placed.spans,
                          block_length=placed and placed.block_numel)
                if group["joint"]:
                    joints.append((target, params))
        for batch in batches.values():
            self.tensor_step(batch.params, batch.grads, batch.curvatures, batch.states, batch.hypers, beta1=batch.beta1,
                              backend=self.backend, stats=self.step_stats, spans=batch.spans, group=batch.group,
                              block_lengths=batch.lengths(), gate=gate)
        for state, view in sharded:
            schema.store_counters(state, view)
        for flat, params in joints:
            torch._foreach_copy_(list(params), [piece.view_as(p) for p, piece in zip(params, flat.split(
                [p.numel() for p in params]))])
        self.zero_curvature()
        return loss

    def _only_initializing(self) -> bool | Tensor | None:
        """A first step with all-zero gradients and no curvature vector only creates the state.

        That is what ``torch.distributed.checkpoint`` does before loading a checkpoint into a
        fresh optimizer (``set_optimizer_state_dict`` steps once with zero gradients and lr 0).
        Returns True if so (CPU gradients, read here), False or None if not, and for gradients on
        another device a 0-d bool tensor, the ``gate`` of the device step (True: step), not read here.
        """
        if self.state:
            return None
        entries = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not entries or any(get_curvature(p) is not None for _, p in entries):
            return None
        grads = [sharding.local(p.grad) for _, p in entries]
        if any(g.device.type != "cpu" for g in grads):
            return torch.stack([g.any() for g in grads]).any()
        if any(bool(g.any()) for g in grads):
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
    def _adamw_step(param: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any], on_device: bool) -> None:
        beta1, beta2 = group["betas"]
        args = dict(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        if on_device or grad.device.type != "cpu":  # the device path: the decision is a mask, the counters device tensors
            F.adamw_masked(param, grad, state, **args)
            return
        if not bool(torch.isfinite(grad).all()):
            state["skipped"] += 1
            return
        state["step"] += 1
        F.adamw([param], [grad], [state["exp_avg"]], [state["exp_avg_sq"]], [state["step"]], **args)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``Optimizer.load_state_dict`` that keeps the saved state dtypes and reads older checkpoints.

        The base class casts floating state to the parameter dtype, which would turn
        float32 state of a bf16 model into bf16 and the float64 eigenvalues into float32.
        A checkpoint of an older version (``ginger_hf.legacy``) loads with its missing keys at
        their meaning then, and one warning.
        """
        old_format = any(k not in g for g in state_dict["param_groups"] for k in legacy.BEFORE_BLOCKS)
        state_dict = {**state_dict, "param_groups": legacy.fill_missing_group_keys(state_dict["param_groups"])}
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
        if old_format:
            self.curvature_scale = legacy.CURVATURE_SCALE_BEFORE_BLOCKS
            legacy.upgrade_flat_states(self.param_groups, self.state)

    def state_bytes(self) -> int:
        """Bytes held in state tensors, summed over all blocks."""
        return sum(v.numel() * v.element_size() for st in self.state.values() for v in st.values() if isinstance(v, Tensor))
