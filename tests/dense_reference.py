"""An independent dense float64 Ginger, straight from GINGER.md sections 2 and 6, for the exactness tests.

Each block keeps its full ``k x k`` low-rank part ``L``, applies ``top_tau`` by an
eigen-decomposition of ``L``, forms ``G = gamma I + L_hat`` (``gamma = damping + lambda *
e_hat / k``, ``e`` the EMA of the block's ``|g|^2``) and applies ``G^-power`` by a dense
eigen-decomposition. Blocks are the rows of tensors with 2+ dims (``blocks="row"``)
or whole tensors.
"""

from __future__ import annotations

import torch


class DenseGinger:
    def __init__(self, shapes, *, lr, betas, tau, damping, rho, weight_decay, curvature_interval=1,
                 blocks="tensor", power=1.0, relative_damping=0.0, bias_correction=False):
        self.lr, (self.beta1, self.beta2) = lr, betas
        self.tau, self.damping, self.rho, self.wd = tau, damping, rho, weight_decay
        self.interval, self.power, self.lam, self.debias = curvature_interval, power, relative_damping, bias_correction
        self.splits = [self._split(s, blocks) for s in shapes]
        self.L = [[torch.zeros(k, k, dtype=torch.float64) for _ in range(B)] for B, k in self.splits]
        self.e = [[0.0] * B for B, _ in self.splits]
        self.m = [torch.zeros(B * k, dtype=torch.float64) for B, k in self.splits]
        self.t = self.q = 0

    @staticmethod
    def _split(shape, blocks):
        numel = torch.Size(shape).numel()
        if blocks == "row" and len(shape) >= 2:
            return shape[0], numel // shape[0]
        return 1, numel

    def _top_tau(self, L: torch.Tensor) -> torch.Tensor:
        lam, V = torch.linalg.eigh(L)
        keep = min(self.tau, L.shape[0])
        if keep == 0:
            return torch.zeros_like(L)
        lam, V = lam[-keep:], V[:, -keep:]
        return (V * lam) @ V.T

    def _power(self, G: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        lam, V = torch.linalg.eigh(G)
        return V @ (lam.pow(-self.power) * (V.T @ v))

    def step(self, thetas, grads, curvs):
        """``thetas`` are updated and returned; ``curvs[i]`` is used on refresh steps."""
        self.t += 1
        refresh = (self.t - 1) % self.interval == 0
        self.q += refresh
        debias = 1 - self.beta2**self.q if self.debias else 1.0
        debias_e = 1 - self.beta2**self.t if self.debias else 1.0
        out = []
        for i, (theta, g, c) in enumerate(zip(thetas, grads, curvs)):
            B, k = self.splits[i]
            theta, g, c = (x.double().reshape(B, k) for x in (theta, g, c))
            self.m[i] = self.beta1 * self.m[i] + (1 - self.beta1) * g.reshape(-1)
            m_hat = (self.m[i] / (1 - self.beta1**self.t)).reshape(B, k)
            new = []
            for b in range(B):
                if refresh:
                    self.L[i][b] = self._top_tau(self.beta2 * self.L[i][b] + (1 - self.beta2) * torch.outer(c[b], c[b]))
                self.e[i][b] = self.beta2 * self.e[i][b] + (1 - self.beta2) * float(g[b] @ g[b])
                gamma = self.damping + self.lam * self.e[i][b] / (debias_e * k)
                G = gamma * torch.eye(k, dtype=torch.float64) + self.L[i][b] / debias
                u = self._power(G, m_hat[b])
                if self.rho is not None:
                    u = u.clamp(-self.rho, self.rho)
                new.append(theta[b] - self.lr * u - self.lr * self.wd * theta[b])
            out.append(torch.stack(new).reshape(-1) if B else theta.reshape(-1))
        return out
