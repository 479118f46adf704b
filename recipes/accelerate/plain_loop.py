"""Ginger in a plain Accelerate loop (no Trainer), with sampled-label (``mc``) curvature.

One process, DDP or FSDP2 on several GPUs and bf16/fp16 all come from the ``accelerate launch`` config
(see recipes/accelerate/*.yaml); on CPU use ``torchrun --nproc_per_node 2 plain_loop.py --cpu``.
The model is a tiny T5 learning to copy its input, so the script runs anywhere in seconds:
replace ``build_model`` and ``build_data`` with yours.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import T5Config, T5ForConditionalGeneration

import ginger_hf


def build_model() -> T5ForConditionalGeneration:
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=64, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ))
    # FSDP2 (accelerate) shards the input embedding together with lm_head; make T5's encoder and decoder use that
    # one module rather than their own modules sharing its weight, which fully_shard would see twice.
    model.set_input_embeddings(model.get_input_embeddings())
    return model


def build_data(n: int = 512) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        x = torch.randint(2, 64, (12,), generator=g)
        rows.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x[:8].clone()})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch_size", type=int, default=16, help="per process")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--save_dir", default=None, help="accelerator.save_state() here at the end")
    ap.add_argument("--resume_from", default=None, help="accelerator.load_state() from here first")
    args = ap.parse_args()

    accelerator = Accelerator(cpu=args.cpu)
    set_seed(0)
    model = build_model()
    optimizer = ginger_hf.Ginger(model.parameters(), lr=args.lr, curvature="mc")
    loader = torch.utils.data.DataLoader(build_data(), batch_size=args.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0),
                                         collate_fn=lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]})
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ginger_hf.sync_curvature(optimizer, model)  # DDP / FSDP2: sum curvature over ranks; no-op on one process

    step = 0
    if args.resume_from:
        accelerator.load_state(args.resume_from)  # model, Ginger state, RNG (sampled labels), fp16 scaler
        step = ginger_hf.unwrap_ginger(optimizer).state[next(model.parameters())]["step"]

    def batches():  # continue mid-epoch after a resume, then whole epochs
        yield from accelerator.skip_first_batches(loader, step % len(loader))
        while True:
            yield from loader

    model.train()
    for batch in batches():
        if step == args.steps:
            break
        out = model(**batch)
        labels = batch["labels"]
        # Label positions of this optimizer step on ALL ranks: the loss and the curvature share it.
        n = accelerator.gather(labels.ne(-100).sum().reshape(1)).sum()
        ginger_hf.add_sampled_label_curvature(out.logits, labels, optimizer, num_items=n)  # before backward
        loss = F.cross_entropy(out.logits.reshape(-1, out.logits.size(-1)).float(), labels.reshape(-1),
                               reduction="sum") * (accelerator.num_processes / n)  # DDP's mean undoes the factor
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()  # also drops the curvature of a step the fp16 scaler skipped
        step += 1
        if step % 50 == 0 or step == args.steps:
            accelerator.print(f"step {step}: loss {loss.item() / accelerator.num_processes:.4f}")
    if args.save_dir:
        accelerator.save_state(args.save_dir)
    accelerator.end_training()


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # gloo aborts at exit when a group is left alive
