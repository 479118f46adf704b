"""Everything the tests share: tiny transformers models, toy data, a free port, state checks (CPU, seconds).

Imported in-process by the tests and by the torchrun workers in ``tests/dist``.
"""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

VOCAB = 100


def tiny_t5(seed: int = 0, *, vocab: int = VOCAB, d_model: int = 32, layers: int = 2, heads: int = 4,
            dropout: float = 0.0) -> T5ForConditionalGeneration:
    """A T5 of ``layers`` + ``layers`` blocks, ``d_model`` wide, seeded."""
    config = T5Config(
        vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=layers, num_decoder_layers=layers,
        num_heads=heads, dropout_rate=dropout, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config)


def free_port() -> int:
    """A TCP port free on this machine right now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orthonormality_error(state: dict) -> float:
    """Largest deviation from orthonormal of any block's eigenbasis ``R U`` (the basis the model uses)."""
    B, n = state["s"].shape
    U = state["U"].double().reshape(n, B, -1).transpose(0, 1)
    E = state["R"].double() @ U
    eye = torch.eye(n, dtype=torch.float64)
    return (E @ E.mT - eye).abs().max().item() if n else 0.0


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _gpt2_config(**kw) -> GPT2Config:
    return GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw,
    )


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(_gpt2_config())


def tiny_gpt2_classifier(num_labels: int, seed: int = 0) -> GPT2ForSequenceClassification:
    torch.manual_seed(seed)
    return GPT2ForSequenceClassification(_gpt2_config(num_labels=num_labels, pad_token_id=0))


def seq2seq_data(n: int = 64, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Target = the first 6 source tokens reversed; the last 2 label positions of odd rows are padding (-100)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        x = torch.randint(2, VOCAB, (12,), generator=g)
        labels = x[:6].flip(0).clone()
        if i % 2:
            labels[-2:] = -100
        rows.append({"input_ids": x, "attention_mask": torch.ones(12, dtype=torch.long), "labels": labels})
    return rows


def causal_data(n: int = 64, seed: int = 0, length: int = 16) -> list[dict[str, torch.Tensor]]:
    """Counting sequences (next = previous + step mod VOCAB); the first 3 labels of odd rows are -100."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        start = torch.randint(0, VOCAB, (1,), generator=g)
        step = torch.randint(1, 4, (1,), generator=g)
        x = (start + step * torch.arange(length)) % VOCAB
        labels = x.clone()
        if i % 2:
            labels[:3] = -100
        rows.append({"input_ids": x, "attention_mask": torch.ones(length, dtype=torch.long), "labels": labels})
    return rows


def classification_data(n: int = 32, seed: int = 0, num_labels: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        x = torch.randint(1, VOCAB, (8,), generator=g)
        label = int(x[0]) % num_labels
        rows.append({"input_ids": x, "attention_mask": torch.ones(8, dtype=torch.long),
                     "labels": torch.tensor(label if num_labels > 1 else float(label))})
    return rows


COMMON_ARGS = [
    "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--disable_tqdm", "true",
    "--dataloader_num_workers", "0", "--seed", "0",
]


def tiny_llama(seed: int = 0):
    """Decoder-only causal LM whose loss type the Trainer recognises (it counts ``labels[..., 1:]``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def load_script(name: str):
    """``scripts/NAME.py`` imported as a module (the scripts are not a package)."""
    return load_module(Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")


def load_module(path: Path):
    """The Python file at ``path`` imported as a module named after it (scripts and recipes are not packages)."""
    name = path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def reference_curvature(model, batches, sampled, *, shift=False, scale="mean") -> dict[str, torch.Tensor]:
    """The sampled-label curvature vectors of one optimizer step, computed directly: ``model`` run on each
    micro-batch (``batches``: the model's kwargs), cross-entropy at the labels drawn for it (``sampled``), gradients
    summed and divided by ``N`` (``"mean"``) or ``sqrt(N)`` (``"sqrt"``), ``N`` the label positions of all batches."""
    import math

    import torch.nn.functional as F

    params = dict(model.named_parameters())
    n = sum(int((b["labels"][..., 1:] if shift else b["labels"]).ne(-100).sum()) for b in batches)
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for batch, labels in zip(batches, sampled):
        logits = model(**batch).logits
        logits = logits[:, :-1] if shift else logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum")
        for (name, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            if g is not None:
                total[name] += g
    factor = n if scale == "mean" else math.sqrt(n)
    return {name: c / factor for name, c in total.items()}
