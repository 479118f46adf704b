"""The math of one Ginger step, written plainly: the reference that the fast step is tested against.

A parameter tensor is split into ``B`` blocks of ``k`` contiguous elements (``block_shape``):
one block for the whole tensor (the paper), or one per row of a weight matrix. Each block
keeps a damped low-rank model of its curvature, ``G = gamma*I + U^T diag(s) U`` of rank
``n = min(tau, k)``, refreshed from a curvature vector ``c`` by ``L <- top_n(beta2 L +
(1 - beta2) c c^T)``, and the step is ``f(G)`` applied to the bias-corrected momentum, with
``f(x) = x^-power`` (GINGER.md sections 2 and 6; the levers are described in
``docs/research.md``).

The state of one tensor is described in ``ginger_hf.state_schema`` (``init_state``; ``Hyper`` and
``block_shape`` live there too and are re-exported here). The fast path keeps a rotation in ``R``
so that it can move ``U`` by cheap reflections; this reference makes ``R U`` explicit and leaves
``R = I``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from .state_schema import BLOCKS, block_shape, device_counters, host_counters, init_state


@dataclass(frozen=True)
class Hyper:
    """Hyper-parameters of one tensor's step (a param group's values)."""

    lr: float
    beta2: float
    damping: float
    relative_damping: float = 0.0
    power: float = 1.0
    rho: float | None = None
    weight_decay: float = 0.0
    bias_correction: bool = False
    blocks: str = "tensor"


def hyper_of(group: dict[str, Any]) -> Hyper:
    """A param group's ``Hyper``: its keys of the same names, ``beta2`` of its ``betas``, and one whole-tensor block
    for a ``joint`` group."""
    values = {f.name: group[f.name] for f in fields(Hyper) if f.name in group}
    return Hyper(**{**values, "lr": float(group["lr"]), "beta2": group["betas"][1],
                    "blocks": "tensor" if group["joint"] else group["blocks"]})


__all__ = ["BLOCKS", "Hyper", "hyper_of", "block_shape", "init_state", "update_curvature", "precondition", "ginger", "adamw",
           "adamw_masked", "all_finite", "explicit_basis", "refresh_curvature", "update_energy", "update_momentum",
           "direction", "apply_step"]

# A residual below this multiple of eps * ||c|| is rounding noise: the new direction adds nothing.
_RESIDUAL_NOISE = 64.0


def _blocks(state: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """``U`` as ``(B, n, k)`` and ``m`` as ``(B, k)`` views."""
    B, n = state["s"].shape
    U = state["U"].reshape(n, B, -1).transpose(0, 1)
    return U, state["m"].reshape(B, -1)


def update_curvature(U: Tensor, s: Tensor, c: Tensor, beta2: float, *, eigh=torch.linalg.eigh) -> Tensor:
    """``L <- top_n(beta2 L + (1 - beta2) c c^T)`` for every block; returns the new ``U`` ``(B, n, k)``.

    ``U`` ``(B, n, k)`` is the orthonormal eigenbasis of ``s`` ``(B, n)`` (updated in place);
    ``c`` ``(B, k)``. The residual of ``c`` outside ``span(U)`` is orthogonalised twice
    ("twice is enough"); the ``(n+1)``-sized problems are solved by one batched ``eigh``
    (``torch.linalg.eigh``, or a drop-in replacement such as a research script's retrying one).
    """
    n = U.shape[1]
    c = c.to(U.dtype)
    k1 = torch.einsum("bnk,bk->bn", U, c)
    p = c - torch.einsum("bnk,bn->bk", U, k1)
    k2 = torch.einsum("bnk,bk->bn", U, p)
    p = p - torch.einsum("bnk,bn->bk", U, k2)
    r = torch.linalg.vector_norm(p, dim=1, dtype=torch.float64)
    noise = _RESIDUAL_NOISE * torch.finfo(U.dtype).eps * torch.linalg.vector_norm(c, dim=1, dtype=torch.float64)
    r = torch.where(r > noise, r, torch.zeros_like(r))
    z = torch.cat([k1.double() + k2.double(), r[:, None]], 1)
    K = (1 - beta2) * z[:, :, None] * z[:, None, :]
    K[:, :n, :n] += torch.diag_embed(beta2 * s)
    K[:, n, n] -= (r == 0).double()  # no new direction: pin it below the rest so that it is the one dropped
    lam, V = eigh(K)  # ascending: column 0 is dropped
    A = V[:, :n, 1:]
    b = V[:, n, 1:] * torch.where(r > 0, 1 / r, torch.zeros_like(r))[:, None]
    s.copy_(lam[:, 1:].clamp_min(0))
    return torch.einsum("bij,bik->bjk", A.to(U.dtype), U) + b.to(U.dtype)[:, :, None] * p[:, None, :]


def damping_of(state: dict[str, Any], hyper: Hyper, k: int) -> tuple[Tensor, float]:
    """Each block's ``gamma = damping + relative_damping * e_hat / k``, and the debias factor of ``s``.

    ``e`` is the EMA of the block's squared gradient norm, updated every step (Adam-mini's per-block
    second moment), so ``e / k`` is the block's mean gradient energy per coordinate. With
    ``bias_correction`` the zero-started EMAs are divided as Adam divides its second moment:
    ``e`` by ``1 - beta2^t`` (``t`` steps), the curvature model by ``1 - beta2^q`` (``q`` refreshes).
    """
    t, q = state["step"], state["curvature_steps"]
    debias_e = 1 - hyper.beta2**t if hyper.bias_correction and t > 0 else 1.0
    debias_s = 1 - hyper.beta2**q if hyper.bias_correction and q > 0 else 1.0
    return hyper.damping + hyper.relative_damping * state["e"] / (debias_e * k), debias_s


def precondition(U: Tensor, s: Tensor, gamma: Tensor, v: Tensor, power: float) -> Tensor:
    """``f(G) v`` per block, ``G = gamma I + U^T diag(s) U``, ``f(x) = x^-power``, ``U`` orthonormal rows.

    ``f(G) v = f(gamma) v + U^T diag(f(gamma + s) - f(gamma)) U v`` (GINGER.md section 6).
    """
    f0 = gamma.pow(-power)
    coef = (gamma[:, None] + s).pow(-power) - f0[:, None]
    proj = torch.einsum("bnk,bk->bn", U, v).double()
    return f0.to(v.dtype)[:, None] * v + torch.einsum("bnk,bn->bk", U, (coef * proj).to(v.dtype))


def _all_finite(t: Tensor | None) -> bool:
    return t is None or bool(torch.isfinite(t).all())


def ginger(
    params: list[Tensor],
    grads: list[Tensor],
    curvatures: list[Tensor | None],
    states: list[dict[str, Any]],
    hypers: list[Hyper],
    *,
    beta1: float,
) -> None:
    """One Ginger step for a list of tensors, in place (parameters and states, counters included).

    ``curvatures[i]`` is the tensor's curvature vector on a refresh step, else ``None``. A
    tensor whose gradient is not finite is skipped untouched (``skipped`` counts it); one
    whose curvature vector alone is not finite takes its step without the refresh
    (``curvature_skipped`` counts it). The reference reads the device freely (it is the oracle,
not the fast path). A state whose ``R`` is not the identity (written by
    the fast path) first gets its eigenbasis ``R U`` made explicit.
    """
    for param, grad, c, state, hp in zip(params, grads, curvatures, states, hypers):
        host_counters(state)
        if not all_finite(grad):
            state["skipped"] += 1
            continue
        if not all_finite(c):
            state["curvature_skipped"] += 1
            c = None
        U, m = explicit_basis(state)
        B, n, k = U.shape
        state["step"] += 1
        if c is not None:
            refresh_curvature(state, U, c.reshape(B, k), hp.beta2)
        g = grad.reshape(B, k)
        update_energy(state, g, hp.beta2)
        m_hat = update_momentum(m, g, beta1, state["step"])
        apply_step(param, direction(state, hp, U, m_hat), hp)


# -- the stages of one tensor's step, in the order ``ginger`` composes them (research scripts compose
# -- variants of the step from the same stages: scripts/explore_variants.py) --------------------------

def all_finite(*tensors: Tensor | None) -> bool:
    """Whether every given tensor (``None`` counts as finite) holds only finite numbers."""
    return all(_all_finite(t) for t in tensors)


def explicit_basis(state: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """``U`` ``(B, n, k)`` and ``m`` ``(B, k)``, views into the state, with each block's eigenbasis ``R U``
    made explicit first (the fast path keeps a rotation in ``R``; afterwards ``R = I``)."""
    U, m = _blocks(state)
    n, R = U.shape[1], state["R"]
    eye = torch.eye(n, dtype=R.dtype, device=R.device).expand_as(R)
    if not torch.equal(R, eye):
        U.copy_(torch.einsum("bij,bjk->bik", R.to(U.dtype), U))
        R.copy_(eye)
    return U, m


def refresh_curvature(state: dict[str, Any], U: Tensor, c: Tensor, beta2: float, *, eigh=torch.linalg.eigh) -> None:
    """The curvature model's refresh from ``c`` ``(B, k)`` at rate ``beta2`` (``update_curvature``), counted."""
    U.copy_(update_curvature(U, state["s"], c, beta2, eigh=eigh))
    state["curvature_steps"] += 1


def update_energy(state: dict[str, Any], g: Tensor, beta2: float) -> None:
    """``e <- beta2 e + (1 - beta2) |g|^2`` per block ``g`` ``(B, k)``: the scale of relative damping."""
    state["e"].mul_(beta2).add_(torch.linalg.vector_norm(g, dim=1, dtype=torch.float64).square(), alpha=1 - beta2)


def update_momentum(m: Tensor, g: Tensor, beta1: float, step: int) -> Tensor:
    """``m <- lerp(m, g, 1 - beta1)`` in place; returns the bias-corrected ``m / (1 - beta1^step)``."""
    m.lerp_(g.to(m.dtype), 1 - beta1)
    return m / (1 - beta1**step)


def direction(state: dict[str, Any], hyper: Hyper, U: Tensor, v: Tensor, *,
              curvature_hyper: Hyper | None = None) -> Tensor:
    """``f(G) v`` per block with ``G``'s damping from ``hyper`` and the curvature model debiased as
    ``curvature_hyper`` says (default ``hyper``; a variant may refresh the model at another rate)."""
    k = U.shape[2]
    gamma, debias = damping_of(state, hyper, k)
    if curvature_hyper is not None:
        _, debias = damping_of(state, curvature_hyper, k)
    return precondition(U, state["s"] / debias, gamma, v, hyper.power)


def apply_step(param: Tensor, u: Tensor, hyper: Hyper) -> None:
    """``param <- param (1 - lr wd) - lr clip_rho(u)``: the step ``u`` (blocks as rows) taken in place."""
    if hyper.rho is not None:
        u = u.clamp(-hyper.rho, hyper.rho)
    if hyper.weight_decay != 0:
        param.mul_(1 - hyper.lr * hyper.weight_decay)
    param.add_(u.view(param.shape).to(param.dtype), alpha=-hyper.lr)


def adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """First-order AdamW (torch's formula) for the blocks of ``algorithm="adamw"`` groups.

    Lets one optimizer train the parameters that should not carry Ginger state
    (e.g. the non-target trainable parameters of a LoRA model) without a second optimizer.
    """
    for param, grad, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        g = grad.to(m.dtype)
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
        param.add_((m / denom).to(param.dtype), alpha=-lr / (1 - beta1**step))


def adamw_masked(param: Tensor, grad: Tensor, state: dict[str, Any], *, lr: float, beta1: float, beta2: float,
                 eps: float, weight_decay: float) -> None:
    """``adamw`` for one tensor whose gradient may not be finite, decided on its device without reading it:
    where it is not finite nothing moves but ``skipped``. ``step`` and ``skipped`` become 0-d device tensors."""
    device_counters(state, param.device, ("step", "skipped"))
    ok = torch.isfinite(grad).all()
    state["step"] += ok
    state["skipped"] += torch.logical_not(ok)
    t = state["step"].double()
    m, v = state["exp_avg"], state["exp_avg_sq"]
    g = torch.where(ok, grad.to(m.dtype), 0)
    m_new = torch.lerp(m, g, 1 - beta1)
    v_new = v * beta2 + (1 - beta2) * g * g
    denom = (v_new.sqrt() / (1 - torch.pow(beta2, t)).sqrt()).add_(eps)
    update = (m_new / denom) * (lr / (1 - torch.pow(beta1, t)))
    new_param = param * (1 - lr * weight_decay) - update.to(param.dtype)
    torch._foreach_copy_([m, v, param], [torch.where(ok, new, old) for old, new in
                                         ((m, m_new), (v, v_new), (param, new_param))])
