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


def test_toy1d_runs_one_thread_by_default_and_restores_the_count(tmp_path, monkeypatch):
    """Tiny tensors: one torch thread unless --threads says otherwise (two threads ran ~50x slower on a
    busy machine); the caller's thread count comes back afterwards, also after an error."""
    import pytest
    import torch

    from pdmd.demos import toy1d

    seen = []
    monkeypatch.setattr(toy1d, "_run", lambda *a, **k: seen.append(torch.get_num_threads()) or {})
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        toy1d.run(tmp_path)
        toy1d.run(tmp_path, threads=3)
        assert seen == [1, 3] and torch.get_num_threads() == 2
        monkeypatch.setattr(toy1d, "_run", lambda *a, **k: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            toy1d.run(tmp_path)
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="threads"):
            toy1d.run(tmp_path, threads=0)
    finally:
        torch.set_num_threads(before)
    calls = []
    monkeypatch.setattr(toy1d, "run", lambda out, **kw: calls.append(kw) or {
        "deviation_correct": 0, "deviation_incorrect": 0, "seconds": 0})
    assert main(["toy1d", "--out", str(tmp_path), "--quiet"]) == 0
    assert main(["toy1d", "--out", str(tmp_path), "--quiet", "--threads", "2"]) == 0
    assert [c["threads"] for c in calls] == [1, 2]
    with pytest.raises(SystemExit) as e:
        main(["toy1d", "--out", str(tmp_path), "--threads", "0"])
    assert e.value.code == 2
