"""Throughput of one Phased DMD iteration (r fake updates + 1 generator update), fast vs plain.

fast:  the trainer's iteration: phase-k boundary samples of the frozen experts from a pool made in
       large batches; the r fake-update rollouts run as one batch and stop at the phase boundary.
plain: what the official trainer does: for every fake update a full rollout from noise through all
       N steps (no pool), then the generator update with its own full rollout.
Both do the same updates (tests/test_trainer.py checks equal weights); only the work differs.

Run: PYTHONPATH=.:kernels python -m pytest bench/bench_phased_iteration.py --benchmark-enable -q
"""
import pytest
import torch

from pdmd.config import RunConfig, updated
from pdmd.demos.toy import ToyData, ToyDenoiser
from pdmd.core.trainer import PhasedDMDTrainer



def _trainer(tmp_path, pool_size: int, phase: int) -> PhasedDMDTrainer:
    torch.manual_seed(0)
    cfg = RunConfig()  # the shipped defaults: 4 steps, 2 phases, batch 256, r = 5, width-128 teacher
    cfg = updated(cfg, {"distill.pool_size": pool_size})
    data = ToyData()
    teacher = ToyDenoiser(data.n_prompts, cfg.teacher.width, cfg.teacher.depth).requires_grad_(False)
    tr = PhasedDMDTrainer(cfg, teacher, data, tmp_path, progress=False)
    tr.start_phase(phase)
    return tr


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("phase", [0, 1], ids=["phase1", "phase2"])
@pytest.mark.parametrize("variant", ["fast", "plain"])
def test_phased_iteration(benchmark, tmp_path, variant, phase):
    benchmark.group = f"phased iteration, {'phase 1' if phase == 0 else 'phase 2'} of 2"
    plain = variant == "plain"
    tr = _trainer(tmp_path, RunConfig().distill.batch_size if plain else RunConfig().distill.pool_size, phase)
    tr.iteration(plain=plain)  # warm-up (fills the pool once, as training does)
    benchmark.pedantic(tr.iteration, kwargs={"plain": plain}, rounds=15, iterations=1, warmup_rounds=1)
