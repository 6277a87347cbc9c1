"""One Phased DMD iteration of the digits demo (configs/digits.yaml): the Wan-class teacher through the adapter,
r = 5 fake updates + 1 generator update at batch 32, in phase 1 and phase 2 of 2; one torch thread.

Run: PYTHONPATH=.:kernels python -m pytest bench/bench_digits.py --benchmark-enable -q
"""
import pytest
import torch

from pdmd.config import load_config
from pdmd.demos.digits import DigitsTask, build_teacher
from pdmd.core.trainer import PhasedDMDTrainer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("phase", [0, 1], ids=["phase1", "phase2"])
def test_digits_iteration(benchmark, tmp_path, phase):
    benchmark.group = "digits Phased DMD iteration (Wan teacher, batch 32, r = 5)"
    cfg = load_config("configs/digits.yaml")
    torch.manual_seed(0)
    teacher, embed = build_teacher(cfg.teacher)  # untrained weights time the same as trained ones
    tr = PhasedDMDTrainer(cfg, teacher.requires_grad_(False), DigitsTask(embed), tmp_path, progress=False)
    tr.start_phase(phase)
    tr.iteration()  # warm-up (fills the boundary pool once, as training does)
    benchmark.pedantic(tr.iteration, rounds=10, iterations=1, warmup_rounds=1)
