"""An independent dense float64 Ginger, straight from GINGER.md, for the exactness tests.

It keeps the full ``d x d`` low-rank part ``L`` of each block, applies ``top_tau`` by an
eigen-decomposition of ``L`` and solves ``(gamma*I + L) u = m_hat`` densely.
"""

from __future__ import annotations

import torch


class DenseGinger:
    def __init__(self, shapes, *, lr, betas, tau, damping, rho, weight_decay, curvature_interval=1):
        self.lr, (self.beta1, self.beta2) = lr, betas
        self.tau, self.damping, self.rho, self.wd = tau, damping, rho, weight_decay
        self.interval = curvature_interval
        self.L = [torch.zeros(n, n, dtype=torch.float64) for n in (s.numel() for s in shapes)]
        self.m = [torch.zeros(s.numel(), dtype=torch.float64) for s in shapes]
        self.t = 0

    def _top_tau(self, L: torch.Tensor) -> torch.Tensor:
        lam, V = torch.linalg.eigh(L)
        keep = min(self.tau, L.shape[0])
        lam, V = lam[-keep:], V[:, -keep:]
        return (V * lam) @ V.T

    def step(self, thetas, grads, curvs):
        """``thetas`` are updated and returned; ``curvs[i]`` is used on refresh steps."""
        self.t += 1
        refresh = (self.t - 1) % self.interval == 0
        out = []
        for i, (theta, g, c) in enumerate(zip(thetas, grads, curvs)):
            theta, g, c = (x.double().reshape(-1) for x in (theta, g, c))
            if refresh:
                self.L[i] = self._top_tau(self.beta2 * self.L[i] + (1 - self.beta2) * torch.outer(c, c))
            self.m[i] = self.beta1 * self.m[i] + (1 - self.beta1) * g
            m_hat = self.m[i] / (1 - self.beta1**self.t)
            G = self.damping * torch.eye(theta.numel(), dtype=torch.float64) + self.L[i]
            u = torch.linalg.solve(G, m_hat)
            if self.rho is not None:
                u = u.clamp(-self.rho, self.rho)
            out.append(theta - self.lr * u - self.lr * self.wd * theta)
        return out
