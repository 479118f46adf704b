"""The optimizers a Trainer user could switch to instead of Ginger (issue 20's peers), built for a model.

``build(name, model, lr)`` returns a ``torch.optim.Optimizer`` whose ``param_groups`` carry ``lr``,
so the Trainer's scheduler drives it (``proxy.run`` passes it as ``optimizers=(optimizer, None)``):

* ``muon``: torch's Muon on the 2-D weights of the hidden linear layers, AdamW on everything else
  (embedding, LM head, norms, relative-position biases), one optimizer (``MuonAdamW``). On CPU its
  Newton-Schulz iteration runs in float32: torch's runs it in bfloat16, about 18x slower on this CPU
  (FINDINGS), and the two agree to bfloat16 rounding (tests/test_peers.py).
* ``soap``: heavyball's SOAP with its defaults (torch.compile off on CPU: compiling with autotuning
  would take a large share of a short CPU run).
* ``adam_mini``: Adam-mini, its blocks named for T5 (one scale per head for q and k, per output
  neuron for v, o and the MLP, per token for the embedding, Adam for biases).

Schedule-free AdamW and the AdamW variants are Trainer optimizers (``proxy.OPTIMIZERS``): the Trainer
switches schedule-free's train and eval modes itself.

Peers are the ``bench`` extra (pyproject.toml), never dependencies of ginger_hf.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ginger_hf import functional

PEERS = ("muon", "soap", "adam_mini")

# torch.optim.Muon's defaults (Keller Jordan's quintic iteration).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7
# AdamW's settings in the harness (the paper baseline's betas, no weight decay): Muon's AdamW part uses them.
ADAMW_BETAS = (0.9, 0.99)


def newton_schulz(grad: torch.Tensor, dtype: torch.dtype, coefficients=NS_COEFFICIENTS, steps: int = NS_STEPS,
                  eps: float = NS_EPS) -> torch.Tensor:
    """torch.optim.Muon's orthogonalisation of a 2-D ``grad``, computed in ``dtype`` (torch's: bfloat16)."""
    a, b, c = coefficients
    x = grad.to(dtype)
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def muon_lr_scale(shape: torch.Size, adjust_lr_fn: str) -> float:
    """torch.optim.Muon's per-matrix lr factor: ``match_rms_adamw`` gives its step AdamW's RMS (0.2 sqrt(max dim))."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    raise ValueError(f"adjust_lr_fn must be 'match_rms_adamw' or 'original', got {adjust_lr_fn!r}")


def muon_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(hidden, rest)``: the trainable 2-D weights of ``nn.Linear`` layers other than the LM head (Muon's),
    and every other trainable parameter (AdamW's: embeddings, LM head, norms, biases)."""
    output = model.get_output_embeddings()
    excluded = {id(model.get_input_embeddings().weight), *(() if output is None else (id(output.weight),))}
    hidden = {id(m.weight): m.weight for m in model.modules()
              if isinstance(m, nn.Linear) and m.weight.requires_grad and m.weight.ndim == 2
              and id(m.weight) not in excluded}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in hidden]
    return list(hidden.values()), rest


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.Muon's step on ``hidden`` matrices and AdamW's on ``rest``, in one optimizer.

    One optimizer so that one scheduler drives both (the Trainer takes one). Muon's math is torch's
    (momentum, Nesterov, Newton-Schulz, ``adjust_lr_fn``, decoupled weight decay); ``ns_dtype`` is
    the Newton-Schulz dtype (``None``: float32 on CPU, bfloat16 as torch elsewhere). The AdamW part is
    torch's formula (``ginger_hf.functional.adamw``) at the same lr.
    """

    def __init__(self, hidden, rest, lr: float, *, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, adjust_lr_fn: str = "match_rms_adamw", betas=ADAMW_BETAS,
                 eps: float = 1e-8, ns_dtype: torch.dtype | None = None):
        hidden, rest = list(hidden), list(rest)
        bad = [tuple(p.shape) for p in hidden if p.ndim != 2]
        if bad:
            raise ValueError(f"MuonAdamW: hidden parameters must be 2-D matrices, got shapes {bad}")
        muon_lr_scale((1, 1), adjust_lr_fn)  # validates it
        groups = [dict(params=hidden, algorithm="muon"), dict(params=rest, algorithm="adamw")]
        super().__init__([g for g in groups if g["params"]],
                         dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                              adjust_lr_fn=adjust_lr_fn, betas=tuple(betas), eps=eps))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["algorithm"] == "muon":
                self._muon(group, params)
            else:
                self._adamw(group, params)
        return loss

    def _muon(self, group, params):
        lr, mu = group["lr"], group["momentum"]
        for p in params:
            grad = p.grad
            buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(grad))
            buf.lerp_(grad, 1 - mu)
            update = grad.lerp(buf, mu) if group["nesterov"] else buf
            dtype = self.ns_dtype or (torch.float32 if p.device.type == "cpu" else torch.bfloat16)
            update = newton_schulz(update, dtype)
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(update, alpha=-lr * muon_lr_scale(p.shape, group["adjust_lr_fn"]))

    def _adamw(self, group, params):
        states = []
        for p in params:
            state = self.state[p]
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
            states.append(state)
        beta1, beta2 = group["betas"]
        functional.adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                         [s["exp_avg_sq"] for s in states], [s["step"] for s in states], lr=group["lr"],
                         beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])


def adam_mini(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam-mini (the ``adam-mini`` package) with its partition named for transformers' T5.

    Adam-mini finds blocks by name; T5's names (``shared``, ``SelfAttention.q``, ``DenseReluDense``) are not in
    its lists, and its output name ``final_layer`` would catch T5's ``final_layer_norm``. Betas are the
    harness AdamW's. LoRA factors and norms fall in its last class (one scale per tensor).
    """
    from adam_mini import Adam_mini

    cfg = model.config
    opt = Adam_mini(model.named_parameters(), lr=lr, betas=ADAMW_BETAS, eps=1e-8, weight_decay=0.0,
                    dim=cfg.d_model, n_heads=cfg.num_heads, verbose=False)
    opt.embd_names = {"shared", "embed_tokens"}
    opt.output_names = {"lm_head"}
    opt.wqk_names = {".q.weight", ".k.weight"}
    opt.wv_names = {".v.weight"}
    opt.attn_proj_names = {".o.weight"}
    opt.mlp_names = {"densereludense"}
    if cfg.num_heads * cfg.d_kv != cfg.d_model:
        raise ValueError(f"adam_mini: blocks per head need num_heads * d_kv == d_model, got {cfg.num_heads} * "
                         f"{cfg.d_kv} != {cfg.d_model}")
    return opt


def soap(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """heavyball's SOAP with its defaults (betas 0.9/0.95, weight decay 0.01, preconditioner every 2 steps)."""
    import heavyball

    if next(model.parameters()).device.type == "cpu":
        heavyball.utils.compile_mode = None  # heavyball's documented switch: eager on CPU
    return heavyball.SOAP([p for p in model.parameters() if p.requires_grad], lr=lr)


def build(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The peer ``name`` (one of ``PEERS``) for ``model``'s trainable parameters at learning rate ``lr``."""
    if name == "muon":
        return MuonAdamW(*muon_split(model), lr=lr)
    if name == "soap":
        return soap(model, lr)
    if name == "adam_mini":
        return adam_mini(model, lr)
    raise ValueError(f"peer must be one of {PEERS}, got {name!r}")

