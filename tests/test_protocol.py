"""scripts/protocol.py: the t-interval, steps to target, and the table built from run files."""

import json
import math

import pytest
from helpers import load_script


@pytest.fixture(scope="module")
def protocol():
    return load_script("protocol")


@pytest.mark.parametrize("df, value", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423), (1000, 1.9623)])
def test_t_quantile_matches_the_tables(protocol, df, value):
    """Two-sided 95% critical values of Student's t, as printed in every statistics table."""
    assert protocol.t_quantile(0.975, df) == pytest.approx(value, abs=1e-4)
    assert protocol.t_quantile(0.025, df) == pytest.approx(-value, abs=1e-4)


def test_t_cdf_has_the_closed_forms(protocol):
    # df 1 is the Cauchy distribution; df 2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    for t in (-3.0, -0.5, 0.0, 0.7, 4.0):
        assert protocol.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert protocol.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_t_interval_by_hand(protocol):
    """Differences -0.10, -0.20, -0.15, -0.05, -0.10: mean -0.12, sum of squared deviations 0.013, so the
    standard deviation is sqrt(0.013 / 4) = 0.0570088, the standard error 0.0254951, and the half-width
    2.776445 * 0.0254951 = 0.0707858."""
    mean, lo, hi = protocol.t_interval([-0.10, -0.20, -0.15, -0.05, -0.10])
    assert mean == pytest.approx(-0.12, abs=1e-12)
    assert (lo, hi) == (pytest.approx(-0.12 - 0.0707858, abs=1e-6), pytest.approx(-0.12 + 0.0707858, abs=1e-6))
    with pytest.raises(ValueError, match="at least 2"):
        protocol.t_interval([1.0])


def test_first_reach_interpolates_between_evaluations(protocol):
    curve = [{"step": 0, "train_seconds": 0.0, "eval_loss": 8.0}, {"step": 10, "train_seconds": 5.0, "eval_loss": 6.0},
             {"step": 20, "train_seconds": 9.0, "eval_loss": 5.0}]
    assert protocol.first_reach(curve, 5.5) == (15.0, 7.0)
    assert protocol.first_reach(curve, 6.0) == (10.0, 5.0)
    assert protocol.first_reach(curve, 9.0) == (0.0, 0.0)
    assert protocol.first_reach(curve, 4.9) is None


def _row(config, lr, seed, loss, split, curve=None, seconds=10.0):
    curve = curve or [{"step": 0, "train_seconds": 0.0, "eval_loss": 8.0},
                      {"step": 100, "train_seconds": seconds, "eval_loss": loss}]
    return dict(task="scratch", model="proxy", config=config, lr=lr, seed=seed, eval_loss=loss, eval_split=split,
                eval_curve=curve, sec_per_step=seconds / 100, optimizer_state_mb=1.5)


def test_table_chooses_on_validation_and_pairs_on_test(protocol, tmp_path, capsys):
    val = [_row("ginger", 1e-3, 0, 5.5, "validation"), _row("ginger", 3e-3, 0, 5.4, "validation"),
           _row("ginger", 1e-2, 0, 5.6, "validation"), _row("adamw", 1e-3, 0, 5.9, "validation"),
           _row("adamw", 3e-3, 0, 5.8, "validation"), _row("adamw", 1e-2, 0, 5.7, "validation")]
    ginger = [5.50, 5.40, 5.45, 5.35, 5.50]
    adamw = [5.60, 5.60, 5.60, 5.40, 5.60]  # differences -0.10, -0.20, -0.15, -0.05, -0.10 (the hand example)
    test = [_row("ginger", 3e-3, s, x, "test", seconds=20.0) for s, x in enumerate(ginger)]
    test += [_row("adamw", 1e-2, s, x, "test") for s, x in enumerate(adamw)]
    test += [_row("ginger", 1e-3, 0, 5.0, "test")]  # not the chosen lr: left out
    for name, rows in (("val", val), ("test", test)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    protocol.main(["--choose", str(tmp_path / "val.jsonl"), "--report", str(tmp_path / "test.jsonl")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| scratch, proxy, test rows | lr | seeds | eval loss | minus ginger [95% CI]")
    cells = {line.split(" | ")[0][2:]: line.strip("| ").split(" | ") for line in lines[2:]}
    assert cells["ginger"][1:4] == ["0.003", "5", "5.440"]
    assert cells["adamw"][1:4] == ["0.01 (edge)", "5", "5.560"]
    assert cells["adamw"][4] == "+0.120 [+0.049, +0.191]"  # adamw - ginger: the hand example, sign flipped
    # Ginger reaches each seed's AdamW loss on its straight line from 8.0 (at 0 s) to its own final loss
    steps = [100 * (8.0 - a) / (8.0 - g) for g, a in zip(ginger, adamw)]
    assert cells["ginger"][5] == f"{sum(steps) / 5:.0f} (5/5)"
    assert cells["ginger"][6] == f"{sum(s * 0.2 for s in steps) / 5:.0f}"
    assert cells["adamw"][5] == "100 (5/5)"
    # at equal time (AdamW's 10 s, Ginger halfway along its line) AdamW leads Ginger by its curve's shape
    halfway = [8.0 + 0.5 * (g - 8.0) for g in ginger]
    mean = sum(a - h for a, h in zip(adamw, halfway)) / 5
    assert cells["adamw"][7].startswith(f"{mean:+.3f} [")
    assert cells["ginger"][8:] == ["0.200", "1.5"]


def test_table_refuses_test_rows_for_choosing(protocol):
    with pytest.raises(ValueError, match="--choose takes runs on validation rows"):
        protocol.table([_row("ginger", 1e-3, 0, 5.5, "test")], [_row("ginger", 1e-3, 0, 5.5, "test")], "ginger", "adamw")
    val = [_row("ginger", 1e-3, 0, 5.5, "validation"), _row("adamw", 1e-3, 0, 5.6, "validation")]
    with pytest.raises(ValueError, match="--report takes runs on test rows"):
        protocol.table(val, val, "ginger", "adamw")
    lines = protocol.table(val, val, "ginger", "adamw", report_split="validation").splitlines()  # --same-rows
    assert lines[0].startswith("| scratch, proxy, validation rows |") and "+0.100 (1 seed)" in lines[3]


def test_sweep_runs_each_config_at_the_lr_the_protocol_chose(tmp_path):
    sweep = load_script("sweep_lr")
    val = [_row("ginger", 1e-3, 0, 5.5, "validation"), _row("ginger", 3e-3, 0, 5.4, "validation"),
           _row("ginger", 3e-3, 1, 5.7, "validation"), _row("adamw", 3e-3, 0, 5.8, "validation"),
           _row("adamw", 1e-2, 0, 5.7, "validation")]
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in val))
    # ginger: 3e-3 has the mean 5.55 over its two seeds, above 1e-3's 5.5
    assert sweep.lrs_of(f"chosen:{path}", "scratch", "proxy", ["ginger", "adamw"]) == {"ginger": [1e-3], "adamw": [1e-2]}
    with pytest.raises(ValueError, match="no validation runs of \\['muon'\\]"):
        sweep.lrs_of(f"chosen:{path}", "scratch", "proxy", ["muon"])
    assert sweep.lrs_of("1e-3,3e-3", "scratch", "proxy", ["muon"]) == {"muon": [1e-3, 3e-3]}
