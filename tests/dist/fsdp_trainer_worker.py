"""Stock Seq2SeqTrainer with ``--optim ginger`` and ``--fsdp`` (FSDP2) under torchrun on CPU, for
tests/test_fsdp_trainer.py.

accelerate turns FSDP on only for GPU-like distributed types: on CPU processes it silently keeps
``MULTI_CPU`` (DDP) and drops the plugin. ``ForcedFSDPTrainer`` switches the accelerate state to
FSDP with the Trainer's own FSDP2 plugin right after the Trainer builds its ``Accelerator``, so
``accelerator.prepare`` runs accelerate's real FSDP2 path (``fully_shard`` on gloo, the optimizer's
param_groups swapped to the sharded DTensors, FSDP state-dict save/load). On GPUs no forcing is
needed: ``torchrun --nproc_per_node N`` with ``--fsdp`` does it.

``--no-fsdp`` runs the same Trainer with DDP, the reference: both draw the same sampled labels (each
rank's global RNG, seeded alike, consumed alike) from the same micro-batches, so FSDP2 must match it.

Writes ``<out>/rank<r>.pt``: parameters and Ginger state (full tensors), the accelerate distributed type,
how many parameters are sharded, whether the optimizer holds the sharded ones, whether the optimizer
sums curvature itself (``curvature_group``), whether the curvature hook runs after FSDP2's, the step counts.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

sys.path.insert(0, os.path.dirname(__file__))
import tiny  # noqa: E402
import helpers  # noqa: E402  (tests/helpers.py, on the path tiny sets)

import ginger_hf  # noqa: E402
from ginger_hf.sharding import is_dtensor  # noqa: E402


class ForcedFSDPTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer whose accelerate state is FSDP(2) even on CPU processes (see the module docstring)."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.is_fsdp_enabled or not self.args.fsdp:
            return
        from accelerate.state import AcceleratorState, PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        AcceleratorState._shared_state.update(distributed_type=DistributedType.FSDP, fsdp_plugin=plugin)
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.is_fsdp_enabled = True


def full(t):
    return (t.full_tensor() if is_dtensor(t) else t).detach().cpu().clone()


def snapshot(model, optimizer) -> dict:
    """Parameters and Ginger state as full CPU tensors (a collective for sharded ones: call on every rank)."""
    ginger = ginger_hf.unwrap_ginger(optimizer)
    out = {}
    for name, p in model.named_parameters():
        out["param/" + name] = full(p)
        for key, value in sorted(ginger.state.get(p, {}).items()):
            out[f"state/{name}/{key}"] = full(value) if isinstance(value, torch.Tensor) else value
    return out


def run_recipe(tiny_local: str, out: str) -> None:
    """recipes/summarization/run_summarization.py with ``--fsdp`` (FSDP2) and ``--optim ginger``, on the tiny
    local T5 and data of tests/test_recipes.py; the FSDP state forced as above."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
    from test_recipes import load_recipe

    recipe = load_recipe()
    recipe.Seq2SeqTrainer = ForcedFSDPTrainer
    fsdp_config = '{"version": 2, "state_dict_type": "FULL_STATE_DICT", "transformer_layer_cls_to_wrap": ["T5Block"]}'
    results = recipe.main([
        "--model_name_or_path", f"{tiny_local}/model", "--train_file", f"{tiny_local}/train.jsonl.gz",
        "--validation_file", f"{tiny_local}/validation.jsonl.gz", "--output_dir", out,
        "--test_file", f"{tiny_local}/test.jsonl.gz", "--do_train", "--do_eval", "--do_predict",
        "--predict_with_generate", "--generation_max_length", "8", "--max_source_length", "48",
        "--max_target_length", "12",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "3", "--max_steps", "3",
        "--optim", "ginger", "--optim_args", "tau=2,curvature_interval=1", "--learning_rate", "1e-3", "--save_strategy", "no",
        "--report_to", "none", "--use_cpu", "true", "--ddp_backend", "gloo", "--disable_tqdm", "true",
        "--dataloader_num_workers", "0", "--fsdp", "--fsdp_config", fsdp_config,
    ])
    torch.save({"results": results, "world": dist.get_world_size()}, os.path.join(out, f"rank{dist.get_rank()}.pt"))


def run_plain_loop(argv: list[str]) -> None:
    """recipes/accelerate/plain_loop.py under accelerate's FSDP2, forced on CPU like the Trainer above: every
    ``Accelerator`` switches its state to FSDP with the plugin that fsdp2_multi_gpu_bf16.yaml gives (no bf16)."""
    import runpy

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    init = Accelerator.__init__

    def forced(self, *args, **kwargs):
        init(self, *args, **kwargs)
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                                auto_wrap_policy="transformer_based_wrap",
                                                state_dict_type="SHARDED_STATE_DICT")
        AcceleratorState._shared_state.update(distributed_type=DistributedType.FSDP, fsdp_plugin=plugin)
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    Accelerator.__init__ = forced
    script = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "accelerate", "plain_loop.py")
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


def main() -> None:
    if sys.argv[1:2] == ["--plain-loop"]:
        return run_plain_loop(sys.argv[2:])
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--curvature", default="mc")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4, help="per-device micro-batch")
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: none)")
    ap.add_argument("--resume", default=None, help="resume_from_checkpoint")
    ap.add_argument("--state-dict-type", default="SHARDED_STATE_DICT")
    ap.add_argument("--model", default="t5", choices=["t5", "llama"])
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--no-fsdp", action="store_true", help="no --fsdp: DDP, the unsharded reference")
    ap.add_argument("--recipe", default=None, help="run the summarization recipe on this tiny_local folder")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.recipe:
        return run_recipe(args.recipe, args.out)
    if args.model == "t5":
        model, data, layer = tiny.tiny_t5(seed=0, dropout=args.dropout), tiny.make_data(96, seed=4), "T5Block"
        # transformers 5 gives T5's encoder and decoder their own embedding modules sharing `shared.weight`;
        # accelerate's FSDP2 groups only `shared` with `lm_head`, so fully_shard finds the weight in two groups.
        # One module for all three uses (what set_input_embeddings does) keeps the tie in one group.
        model.set_input_embeddings(model.get_input_embeddings())
    else:  # no tied weights: FULL_STATE_DICT checkpoints (torch cannot load T5's tied aliases from one)
        model, data, layer = helpers.tiny_llama(seed=0), helpers.causal_data(96, seed=4), "LlamaDecoderLayer"
    fsdp = {} if args.no_fsdp else dict(
        fsdp=True, fsdp_config={"version": 2, "reshard_after_forward": True, "state_dict_type": args.state_dict_type,
                                "transformer_layer_cls_to_wrap": [layer]})
    targs = Seq2SeqTrainingArguments(
        output_dir=os.path.join(args.out, "run"), optim="ginger", optim_args=f"tau=2,curvature={args.curvature},curvature_interval=1",
        learning_rate=3e-3, per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.accum,
        max_steps=args.steps, save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        use_cpu=True, ddp_backend="gloo", report_to=[], disable_tqdm=True, dataloader_num_workers=0, seed=0,
        logging_steps=100, **fsdp,
    )
    trainer = ForcedFSDPTrainer(model=model, args=targs, train_dataset=data)
    trainer.train(resume_from_checkpoint=args.resume)
    ginger = ginger_hf.unwrap_ginger(trainer.optimizer)
    sharded = [p for p in trainer.model.parameters() if is_dtensor(p)]
    hooks = list(trainer.model._forward_hooks.values())
    result = {
        "snapshot": snapshot(trainer.model, trainer.optimizer),
        "world": targs.world_size,
        "distributed_type": str(trainer.accelerator.state.distributed_type),
        "sharded_params": len(sharded),
        "optimizer_holds_sharded": all(is_dtensor(p) for g in ginger.param_groups for p in g["params"]),
        "curvature_group": ginger.curvature_group is not None,
        "hook_last": bool(hooks) and type(hooks[-1]).__name__ == "SampledLabelCurvatureHook",
        "steps": sorted({int(st["step"]) for st in ginger.state.values()}),
    }
    tiny.save_rank_result(result, args.out, targs.process_index)


if __name__ == "__main__":
    tiny.run_worker(main)
