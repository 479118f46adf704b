"""The main job, scripts/compare.py, at tiny size: report.json, the markdown table and the plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import load_script

from ginger_hf import state_bytes
from offline_tasks import proxy

ROOT = Path(__file__).resolve().parents[1]


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
    assert proxy.DEFAULT_LR is proxy.TASK_LR["scratch"]
    for r in rows:
        for key in ("eval_loss", "eval_loss_at_equal_time", "rouge1", "rouge2", "rougeL", "sec_per_step",
                    "optimizer_state_mb"):
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
    # Ginger keeps m and a rank-tau basis (tau=4): (4+1) numbers per parameter vs AdamW's 2, plus each
    # row block's small float64 state.
    n = rows[0]["num_parameters"]
    assert rows[1]["optimizer_state_mb"] == pytest.approx(2 * n * 4 / 1e6, rel=0.01)
    model = proxy.build_model(proxy.load_tokenizer(), **compare.TINY_MODEL)
    expected = sum(state_bytes(p.shape, 4, "row", torch.float32) for p in model.parameters())
    assert rows[0]["optimizer_state_mb"] == pytest.approx(expected / 1e6, rel=1e-9)
    assert rows[0]["optimizer_state_mb"] > 5 * n * 4 / 1e6
    # The equal-time column reads the slower optimizer's curve at the faster one's training time.
    budget = min(r["train_seconds"] for r in rows)
    for r in rows:
        assert r["eval_loss_at_equal_time"] == pytest.approx(compare.loss_at(r["eval_curve"], budget))

    table = (out / "report.md").read_text()
    assert "| optimizer | lr | eval loss | at equal time | ROUGE-1 | ROUGE-2 | ROUGE-L |" in table
    for r in rows:
        assert (f"| {r['optimizer']} | {r['lr']:g} | {r['eval_loss']:.3f} | {r['eval_loss_at_equal_time']:.3f} | "
                f"{r['rouge1']:.2f} |") in table
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_loss_at_interpolates_between_evaluations(compare):
    curve = [dict(train_seconds=0.0, eval_loss=8.0), dict(train_seconds=10.0, eval_loss=6.0),
             dict(train_seconds=30.0, eval_loss=5.0)]
    assert compare.loss_at(curve, 5.0) == pytest.approx(7.0)
    assert compare.loss_at(curve, 20.0) == pytest.approx(5.5)
    assert compare.loss_at(curve, 40.0) == 5.0


@pytest.mark.parametrize("task", ["finetune", "lora"])
def test_compare_runs_the_pretrained_tasks(compare, tmp_path, task):
    """The shipped span-corruption T5, fine-tuned fully or through peft LoRA (r 8, alpha 32, layer norms trained)."""
    out = tmp_path / task
    compare.main(["--task", task, "--optimizers", "ginger,adamw", "--max-steps", "2", "--output-dir", str(out),
                  "--batch-size", "4", "--eval-size", "8", "--rouge-size", "2", "--eval-steps", "2"])
    rows = json.loads((out / "report.json").read_text())
    assert [r["task"] for r in rows] == [task, task]
    assert [r["lr"] for r in rows] == [proxy.TASK_LR[task]["ginger"], proxy.TASK_LR[task]["adamw"]]
    n, trained = rows[0]["num_parameters"], rows[0]["trainable_parameters"]
    if task == "finetune":
        assert trained == n
    else:  # LoRA A/B on q, k, v, o of 2 + 2 layers (3 attentions in each decoder layer) plus the layer norms
        d, r = 128, 8
        lora = (2 + 2 * 2) * 4 * 2 * d * r
        norms = (2 * 2 + 1 + 2 * 3 + 1) * d
        assert trained == lora + norms
        assert rows[1]["optimizer_state_mb"] == pytest.approx(2 * trained * 4 / 1e6, rel=0.01)
    for r in rows:
        assert r["eval_curve"][-1]["eval_loss"] < r["eval_curve"][0]["eval_loss"] + 0.5


def test_compare_rejects_unknown_optimizer_before_training(compare, tmp_path):
    with pytest.raises(ValueError, match="adamw.*ginger|ginger.*adamw"):
        compare.main(["--optimizers", "ginger,sgd", "--output-dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="--lr"):
        compare.main(["--lr", "adam=1e-3", "--output-dir", str(tmp_path / "y")])
    with pytest.raises(ValueError, match=r"no learning rate for \['muon'\].*--lr NAME=VALUE"):
        compare.main(["--optimizers", "ginger,muon", "--output-dir", str(tmp_path / "z")])
    assert not (tmp_path / "z").exists()


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


def test_sweep_report_grid_marks_each_best_and_grid_edges(tmp_path, capsys):
    sweep = load_script("sweep_lr")
    runs = [("scratch", "ginger", 1e-3, 5.9), ("scratch", "ginger", 3e-3, 5.5), ("scratch", "ginger", 1e-2, 5.7),
            ("scratch", "adamw", 1e-3, 5.8), ("scratch", "adamw", 3e-3, 6.0), ("scratch", "adamw", 1e-2, 6.1),
            ("lora", "ginger", 1e-3, 6.3)]
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(dict(task=t, config=c, lr=lr, eval_loss=loss)) + "\n" for t, c, lr, loss in runs))
    sweep.main(["--report", str(path)])
    scratch, lora = capsys.readouterr().out.strip().split("\n\n")
    lines = scratch.splitlines()
    assert lines[0] == "| scratch | 0.001 | 0.003 | 0.01 |"
    assert lines[2] == "| ginger | 5.900 | **5.500** | 5.700 |"  # best inside the grid
    assert lines[3] == "| adamw | **5.800** (edge) | 6.000 | 6.100 |"  # best at the grid's end
    assert lora.splitlines()[2] == "| ginger | **6.300** (edge) |"  # fewer than 3 runs
    sweep.main(["--report", str(path), "--configs", "adamw"])
    assert "ginger" not in capsys.readouterr().out.split("\n\n")[0]


def test_sweep_on_the_large_model_evaluates_on_the_held_out_rows(tmp_path, monkeypatch):
    """``--model large --eval-split test``: the larger T5's overrides reach the run, and the eval loss is taken on
    every test row (not validation rows); fine-tuning it starts from its own pre-trained T5, built on first use."""
    sweep = load_script("sweep_lr")
    seen = []

    def fake_run(name, lr, **kw):
        seen.append(kw)
        return {"optim_args": kw["optim_args"], "optimizer": name, "lr": lr, "max_steps": kw["max_steps"],
                "eval_loss": 5.0, "sec_per_step": 0.1, "eval_curve": [], "optimizer_state_mb": 1.0, "ginger_stats": []}

    monkeypatch.setattr(sweep.proxy, "run", fake_run)
    out = tmp_path / "large.jsonl"
    sweep.main(["--model", "large", "--eval-split", "test", "--configs", "adamw", "--lrs", "1e-3", "--max-steps", "3",
                "--output", str(out)])
    (kw,) = seen
    assert kw["model_overrides"] == proxy.MODELS["large"] and kw["task"] == "scratch"
    test = proxy.load_debsum(("test",))["test"]
    assert len(kw["data"]["validation"]) == len(test) == 500
    first = proxy.tokenize_splits({"test": test}, proxy.load_tokenizer(), {"test": 1})["test"][0]
    assert kw["data"]["validation"][0]["input_ids"] == first["input_ids"]
    row = json.loads(out.read_text())
    assert (row["model"], row["eval_split"], row["seed"], row["eval_rows"]) == ("large", "test", 0, 500)
    built = []
    monkeypatch.setattr(sweep, "ensure_pretrained", lambda model: built.append(model) or tmp_path / "pt")
    sweep.main(["--model", "large", "--task", "lora", "--configs", "adamw", "--lrs", "1e-3", "--max-steps", "3",
                "--output", str(tmp_path / "lora.jsonl")])
    assert built == ["large"] and seen[-1]["pretrained"] == tmp_path / "pt" and seen[-1]["task"] == "lora"


def test_sweep_resumes_per_seed_and_names_another_warmup(tmp_path, monkeypatch):
    """A run is skipped only when the same config, lr, seed and eval rows are in the file; a warmup ratio
    other than the default joins the config's name, and 500 validation rows are taken when asked."""
    sweep = load_script("sweep_lr")
    seen = []

    def fake_run(name, lr, **kw):
        seen.append(kw)
        return {"optim_args": None, "optimizer": name, "lr": lr, "max_steps": kw["max_steps"], "eval_loss": 5.0,
                "sec_per_step": 0.1, "eval_curve": [], "optimizer_state_mb": 1.0, "ginger_stats": []}

    monkeypatch.setattr(sweep.proxy, "run", fake_run)
    out = tmp_path / "runs.jsonl"
    common = ["--configs", "adamw", "--lrs", "1e-3", "--max-steps", "3", "--output", str(out)]
    sweep.main(common)
    sweep.main(common)  # already there
    sweep.main(common + ["--seed", "1"])
    sweep.main(common + ["--eval-rows", "500", "--warmup-ratio", "0.1"])
    rows = sweep.read_rows([out])
    assert [(r["config"], r["seed"], r["eval_rows"]) for r in rows] == [
        ("adamw", 0, 128), ("adamw", 1, 128), ("adamw+warmup=0.1", 0, 500)]
    assert [kw["warmup_ratio"] for kw in seen] == [0.05, 0.05, 0.1] and len(seen[-1]["data"]["validation"]) == 500
    with pytest.raises(SystemExit):
        sweep.main(common + ["--warmup-ratio", "1.5"])
