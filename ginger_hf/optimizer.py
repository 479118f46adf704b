"""The ``Ginger`` optimizer: a thin ``torch.optim.Optimizer`` shell over ``ginger_hf.fused``.

The shell validates hyper-parameters, creates state lazily and decides which blocks
refresh their curvature model this step. The math lives in ``fused.py`` (the fast
two-pass step, which also skips blocks whose inputs are not finite), checked against
the reference ``functional.py``.

Curvature vectors are handed over on the parameter itself, like ``.grad``: before
``step()``, ``param.curvature`` holds the block's curvature vector (same shape as the
parameter). ``step()`` consumes it and resets it to ``None``. ``ginger_hf.curvature``
computes it for softmax cross-entropy models.
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
from .distributed import all_reduce_curvature, check_not_sharded, world_size

__all__ = ["Ginger", "CURVATURE_MODES", "get_curvature", "set_curvature", "add_curvature", "clear_curvature"]

CURVATURE_MODES = ("mc", "empirical")
ALGORITHMS = ("ginger", "adamw")
_CURVATURE_ATTR = "curvature"


def get_curvature(param: Tensor) -> Tensor | None:
    """The curvature vector waiting on ``param`` for the next ``step()``, or ``None``."""
    return getattr(param, _CURVATURE_ATTR, None)


def set_curvature(param: Tensor, value: Tensor | None) -> None:
    setattr(param, _CURVATURE_ATTR, value)


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


def state_bytes(numel: int, tau: int, state_dtype: torch.dtype) -> int:
    """Bytes of a block's state tensors: ``(tau_e + 1) * numel`` state-dtype numbers (m, U), float64 s and R."""
    tau_e = min(tau, numel)
    itemsize = torch.empty((), dtype=state_dtype).element_size()
    return (tau_e + 1) * numel * itemsize + (tau_e + tau_e**2) * 8


class Ginger(Optimizer):
    """Ginger: Adam-style momentum preconditioned by a damped low-rank GGN model per tensor.

    Args:
        params: parameters or param groups; every keyword below can be set per group.
        lr: learning rate.
        betas: ``(beta1, beta2)``: EMA rates of the momentum and of the curvature model.
        tau: rank of the low-rank curvature model of each tensor.
        damping: ``gamma`` in ``G = gamma*I + U diag(s) U^T``.
        rho: elementwise clip of the preconditioned direction; ``None`` disables it.
        weight_decay: decoupled weight decay.
        curvature: ``"mc"`` (the caller supplies ``param.curvature``, e.g. with
            ``ginger_hf.add_sampled_label_curvature``) or ``"empirical"`` (the gradient).
        curvature_interval: refresh the curvature model on steps 1, 1+k, 1+2k, ...
        state_dtype: dtype of ``m`` and ``U``; default float32 for half-precision
            parameters, else the parameter dtype.

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
    Sharded parameters (FSDP, DTensor, DeepSpeed ZeRO) are refused with a ``TypeError``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        tau: int = 4,
        damping: float = 1e-5,
        rho: float | None = 1.0,
        weight_decay: float = 0.0,
        curvature: str = "mc",
        curvature_interval: int = 1,
        state_dtype: torch.dtype | None = None,
        *,
        algorithm: str = "ginger",
        eps: float = 1e-8,
        joint: bool = False,
    ):
        defaults = dict(
            lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, tau=tau, damping=damping, rho=rho,
            weight_decay=weight_decay, curvature=curvature, curvature_interval=curvature_interval,
            state_dtype=state_dtype, algorithm=algorithm, eps=eps, joint=joint,
        )
        validate_hyperparameters({**defaults, "params": []})
        self.curvature_group = None
        self._warned_unsynced = False
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        param_group = {**param_group, "params": params}
        if isinstance(param_group.get("betas"), list):
            param_group["betas"] = tuple(param_group["betas"])
        validate_hyperparameters({**self.defaults, **param_group})  # before anything is added
        check_not_sharded(params)
        super().add_param_group(param_group)

    # -- curvature schedule ------------------------------------------------------------

    @staticmethod
    def _key(param: Tensor, group: dict[str, Any]) -> Tensor:
        """The parameter that holds the block's state (a joint group's first parameter)."""
        return group["params"][0] if group["joint"] else param

    def _refreshes(self, param: Tensor, group: dict[str, Any]) -> bool:
        """Whether the block's next step (its step count + 1) refreshes the curvature model."""
        if group["algorithm"] != "ginger":
            return False
        key = self._key(param, group)
        step = self.state[key]["step"] if key in self.state else 0
        return step % group["curvature_interval"] == 0

    def needs_curvature(self) -> bool:
        """True if the next ``step()`` will consume ``param.curvature`` for some ``mc`` block.

        Training loops call this to skip the extra backward pass on steps between refreshes.
        """
        return any(
            group["curvature"] == "mc" and p.requires_grad and self._refreshes(p, group)
            for group in self.param_groups
            for p in group["params"]
        )

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
        """The curvature vector a refreshing block reads; raises if an ``mc`` block has none."""
        if group["curvature"] == "empirical":
            return p.grad
        curv = get_curvature(p)
        if curv is None:
            raise RuntimeError(
                "Ginger(curvature='mc') needs a curvature vector on this refresh step, but parameter "
                f"of shape {tuple(p.shape)} has none. Before optimizer.step(), compute it with "
                "ginger_hf.add_sampled_label_curvature(logits, labels, params) (or set "
                "`param.curvature` yourself), or construct Ginger with curvature='empirical'."
            )
        if curv.shape != p.shape:
            raise ValueError(f"Ginger: param.curvature shape {tuple(curv.shape)} != parameter shape {tuple(p.shape)}")
        return curv

    def _collect(self) -> list[tuple[dict[str, Any], list[tuple[Tensor, list[Tensor], Tensor, Tensor | None]]]]:
        """Blocks that take a step as ``(state key, params, grad, curvature)``; raises before any change.

        A joint group is one block whose gradient and curvature are the flattened
        concatenations over its params (zeros for a param without gradient).
        """
        plan = []
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            for p in with_grad:
                if p.grad.is_sparse:
                    raise TypeError("Ginger does not support sparse gradients; use a dense embedding (sparse=False)")
                if self._key(p, group) not in self.state:
                    check_not_sharded((p,))  # accelerate's FSDP swaps param_groups after construction
                if p.grad.shape != p.shape:
                    raise ValueError(f"Ginger: gradient shape {tuple(p.grad.shape)} != parameter shape {tuple(p.shape)}")
            blocks = []
            if group["joint"] and with_grad:
                params = group["params"]
                grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
                curv = None
                if self._refreshes(params[0], group):
                    if group["curvature"] == "empirical":
                        curv = grad
                    else:
                        curv = torch.cat([self._curvature_of(p, group).reshape(-1) for p in params])
                blocks.append((params[0], params, grad, curv))
            elif not group["joint"]:
                for p in with_grad:
                    curv = self._curvature_of(p, group) if self._refreshes(p, group) else None
                    blocks.append((p, [p], p.grad, curv))
            plan.append((group, blocks))
        return plan

    def _sync_curvature(self, plan) -> None:
        """Sum the step's ``mc`` curvature vectors over ``curvature_group``: one all-reduce, none if there are none."""
        slots = [(blocks, i) for _, blocks in plan for i, (_, _, g, c) in enumerate(blocks) if c is not None and c is not g]
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
        summed = all_reduce_curvature([blocks[i][3] for blocks, i in slots], self.curvature_group)
        for (blocks, i), c in zip(slots, summed):
            blocks[i] = (*blocks[i][:3], c)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        plan = self._collect()
        self._sync_curvature(plan)

        # AdamW groups check their gradients here (one host synchronisation for all of them);
        # Ginger blocks are checked inside the fused step's first pass, which writes nothing.
        checks = [fused.all_finite(g) for group, blocks in plan if group["algorithm"] == "adamw" for _, _, g, _ in blocks]
        adamw_finite = iter(torch.stack(checks).tolist() if checks else [])

        # Ginger blocks of all groups that share beta1 go through one fused call (one batched
        # solve, one kernel call per pass); lr, beta2, damping, rho and weight decay go per block.
        ginger_calls: dict[float, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        done = []  # (state, applied, flat target, joint params or None)
        for group, blocks in plan:
            beta1, beta2 = group["betas"]
            adamw = group["algorithm"] == "adamw"
            states, targets, grads, curvs, joints = [], [], [], [], []
            for key, params, g, c in blocks:
                state = self.state[key]
                if not state:
                    dtype = default_state_dtype(key, group["state_dtype"])
                    if adamw:
                        state.update(exp_avg=torch.zeros_like(key, dtype=dtype), exp_avg_sq=torch.zeros_like(key, dtype=dtype))
                    else:
                        state.update(F.init_block_state(g, group["tau"], dtype))
                    state["step"] = 0
                    state["skipped"] = 0
                elif not adamw and "R" not in state:  # a checkpoint from before R existed: U was the eigenbasis
                    state["R"] = torch.eye(state["U"].shape[0], dtype=torch.float64, device=state["U"].device)
                if adamw and not next(adamw_finite):
                    state["skipped"] += 1
                    continue
                states.append(state)
                targets.append(torch.cat([p.reshape(-1) for p in params]) if group["joint"] else key)
                grads.append(g)
                curvs.append(c)
                joints.append(params if group["joint"] else None)
            if not targets:
                continue
            if adamw:
                F.adamw(
                    targets, grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
                    [st["step"] + 1 for st in states],
                    lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                )
                done += zip(states, [True] * len(states), targets, joints)
                continue
            call = ginger_calls[beta1]
            for name, values in (("states", states), ("targets", targets), ("grads", grads), ("curvs", curvs),
                                 ("joints", joints)):
                call[name] += values
            for name in ("lr", "damping", "rho", "weight_decay"):
                call[name] += [group[name]] * len(states)
            call["beta2"] += [beta2] * len(states)
        for beta1, call in ginger_calls.items():
            states = call["states"]
            applied = fused.ginger(  # the two-pass fast step; F.ginger is its test oracle
                call["targets"], call["grads"], call["curvs"], [st["m"] for st in states], [st["U"] for st in states],
                [st["s"] for st in states], [st["R"] for st in states], [st["step"] + 1 for st in states],
                lr=call["lr"], beta1=beta1, beta2=call["beta2"], damping=call["damping"], rho=call["rho"],
                weight_decay=call["weight_decay"],
            )
            done += zip(states, applied, call["targets"], call["joints"])
        for state, ok, flat, params in done:
            state["step" if ok else "skipped"] += 1
            if ok and params is not None:
                for p, piece in zip(params, flat.split([p.numel() for p in params])):
                    p.copy_(piece.view_as(p))
        self.zero_curvature()
        return loss

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
