"""Shared bits of the accelerate / DDP / resume tests: a tiny T5, fake seq2seq data, and a plain
Accelerate training loop with Ginger and the sampled-label (``mc``) curvature helper.

Used in-process by tests and by the torchrun workers in this folder.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ginger_hf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for helpers
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "recipes"))  # offline_tasks
from helpers import free_port  # noqa: E402,F401  (re-exported for the workers)
from helpers import tiny_t5 as _tiny_t5  # noqa: E402

VOCAB = 48


def tiny_t5(seed: int = 0, dropout: float = 0.1):
    """The distributed tests' T5: one block each side, 16 wide, with dropout."""
    return _tiny_t5(seed, vocab=VOCAB, d_model=16, layers=1, heads=2, dropout=dropout)


def make_data(n: int, seed: int = 0, src_len: int = 10, tgt_len: int = 6) -> list[dict[str, torch.Tensor]]:
    """``n`` examples; targets copy a noisy prefix of the source and have 2..tgt_len real labels."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        src = torch.randint(2, VOCAB, (src_len,), generator=g)
        labels = src[:tgt_len].clone()
        labels[int(torch.randint(2, tgt_len + 1, (1,), generator=g)):] = -100
        data.append({"input_ids": src, "attention_mask": torch.ones_like(src), "labels": labels})
    return data


def collate(examples):
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


def label_count(batch) -> torch.Tensor:
    return batch["labels"].ne(-100).sum()


def train_steps(accelerator, model, optimizer, batches, steps, *, accum=1, curvature="mc", generator_seed=None,
                on_step=None):
    """``steps`` optimizer steps of ``accum`` micro-batches each, drawn from the iterator ``batches``.

    The loss is the summed cross-entropy over the step's label positions on all ranks divided by
    their number (times the world size, which DDP's gradient mean divides out); the ``mc``
    curvature uses the same ``num_items``. ``generator_seed`` fixes the sampled labels per
    (step, rank, micro-batch) so a 2-rank run can be compared with a 1-rank run that
    accumulates the same two halves; ``None`` samples from the global RNG (what
    accelerate checkpoints). ``on_step(step_index)`` runs around ``optimizer.step`` via a context.
    """
    world = accelerator.num_processes
    for step in range(steps):
        micro = [next(batches) for _ in range(accum)]
        num_items = accelerator.gather(sum(label_count(b) for b in micro).reshape(1)).sum()
        for k, batch in enumerate(micro):
            sync = k == accum - 1
            with (accelerator.no_sync(model) if not sync else _null()):
                out = model(**batch)
                if curvature == "mc":
                    gen = None
                    if generator_seed is not None:
                        gen = torch.Generator().manual_seed(generator_seed + 1000 * step + accelerator.process_index * accum + k)
                    ginger_hf.add_sampled_label_curvature(
                        out.logits, batch["labels"], optimizer, num_items=num_items, generator=gen
                    )
                loss = F.cross_entropy(
                    out.logits.reshape(-1, out.logits.shape[-1]), batch["labels"].reshape(-1), reduction="sum"
                ) * (world / num_items)
                accelerator.backward(loss)
        with (on_step(step) if on_step is not None else _null()):
            optimizer.step()
        optimizer.zero_grad()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def snapshot(model, optimizer) -> dict:
    """Parameters and Ginger state as plain CPU tensors / ints, keyed by parameter name."""
    ginger = ginger_hf.unwrap_ginger(optimizer)
    model = getattr(model, "module", model)
    out = {}
    for name, p in model.named_parameters():
        out["param/" + name] = p.detach().cpu().clone()
        for key, value in ginger.state.get(p, {}).items():
            out[f"state/{name}/{key}"] = value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value
    return out


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        if isinstance(a[k], torch.Tensor):
            worst = max(worst, (a[k].double() - b[k].double()).abs().max().item())
        else:
            worst = max(worst, abs(a[k] - b[k]))
    return worst


def bit_identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def save_rank_result(result, out: str, rank: int) -> None:
    """Write this rank's result where the launching test reads it: ``out/rank{rank}.pt``."""
    os.makedirs(out, exist_ok=True)
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


def run_worker(main) -> None:
    """Run a torchrun worker's ``main``, close its process group, and leave without interpreter finalization.

    ``main`` has written its results to disk by then. Gloo's worker threads can still hold work objects
    during finalization, and the process then aborts ("terminate called without an active exception",
    SIGABRT) after it has done everything right: seen once in the DCP reshard test, pytorch/pytorch#179291.
    ``os._exit(0)`` skips finalization; an exception in ``main`` still fails the worker.
    """
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
