"""One phased iteration of the toy (default config, phase 1) eager vs ``distill.compile`` (regional / whole-module).

The first (warm-up) iteration compiles; its compile time (``pdmd.runtime.compile.StepClock``) goes to extra_info,
the benchmark times the steady state.

Run: PYTHONPATH=.:kernels python -m pytest bench/bench_compile.py -o python_files='bench_*.py' --benchmark-enable -q
"""

import pytest
import torch

from pdmd.runtime.compile import StepClock
from pdmd.config import RunConfig, updated
from pdmd.demos.toy import ToyData, ToyDenoiser
from pdmd.core.trainer import PhasedDMDTrainer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_toy_iteration_compiled(benchmark, tmp_path, backend):
    benchmark.group = "toy phased iteration, phase 1"
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = RunConfig()
    extra = {} if backend == "eager" else {"compile": True, "compile_backend": backend}
    cfg = updated(cfg, {f"distill.{k}": v for k, v in extra.items()})
    data = ToyData()
    teacher = ToyDenoiser(data.n_prompts, cfg.teacher.width, cfg.teacher.depth).requires_grad_(False)
    tr = PhasedDMDTrainer(cfg, teacher, data, tmp_path, progress=False)
    tr.start_phase(0)
    with StepClock() as clock:
        tr.iteration()
    benchmark.extra_info.update(first_iteration_compile_s=clock.compile, first_iteration_rest_s=clock.step)
    benchmark.pedantic(tr.iteration, rounds=10, iterations=1, warmup_rounds=1)
