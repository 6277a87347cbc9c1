"""FSDP2 data parallelism on CPU: 2 gloo processes (torchrun) against one plain process.

Tolerance: float32, atol 1e-6 on every expert LoRA weight and fake-score weight after 4 phased
iterations (2 phases, so a phase start with a fake re-initialised from the sharded teacher is crossed),
and for a few variants of the config.
Each rank draws the same global batch and keeps half of it, so the only difference from one process is
the order of float32 reductions (the per-rank loss means averaged by the reduce-scatter instead of one
mean over B, the gradient norm summed shard-wise): 1e-8 to 2e-7 was measured. AdamW with beta1 = 0
divides by sqrt(v), which keeps relative gradient errors relative, and the weights move by 1e-4 or more
in these steps (asserted), so 1e-6 is 100x above the observed error and 100x below the signal.
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from pdmd.runtime import parallel
from pdmd.demos.toy import ToyData
from pdmd.core.trainer import PhasedDMDTrainer
from parallel_worker import CFG, VARIANTS, weights
from trainer_helpers import tiny_cfg, tiny_teacher

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-6


def torchrun(args: list[str], timeout: float = 1200) -> str:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` (gloo on CPU, one thread each); fails the test on a
    non-zero exit or a timeout; returns the output.

    Sized for a loaded machine: the worker takes about a minute on 2 quiet cores, and 5x that at load 5;
    a collective waits up to PDMD_DIST_TIMEOUT_S = 600 s (a rank that is slow, not dead), below the
    launch's own timeout so that a hung rank fails with gloo's message rather than a kill."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(ROOT / p) for p in (".", "kernels", "tests")),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **{parallel.TIMEOUT_ENV: "600"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    # --standalone picks a free port; a new session lets a timeout kill torchrun and both workers.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"2-process run timed out:\n{log[-3000:]}")
    assert proc.returncode == 0, log[-3000:]
    return log


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One torchrun launch (2 processes, gloo): a straight run and a stopped + resumed run."""
    out = tmp_path_factory.mktemp("fsdp")
    torchrun([str(ROOT / "tests" / "parallel_worker.py"), str(out), "3"])
    return out


def _single(out: Path, **kw):
    t = PhasedDMDTrainer(tiny_cfg(**CFG, **kw), tiny_teacher(), ToyData(), out, progress=False)
    t.train()
    w = {f"experts.{k}": v for k, v in t.experts.module.state_dict().items() if "lora_" in k}
    if t.fake_module is not None:
        w.update({f"fake.{k}": v for k, v in t.fake_module.state_dict().items()})
    return w


def _init():
    """The weights before training: adapters as injected (same seed), fake = teacher (phase 2's start)."""
    t = PhasedDMDTrainer(tiny_cfg(**CFG), tiny_teacher(), ToyData(), "unused", progress=False)
    w = {f"experts.{k}": v.clone() for k, v in t.experts.module.state_dict().items() if "lora_" in k}
    w.update({f"fake.{k}": v.clone() for k, v in tiny_teacher().state_dict().items()})
    return w


def test_two_ranks_match_one_process(two_ranks, tmp_path):
    ref, init = _single(tmp_path / "single"), _init()
    got = torch.load(two_ranks / "straight.pt")
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=ATOL, msg=k)
    # the comparison is not vacuous: both experts' LoRA B and the fake score moved well beyond ATOL
    for key in ("lora_B.expert_1", "lora_B.expert_2"):
        moved = max((ref[k] - init[k]).abs().max().item() for k in ref if key in k)
        assert moved > 100 * ATOL, (key, moved)
    moved = max((ref[k] - init[k]).abs().max().item() for k in ref if k.startswith("fake.") and "weight" in k)
    assert moved > 100 * ATOL


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_two_ranks_match_one_process_variants(two_ranks, tmp_path, variant):
    """LoRA fake score, DMD's gradient through every step, gradient accumulation: same updates as one process."""
    ref = _single(tmp_path / "single", **VARIANTS[variant])
    got = torch.load(two_ranks / "variants.pt")[variant]
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=ATOL, msg=k)


def test_sharded_checkpoint_resume_equals_straight_run(two_ranks):
    straight, resumed = torch.load(two_ranks / "straight.pt"), torch.load(two_ranks / "resumed.pt")
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=0, msg=k)
    ckpt = two_ranks / "resumed" / parallel.DCP_DIR
    assert (ckpt / "meta.pt").exists() and not ckpt.with_name(ckpt.name + ".tmp").exists()
    assert len((two_ranks / "resumed" / "log.jsonl").read_text().splitlines()) == 3
    assert len((two_ranks / "continued" / "log.jsonl").read_text().splitlines()) == CFG["max_steps"] - 3


def test_sharded_checkpoint_keeps_per_rank_8bit_optimizer_state(two_ranks):
    """AdamW8bitV keeps plain per-rank codes/scales for each local shard: saved under per-rank keys
    (not deduplicated as replicas), so a 2-rank resume is bit-identical to the straight run."""
    w = torch.load(two_ranks / "eight_bit.pt")
    for k in w["straight"]:
        torch.testing.assert_close(w["resumed"][k], w["straight"][k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(w["stopped"][k], w["straight"][k]) for k in w["straight"])  # steps 4 matter


def test_two_rank_checkpoint_resumes_on_one_rank(two_ranks, tmp_path):
    """DCP reshards: the 2-rank checkpoint at step 3 (mid phase 2: optimiser states, pool position)
    continued on a 1-rank mesh ends where the straight 2-rank run does (reduction order only)."""
    straight = torch.load(two_ranks / "straight.pt")
    with _one_rank("gloo", "cpu") as mesh:
        t = PhasedDMDTrainer(tiny_cfg(**CFG), tiny_teacher(), ToyData(), tmp_path / "one", progress=False,
                             parallel=parallel.Parallel(mesh))
        t.load(two_ranks / "resumed" / parallel.DCP_DIR)
        assert t.step == 3 and t.phase == 1
        t.train()
        got = weights(t)
        u = PhasedDMDTrainer(tiny_cfg(**CFG), tiny_teacher(), ToyData(), tmp_path / "two", progress=False,
                             parallel=parallel.Parallel(mesh))
        with pytest.raises(ValueError, match="per-rank optimiser state of 2 processes"):
            u.load(two_ranks / "8bit_stopped" / parallel.DCP_DIR)  # 8-bit state is per rank: same world only
    for k in straight:
        torch.testing.assert_close(got[k], straight[k], rtol=0, atol=ATOL, msg=k)


def test_rank_slices_and_divisibility():
    class FakeMesh:
        device_type = "cpu"

        def size(self):
            return 2

        def get_local_rank(self):
            return 1

    par = parallel.Parallel(FakeMesh())
    x = torch.arange(8)
    assert par.shard(x).tolist() == [4, 5, 6, 7]
    assert par.shard({"a": x})["a"].tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="batch_size"):
        par.local(7)
    one = parallel.Parallel()
    assert one.shard(x) is x and one.local(7) == 7 and one.all_finite(False) is False


def test_blocks_are_the_repeated_layers():
    t = tiny_teacher()
    blocks = parallel._blocks(t)
    assert blocks and all(isinstance(b, torch.nn.Linear) for b in blocks)
    assert len(blocks) == sum(isinstance(m, torch.nn.Linear) for m in t.modules())


@contextmanager
def _one_rank(backend: str, device_type: str):
    """An in-process world of one rank: FSDP2 still shards (DTensors), every collective is trivial."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    # a file store in a fresh directory: no port to collide with a concurrent run (a port found free
    # and then bound by the store can be taken by another process in between)
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group(backend, init_method=f"file://{d}/store", rank=0, world_size=1)
        try:
            yield init_device_mesh(device_type, (1,))
        finally:
            dist.destroy_process_group()


def test_one_rank_mesh_shards_and_equals_plain(tmp_path):
    from torch.distributed.tensor import DTensor

    with _one_rank("gloo", "cpu") as mesh:
        par = parallel.Parallel(mesh)
        assert not par.mixed_precision  # CPU/gloo stays float32
        t = PhasedDMDTrainer(tiny_cfg(**CFG), tiny_teacher(), ToyData(), tmp_path / "one", progress=False, parallel=par)
        assert all(isinstance(p, DTensor) for p in t.experts.module.parameters())
        assert all(isinstance(p, DTensor) for p in t.fake_module.parameters())
        t.train()
        got = weights(t)
        # a crash between the two renames of a save leaves only checkpoint.dcp.old: loading falls back to it
        ckpt = tmp_path / "one" / parallel.DCP_DIR
        ckpt.rename(ckpt.with_name(ckpt.name + ".old"))
        u = PhasedDMDTrainer(tiny_cfg(**CFG), tiny_teacher(), ToyData(), tmp_path / "one", progress=False, parallel=par)
        u.load()
        assert u.step == CFG["max_steps"] and u.phase == 1
        for k, v in weights(u).items():
            assert torch.equal(v, got[k]), k
        u.save()  # the next save replaces it
        assert ckpt.exists() and not ckpt.with_name(ckpt.name + ".old").exists()
    ref = _single(tmp_path / "single")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=ATOL, msg=k)


_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=_CUDA)])
def test_bf16_mixed_precision_trains_close_to_float32(tmp_path, device):
    """bf16 compute / fp32 reduction (the default on CUDA, forced on CPU): float32 sharded weights stay
    finite and every fake-score loss is within 2e-2 of the float32 run (1e-4 measured on CPU)."""
    cfg = tiny_cfg(**CFG).model_copy(update={"device": device})
    with _one_rank("nccl" if device == "cuda" else "gloo", device) as mesh:
        par = parallel.Parallel(mesh, mixed_precision=True if device == "cpu" else None)
        assert par.mixed_precision
        t = PhasedDMDTrainer(cfg, tiny_teacher(), ToyData(), tmp_path / "mp", progress=False, parallel=par)
        t.train()
        params = list(t.experts.module.parameters()) + list(t.fake_module.parameters())
        assert all(p.dtype == torch.float32 and p.device.type == device for p in params)
        assert all(bool(torch.isfinite(p.to_local()).all()) for p in params)
        assert (tmp_path / "mp" / parallel.DCP_DIR / "meta.pt").exists()
    _single(tmp_path / "single")
    mp, ref = ([json.loads(x) for x in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("mp", "single"))
    assert len(mp) == CFG["max_steps"] and mp[-1]["nonfinite_skipped"] == 0
    for a, b in zip(mp, ref):
        assert a["loss_fake"] == pytest.approx(b["loss_fake"], rel=2e-2)
    assert mp[0]["loss_fake"] != ref[0]["loss_fake"]  # the policy is applied: bf16 compute is not float32


def test_blocks_of_the_diffusers_transformers_are_their_blocks():
    from tiny_models import tiny_qwen, tiny_wan

    assert {type(b).__name__ for b in parallel._blocks(tiny_wan())} == {"WanTransformerBlock"}
    assert {type(b).__name__ for b in parallel._blocks(tiny_qwen())} == {"QwenImageTransformerBlock"}


def test_sharded_wan_with_experts_equals_unsharded():
    """LoRA injected, then FSDP2 per Wan block + root (one-rank mesh): the expert, the teacher (adapters
    disabled) and the expert's LoRA gradients equal those of the unsharded module."""
    from torch.distributed.tensor import DTensor

    from pdmd.core.experts import Experts
    from pdmd.models.wan import WanDenoiser
    from tiny_models import tiny_wan

    def build():
        d = WanDenoiser(tiny_wan(), 5.0)
        # Experts calls lora_targets(); WanDenoiser lists suffixes as a tuple: give the module names
        d.lora_targets = lambda: [n for n, m in d.named_modules()
                                  if isinstance(m, torch.nn.Linear) and n.endswith(WanDenoiser.lora_targets)]
        e = Experts(d, 2, 4, 4.0, seed=3)
        with torch.no_grad():  # B = 0 at init: make the adapter do something
            for p in e.adapter_params("expert_1").values():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        e.train_only(["expert_1"])
        return e

    x, cond, t = torch.randn(2, 4, 2, 8, 8), torch.randn(2, 6, 16), torch.tensor([0.5, 0.25])

    def run(e):
        out = e.run("expert_1", x, t, cond)
        out.square().mean().backward()
        with torch.no_grad():
            teacher = e.run_teacher(x, t, cond)
        grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
                 for n, p in e.adapter_params("expert_1").items()}
        return out.detach(), teacher, grads

    ref = run(build())
    with _one_rank("gloo", "cpu") as mesh:
        e = build()
        parallel.Parallel(mesh).shard_module(e.module)
        assert isinstance(next(iter(e.adapter_params("expert_1").values())), DTensor)
        got = run(e)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ref[0], ref[1])  # the adapter changes the output
    assert got[2].keys() == ref[2].keys() and any(bool(g.abs().max() > 0) for g in ref[2].values())
    for k in ref[2]:
        torch.testing.assert_close(got[2][k], ref[2][k], rtol=1e-5, atol=1e-7, msg=k)


def test_shutdown_closes_the_process_group_and_timeout_is_checked(monkeypatch):
    """``parallel.shutdown`` (barrier, then destroy) leaves no process group; without one it does nothing.
    The collective timeout comes from PDMD_DIST_TIMEOUT_S, checked with a message naming it."""
    import torch.distributed as dist

    parallel.shutdown()  # no process group: a no-op
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/store", rank=0, world_size=1)
        parallel.shutdown()
        assert not dist.is_initialized()
    monkeypatch.setenv(parallel.TIMEOUT_ENV, "90")
    assert parallel.timeout_s() == 90.0
    for bad in ("soon", "0", "-5", "nan"):
        monkeypatch.setenv(parallel.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=parallel.TIMEOUT_ENV):
            parallel.timeout_s()
