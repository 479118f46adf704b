"""Functional core of Ginger: the math of one step on lists of blocks, no bookkeeping.

A block is one flattened parameter tensor of length ``d``. Its state is

* ``m``  (d,)          first moment, in the state dtype;
* ``U``  (tau_e, d)    orthonormal basis, stored as *rows* so each vector is contiguous;
* ``s``  (tau_e,)      eigenvalues of the low-rank curvature part, float64;
* ``R``  (tau_e, tau_e) float64: the eigenbasis is ``R U``. The fast path
  (``ginger_hf.fused``) moves ``U`` by cheap rank-one reflections and keeps the rest of
  the rotation in ``R``; this reference makes ``R U`` explicit and keeps ``R = I``;

with ``tau_e = min(tau, d)``. The curvature model is ``gamma*I + U^T R^T diag(s) R U``
(``U`` holds the basis as rows). See GINGER.md sections 1-2 for the method.

The optimizer shell (``ginger_hf.optimizer``) owns validation, state creation and
skipping of non-finite blocks; everything here assumes well-formed, finite inputs.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

__all__ = ["ginger", "update_curvature", "apply_update", "init_block_state", "adamw"]

# A residual below this multiple of eps * ||c|| is rounding noise: the new direction adds nothing.
_RESIDUAL_NOISE = 64.0


def init_block_state(param: Tensor, tau: int, state_dtype: torch.dtype) -> dict[str, Tensor]:
    """Fresh state: ``m = 0``, ``s = 0``, ``U`` = the first ``tau_e`` unit vectors, ``R = I``."""
    d = param.numel()
    tau_e = min(tau, d)
    return {
        "m": torch.zeros(d, dtype=state_dtype, device=param.device),
        "U": torch.eye(tau_e, d, dtype=state_dtype, device=param.device),
        "s": torch.zeros(tau_e, dtype=torch.float64, device=param.device),
        "R": torch.eye(tau_e, dtype=torch.float64, device=param.device),
    }


def _project_out(U: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``k = U c`` and the residual ``p = c - U^T k``, orthogonalised twice ("twice is enough").

    The second pass keeps ``p`` orthogonal to ``U`` to rounding even when ``c`` lies
    almost in the span of ``U``, which is what keeps ``U`` orthonormal over many steps.
    Returns ``k`` (float64), ``p`` and ``r = ||p||`` (float64; 0 when ``p`` is noise).
    """
    k = U @ c
    p = torch.addmv(c, U.T, k, alpha=-1)
    k2 = U @ p
    p.addmv_(U.T, k2, alpha=-1)
    k = k.double() + k2.double()
    r = torch.linalg.vector_norm(p, dtype=torch.float64)
    noise = _RESIDUAL_NOISE * torch.finfo(U.dtype).eps * torch.linalg.vector_norm(c, dtype=torch.float64)
    r = torch.where(r > noise, r, torch.zeros_like(r))
    return k, p, r


def update_curvature(Us: list[Tensor], ss: list[Tensor], cs: list[Tensor], beta2s: list[float]) -> None:
    """``L <- top_tau(beta2 * L + (1 - beta2) c c^T)`` for each block, in place.

    The ``(tau_e+1)``-sized eigen-solves of all blocks of the same size run as one
    batched float64 ``eigh``.
    """
    projections = [_project_out(U, c.reshape(-1).to(U.dtype)) for U, c in zip(Us, cs)]
    by_size: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(ss):
        by_size[s.numel()].append(i)

    for n, idx in by_size.items():
        K = torch.zeros(len(idx), n + 1, n + 1, dtype=torch.float64, device=ss[idx[0]].device)
        for row, i in enumerate(idx):
            k, _, r = projections[i]
            z = torch.cat([k, r.reshape(1)])
            K[row] = (1 - beta2s[i]) * torch.outer(z, z)
            K[row, :n, :n].diagonal().add_(beta2s[i] * ss[i])
            # With no new direction, pin its eigenvalue below every other so it is the one dropped.
            K[row, n, n] -= (r == 0).double()
        lam, V = torch.linalg.eigh(K)
        for row, i in enumerate(idx):
            _, p, r = projections[i]
            U = Us[i]
            A = V[row, :n, 1:]  # eigen-solve ascends: drop column 0, the smallest
            b = V[row, n, 1:] * torch.where(r > 0, 1 / r, torch.zeros_like(r))
            U.copy_(torch.addr(A.T.to(U.dtype) @ U, b.to(U.dtype), p))
            ss[i].copy_(lam[row, 1:].clamp_min(0))


def apply_update(
    params: list[Tensor],
    grads: list[Tensor],
    ms: list[Tensor],
    Us: list[Tensor],
    ss: list[Tensor],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    damping: float,
    rho: float | None,
    weight_decay: float,
) -> None:
    """Momentum, Woodbury direction ``G^{-1} m_hat``, optional clip, decoupled weight decay."""
    for param, grad, m, U, s, step in zip(params, grads, ms, Us, ss, steps):
        m.lerp_(grad.reshape(-1).to(m.dtype), 1 - beta1)
        # G^{-1} v = (v - U^T diag(s / (gamma + s)) U v) / gamma, with v = m / (1 - beta1^t)
        shrink = (s / (damping + s)).to(m.dtype)
        u = torch.addmv(m, U.T, shrink * (U @ m), alpha=-1)
        u.div_(damping * (1 - beta1**step))
        if rho is not None:
            u.clamp_(-rho, rho)
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        param.add_(u.view_as(param).to(param.dtype), alpha=-lr)


def ginger(
    params: list[Tensor],
    grads: list[Tensor],
    curvatures: list[Tensor | None],
    ms: list[Tensor],
    Us: list[Tensor],
    ss: list[Tensor],
    Rs: list[Tensor],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    damping: float,
    rho: float | None,
    weight_decay: float,
) -> None:
    """One Ginger step for a list of blocks sharing hyper-parameters.

    ``curvatures[i]`` is the block's curvature vector on a refresh step and ``None``
    otherwise; ``steps[i]`` is the block's step count *after* this step (for bias
    correction). Parameters and state are updated in place. A block whose ``R`` is not the
    identity (state the fast path wrote) first gets its eigenbasis ``R U`` made explicit.
    """
    eye = [torch.eye(R.shape[0], dtype=R.dtype, device=R.device) for R in Rs]
    for U, R, I in zip(Us, Rs, eye):
        if not torch.equal(R, I):
            U.copy_(R.to(U.dtype) @ U)
            R.copy_(I)
    refresh = [i for i, c in enumerate(curvatures) if c is not None]
    if refresh:
        update_curvature(
            [Us[i] for i in refresh],
            [ss[i] for i in refresh],
            [curvatures[i] for i in refresh],
            [beta2] * len(refresh),
        )
    apply_update(
        params, grads, ms, Us, ss, steps,
        lr=lr, beta1=beta1, damping=damping, rho=rho, weight_decay=weight_decay,
    )


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
