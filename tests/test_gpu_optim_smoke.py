"""bench/gpu_optim.py runs end to end (--cpu-smoke) and writes its JSON."""
import importlib.util
import json
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
