"""Exact resume with the stock Trainer: ``--optim ginger`` (``curvature=mc``, sampled labels from the global RNG).

12 optimizer steps with gradient accumulation 2 equal a run saved at step 6 and continued with
``resume_from_checkpoint``: the checkpoint holds Ginger's state and the RNG the labels are drawn from.
"""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import tiny  # noqa: E402

import ginger_hf  # noqa: E402,F401  (registers --optim ginger)


def make_trainer(out: Path, model_seed: int) -> Seq2SeqTrainer:
    args = Seq2SeqTrainingArguments(
        output_dir=str(out), optim="ginger", optim_args="tau=2,curvature=mc", learning_rate=3e-3,
        per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=12, save_strategy="steps",
        save_steps=6, use_cpu=True, report_to=[], disable_tqdm=True, dataloader_num_workers=0, seed=0,
        logging_steps=100,
    )
    return Seq2SeqTrainer(model=tiny.tiny_t5(seed=model_seed, dropout=0.1), args=args,
                          train_dataset=tiny.make_data(64, seed=4))


def final_params(trainer) -> dict:
    return tiny.snapshot(trainer.model, trainer.optimizer)


def test_trainer_resume_from_checkpoint_is_exact(tmp_path):
    straight = make_trainer(tmp_path / "a", model_seed=0)
    straight.train()
    reference = final_params(straight)
    checkpoint = tmp_path / "a" / "checkpoint-6"
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "rng_state.pth").exists()

    resumed = make_trainer(tmp_path / "b", model_seed=1)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    got = final_params(resumed)
    assert got.keys() == reference.keys()
    assert ginger_hf.unwrap_ginger(resumed.optimizer).state  # Ginger state came back and moved on
    assert ginger_hf.unwrap_ginger(resumed.optimizer).curvature_group is None  # one process: no communication
    assert max(st["step"] for st in ginger_hf.unwrap_ginger(resumed.optimizer).state.values()) == 12
    assert tiny.max_abs_diff(got, reference) <= 1e-6

    # Control: the same resume without the checkpointed RNG draws other labels and dropout masks.
    (checkpoint / "rng_state.pth").unlink()
    control = make_trainer(tmp_path / "c", model_seed=1)
    control.train(resume_from_checkpoint=str(checkpoint))
    assert tiny.max_abs_diff(final_params(control), reference) > 1e-4
