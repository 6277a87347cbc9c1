"""The GPU scripts in bench/ run end to end on CPU (--cpu-smoke) and write their JSON."""
import importlib.util
import json

import pytest
from pathlib import Path


def test_gpu_optim_cpu_smoke(tmp_path):
    path = Path(__file__).resolve().parent.parent / "bench" / "gpu_optim.py"
    spec = importlib.util.spec_from_file_location("gpu_optim", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--cpu-smoke", "--params", "2e5", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "gpu_optim.json").read_text())
    assert res["params"] >= 2e5 and len(res["runs"]) == 3
    ours = res["runs"]["adamw8bit-v torch (bf16 p, bf16 g, SR)"]
    assert ours["state_bytes_per_param"] <= 1.05 and ours["ms_per_step"] > 0


def test_gpu_plan_check_cpu_smoke(tmp_path):
    pytest.importorskip("diffusers")
    path = Path(__file__).resolve().parent.parent / "bench" / "gpu_plan_check.py"
    spec = importlib.util.spec_from_file_location("gpu_plan_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--cpu-smoke", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "gpu_plan_check.json").read_text())
    assert len(res["cases"]) == 2
    for case in res["cases"]:
        for row in case["components"].values():
            assert row["predicted_MiB"] == pytest.approx(row["measured_MiB"], rel=1e-9)
