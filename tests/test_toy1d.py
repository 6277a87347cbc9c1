"""The Figure 2 toy, short: the correct subinterval objective tracks the full-interval model, the biased one drifts."""
import json

from pdmd.cli import main


def test_toy1d_cli(tmp_path):
    out = tmp_path / "toy"
    assert main(["toy1d", "--out", str(out), "--steps", "500", "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "figure2.png").stat().st_size > 10_000
    assert metrics["deviation_correct"] < 0.5 * metrics["deviation_incorrect"], metrics
    # the full-interval model itself follows the exact probability-flow ODE on (0.5, 1]
    assert metrics["deviation_full_vs_exact"] < metrics["deviation_incorrect"], metrics
