"""The main job, scripts/compare.py, at tiny size: report.json, the markdown table and the plot."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from ginger_hf import proxy

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def compare():
    return load_script("compare")


def test_compare_writes_report_table_and_plot(compare, tmp_path):
    out = tmp_path / "cmp"
    compare.main(["--optimizers", "ginger,adamw", "--max-steps", "5", "--output-dir", str(out), "--tiny",
                  "--batch-size", "8", "--eval-size", "16", "--rouge-size", "8", "--eval-steps", "5"])
    rows = json.loads((out / "report.json").read_text())
    assert [r["optimizer"] for r in rows] == ["ginger", "adamw"]
    assert [r["lr"] for r in rows] == [proxy.DEFAULT_LR["ginger"], proxy.DEFAULT_LR["adamw"]]
    for r in rows:
        for key in ("eval_loss", "rouge1", "rouge2", "rougeL", "sec_per_step", "optimizer_state_mb"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), key
        assert r["sec_per_step"] > 0 and 0 <= r["rouge1"] <= 100 and r["rouge_examples"] == 8
        curve = r["eval_curve"]
        assert [p["step"] for p in curve] == [0, 5]  # eval before training, and after the last step
        assert curve[-1]["eval_loss"] == r["eval_loss"]
        assert curve[-1]["eval_loss"] < curve[0]["eval_loss"]  # five steps on the same batches already help
        assert curve[0]["train_seconds"] <= curve[-1]["train_seconds"]
        assert [p["step"] for p in r["train_loss_curve"]] == [1, 2, 3, 4, 5]
    # Same seed, same init: both start from the same eval loss.
    assert rows[0]["eval_curve"][0]["eval_loss"] == pytest.approx(rows[1]["eval_curve"][0]["eval_loss"], rel=1e-6)
    # Ginger keeps m and a rank-tau basis (tau=4): (4+1) numbers per parameter vs AdamW's 2.
    n = rows[0]["num_parameters"]
    assert rows[1]["optimizer_state_mb"] == pytest.approx(2 * n * 4 / 1e6, rel=0.01)
    assert rows[0]["optimizer_state_mb"] == pytest.approx(5 * n * 4 / 1e6, rel=0.01)

    table = (out / "report.md").read_text()
    assert "| optimizer | lr | eval loss | ROUGE-1 | ROUGE-2 | ROUGE-L |" in table
    for r in rows:
        assert f"| {r['optimizer']} | {r['lr']:g} | {r['eval_loss']:.3f} | {r['rouge1']:.2f} |" in table
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_compare_rejects_unknown_optimizer_before_training(compare, tmp_path):
    with pytest.raises(ValueError, match="adamw.*ginger|ginger.*adamw"):
        compare.main(["--optimizers", "ginger,sgd", "--output-dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="--lr"):
        compare.main(["--lr", "adam=1e-3", "--output-dir", str(tmp_path / "y")])


def test_proxy_model_has_the_sane_init():
    """FINDINGS: stock T5 init stalls from scratch; each linear layer gets std 1/sqrt(fan_in) instead."""
    tokenizer = proxy.load_tokenizer()
    model = proxy.build_model(tokenizer)
    assert not model.config.scale_decoder_outputs
    d, d_kv = model.config.d_model, model.config.d_kv
    stds = {name: p.std().item() for name, p in model.named_parameters()}
    assert stds["shared.weight"] == pytest.approx(d ** -0.5, rel=0.05)
    assert stds["encoder.block.0.layer.0.SelfAttention.k.weight"] == pytest.approx(d ** -0.5, rel=0.05)
    assert stds["encoder.block.0.layer.0.SelfAttention.q.weight"] == pytest.approx((d * d_kv) ** -0.5, rel=0.05)
    assert stds["decoder.block.0.layer.2.DenseReluDense.wo.weight"] == pytest.approx(model.config.d_ff ** -0.5, rel=0.05)
    # Output logits keep T5's stock scale at step 0 (std ~1 before training).
    batch = tokenizer(["summarize: a text editor"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch, labels=tokenizer(["editor"], return_tensors="pt").input_ids).logits
    assert 0.3 < logits.std().item() < 3.0
