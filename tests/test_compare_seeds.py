"""pdmd compare with several distillation seeds: layout, the teacher kept, mean ± std, resume, --seeds."""
import argparse
import json
import math

import pytest
import torch

from pdmd.demos import distill as distill_mod
from pdmd.commands import seeds_of as _seeds
from pdmd.demos.distill import compare
from pdmd.demos.evaluate import expected_precision
from tests.trainer_helpers import tiny_cfg

METHODS = ("dmd", "phased_sgts")


@pytest.fixture()
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_compare_runs_each_method_per_seed_and_reports_mean_and_std(tmp_path, one_thread, monkeypatch):
    cfg = tiny_cfg(max_steps=2)
    table = compare(cfg, tmp_path, progress=False, methods=METHODS, seeds=[0, 3])
    for s in (0, 3):
        for m in METHODS:
            report = json.loads((tmp_path / f"seed_{s}" / m / "report.json").read_text())
            # the distillation seed varies, the teacher stays the config's (seed 0)
            assert report["config"]["seed"] == s and report["config"]["teacher"]["seed"] == 0
    assert table["seeds"] == [0, 3] and table["teacher_seed"] == 0
    per = table["per_seed"]
    # the same teacher for both seeds: its 8-seed diversity uses fixed noise, so it is identical
    assert per["0"]["Teacher (4 steps, CFG 1.5)"]["diversity"] == per["3"]["Teacher (4 steps, CFG 1.5)"]["diversity"]
    assert per["0"]["DMD"] != per["3"]["DMD"]  # a different distillation
    for label, row in table["rows"].items():
        for key, stat in row.items():
            a, b = per["0"][label][key], per["3"][label][key]
            assert stat["mean"] == pytest.approx((a + b) / 2) and stat["std"] == pytest.approx(abs(a - b) / math.sqrt(2))
            assert stat["values"] == [a, b]
        if label != "Exact data":
            assert 0 <= row["precision"]["mean"] <= 1
    assert table["rows"]["Exact data"]["precision"]["mean"] == pytest.approx(expected_precision())
    md = (tmp_path / "table.md").read_text()
    assert "precision (3 std)" in md and "| DMD | " in md and " ± " in md and "## Seed 3" in md
    assert (tmp_path / "panel.png").exists()

    # the same command again reuses every finished run instead of distilling it anew
    monkeypatch.setattr(distill_mod, "distill", lambda *a, **k: pytest.fail("a finished run was distilled again"))
    assert compare(cfg, tmp_path, progress=False, methods=METHODS, seeds=[0, 3])["rows"] == table["rows"]


def test_seeds_argument():
    cfg = tiny_cfg()
    cfg.seed = 5
    ns = lambda v: argparse.Namespace(seeds=v)
    assert _seeds(ns(None), cfg) == [5]
    assert _seeds(ns([3]), cfg) == [5, 6, 7]  # one number: that many seeds from the config's
    assert _seeds(ns([0, 2, 9]), cfg) == [0, 2, 9]
    with pytest.raises(ValueError, match="--seeds"):
        _seeds(ns([0]), cfg)
    with pytest.raises(ValueError, match="--seeds"):
        _seeds(ns([1, 1]), cfg)
