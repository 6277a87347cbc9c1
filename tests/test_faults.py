"""Nothing lost: the lock on --out, rotated and checksummed checkpoints with fallback, the order of checks,
log.jsonl, max_steps on resume, SIGTERM/SIGINT, the non-finite limits and file permissions."""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import pdmd.core.trainer as trainer_mod
from pdmd.runtime import parallel
from pdmd.runtime.checkpoint import CheckpointError, load_tensors
from pdmd.cli import main
from pdmd.runtime.rundir import hold, log_line, read_log
from pdmd.demos.toy import ToyData
from pdmd.core.trainer import Interrupted, NonFiniteError, PhasedDMDTrainer, resume_point
from trainer_helpers import config_file, tiny_cfg, tiny_teacher

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(str(ROOT / p) for p in (".", "kernels", "tests")), OMP_NUM_THREADS="1")


def make(out, **distill_kw) -> PhasedDMDTrainer:
    return PhasedDMDTrainer(tiny_cfg(**distill_kw), tiny_teacher(), ToyData(), out, progress=False)


def weights(tr) -> dict:
    out = {n: p.detach().clone() for a in tr.experts.adapters for n, p in tr.experts.adapter_params(a).items()}
    out.update({f"fake.{n}": v.clone() for n, v in tr.fake_module.state_dict().items()})
    return out


def snapshot(out: Path) -> dict:
    """Every file under ``out`` -> (sha256, mtime_ns): byte-identical and not rewritten."""
    return {str(p.relative_to(out)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lock"}


def strict(line: str) -> dict:
    def no_constant(name):
        raise AssertionError(f"non-JSON literal {name} in the log")
    return json.loads(line, parse_constant=no_constant)


TINY = {"teacher": {"width": 16, "depth": 2, "steps": 20, "batch_size": 64, "sample_steps": 4},
        "generator": {"lora_rank": 2},
        "distill": {"max_steps": 4, "batch_size": 8, "fake_updates_per_generator_update": 2, "pool_size": 16,
                    "checkpoint_every": 2, "log_every": 1, "plot_every": 1000},
        "eval": {"samples_per_prompt": 40, "diversity_groups": 2}}


@pytest.fixture()
def config(tmp_path):
    yield from config_file(tmp_path, TINY)


# pdmd/runtime/rundir.py loaded on its own: a subprocess that needs no torch starts in a fraction of a second
RUNDIR = ("import importlib.util as u, sys, time\n"
          f"spec = u.spec_from_file_location('rundir', {str(ROOT / 'pdmd' / 'runtime' / 'rundir.py')!r})\n"
          "rundir = u.module_from_spec(spec); spec.loader.exec_module(rundir); hold = rundir.hold\n")


def _holder(out: Path) -> subprocess.Popen:
    """Another process holding the lock on ``out`` until killed; returns once it holds it."""
    code = (RUNDIR +
            "with hold(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


# ---------------------------------------------------------------- 1. the lock on --out
def test_a_second_run_into_a_locked_out_is_refused_and_changes_nothing(tmp_path, config, capsys, monkeypatch):
    out = tmp_path / "run"
    proc = _holder(out)
    try:
        (out / "log.jsonl").write_text('{"step": 1}\n')  # the first run's files
        before = snapshot(out)
        monkeypatch.setattr(sys, "argv", ["pdmd", "distill", "--config", str(config), "--out", str(out), "--quiet"])
        from pdmd.cli import entry
        assert entry() == 2
        err = capsys.readouterr().err
        assert err.startswith("pdmd: error: --out") and f"pid {proc.pid} on {socket.gethostname()}" in err
        assert len(err.strip().splitlines()) == 1
        with pytest.raises(ValueError, match="in use by another pdmd run"):  # compare locks too
            main(["compare", "--config", str(config), "--out", str(out), "--quiet"])
        assert snapshot(out) == before
    finally:
        proc.kill()
        proc.wait()


def test_in_process_second_hold_is_refused():
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        with hold(d):
            with pytest.raises(ValueError, match=f"pid {os.getpid()}"):
                with hold(d):
                    pass
        with hold(d):  # released at the end of the first
            pass


def test_runs_started_at_the_same_moment_exactly_one_gets_the_lock(tmp_path):
    # the winner keeps the lock until both others were refused (or 120 s): a slow start cannot find it free
    code = (RUNDIR + "import os, pathlib\nd = pathlib.Path(sys.argv[1])\n"
            "time.sleep(max(0, float(sys.argv[2]) - time.time()))\n"
            "try:\n    with hold(d):\n        print('ok', flush=True); end = time.time() + 120\n"
            "        while len(list(d.glob('refused.*'))) < 2 and time.time() < end: time.sleep(0.05)\n"
            "except ValueError as e:\n    print('refused', flush=True); (d / f'refused.{os.getpid()}').touch()\n")
    at = time.time() + 1.0
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "x"), str(at)], env=ENV,
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    results = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert results == ["ok", "refused", "refused"]


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, capsys):
    proc = _holder(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == proc.pid  # the dead run's record is still there
    with hold(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert "did not end cleanly" in err and f"pid {proc.pid}" in err
    assert (tmp_path / ".lock").read_text() == ""  # a clean release empties it: no warning next time
    with hold(tmp_path):
        pass
    assert "did not end cleanly" not in capsys.readouterr().err


# ---------------------------------------------------------------- 2. checkpoints
def test_keeps_the_last_k_checkpoints(tmp_path):
    for keep in (1, 2, 3):
        out = tmp_path / str(keep)
        make(out, max_steps=5, checkpoint_every=1, keep_checkpoints=keep).train()
        rotated = sorted(p.name for p in out.glob("checkpoint.step_*"))
        assert rotated == [f"checkpoint.step_{s:06d}.safetensors" for s in range(6 - keep, 5)], keep
        assert load_tensors(out / "checkpoint.safetensors")[1]["step"] == "5"
        for name in rotated:
            assert load_tensors(out / name)[1]["step"] == str(int(name[16:22]))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, damage):
    make(tmp_path, max_steps=4, checkpoint_every=1).train(stop_at=3)
    latest, previous = tmp_path / "checkpoint.safetensors", tmp_path / "checkpoint.step_000002.safetensors"
    data = bytearray(latest.read_bytes())
    if damage == "truncate":  # a torn write
        latest.write_bytes(bytes(data[: len(data) // 2]))
    else:  # one flipped bit in the last tensor's data: safetensors alone loads it without complaint
        data[-3] ^= 0x10
        latest.write_bytes(bytes(data))
        load_file(str(latest))
        with pytest.raises(CheckpointError, match="fails its CRC-32 check"):
            load_tensors(latest)
    tr = make(tmp_path, max_steps=4, checkpoint_every=1)
    assert tr.load() == previous and tr.step == 2
    err = capsys.readouterr().err
    assert f"warning: {latest}" in err and f"resuming from {previous} instead" in err
    assert resume_point(tr.cfg, tmp_path, resume=True) == previous
    assert str(previous) in capsys.readouterr().err
    tr.train()  # and it goes on: the damaged file is replaced by the next save
    assert tr.step == 4 and load_tensors(latest)[1]["step"] == "4"


def test_nothing_usable_is_a_clear_error(tmp_path):
    make(tmp_path, max_steps=2).train()
    (tmp_path / "checkpoint.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        make(tmp_path, max_steps=2).load()


def test_temp_files_of_a_crash_are_removed_at_the_next_start(tmp_path, capsys):
    (tmp_path / "checkpoint.safetensors.tmp").write_bytes(b"half")
    (tmp_path / "checkpoint.dcp.tmp").mkdir()
    (tmp_path / "checkpoint.dcp.tmp" / "__0_0.distcp").write_bytes(b"half")
    (tmp_path / "keep.txt").write_text("mine")
    with hold(tmp_path):
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "keep.txt"]
    assert "checkpoint.safetensors.tmp" in capsys.readouterr().err


@contextmanager
def _one_rank():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield parallel.Parallel(init_device_mesh("cpu", (1,)))
    finally:
        dist.destroy_process_group()


def test_sharded_checkpoints_load_only_with_a_matching_pdmd_manifest(tmp_path, capsys):
    """DCP unpickles .metadata: a directory is loaded only when pdmd's manifest is there and every file matches."""
    with _one_rank() as par:
        cfg = tiny_cfg(max_steps=3, checkpoint_every=1)
        t = PhasedDMDTrainer(cfg, tiny_teacher(), ToyData(), tmp_path, progress=False, parallel=par)
        t.train()
        latest = tmp_path / parallel.DCP_DIR
        assert sorted(p.name for p in tmp_path.glob("checkpoint*")) == ["checkpoint.dcp", "checkpoint.step_000002.dcp"]
        manifest = json.loads((latest / parallel.MANIFEST).read_text())
        assert manifest["step"] == 3 and ".metadata" in manifest["files"] and "meta.pt" in manifest["files"]
        fresh = lambda: PhasedDMDTrainer(cfg, tiny_teacher(), ToyData(), tmp_path, progress=False, parallel=par)
        meta = latest / ".metadata"
        meta.write_bytes(meta.read_bytes() + b"\0")  # altered: refused before it is unpickled, previous one used
        u = fresh()
        assert u.load() == tmp_path / "checkpoint.step_000002.dcp" and u.step == 2
        assert ".metadata fails its SHA-256 check" in capsys.readouterr().err
        (latest / parallel.MANIFEST).unlink()  # a DCP directory pdmd did not write
        with pytest.raises(CheckpointError, match="not a checkpoint written by pdmd"):
            fresh().load(latest)


# ---------------------------------------------------------------- 3. order of checks
@pytest.mark.parametrize("change", [("teacher", "steps", 21), ("distill", "batch_size", 16), ("distill", "max_steps", 6)])
def test_a_refused_resume_leaves_every_file_byte_identical(tmp_path, config, change):
    out = tmp_path / "run"
    assert main(["distill", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    before = snapshot(out)
    sec, key, v = change
    bad = json.loads(json.dumps(TINY))
    bad[sec][key] = v
    config.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match=f"{sec}.{key}"):
        main(["distill", "--config", str(config), "--out", str(out), "--quiet", "--resume"])
    assert snapshot(out) == before
    with pytest.raises(ValueError, match="exists: pass --resume"):  # a fresh run into it: refused as early
        main(["distill", "--config", str(config), "--out", str(out), "--quiet"])
    assert snapshot(out) == before


# ---------------------------------------------------------------- 4. log.jsonl
def test_log_torn_line_and_records_past_the_checkpoint_are_dropped_on_resume(tmp_path):
    make(tmp_path, max_steps=6).train(stop_at=3)
    log = tmp_path / "log.jsonl"
    with log.open("a") as f:  # a crash after step 4 was logged but before it was saved, mid-write of step 5
        f.write(log_line({"step": 4, "loss_fake": 1.0}) + '{"step": 5, "loss_fa')
    assert [r["step"] for r in read_log(log)] == [1, 2, 3, 4]  # readers skip the torn line
    tr = make(tmp_path, max_steps=6)
    tr.load()
    tr.train()
    lines = log.read_text().splitlines()
    assert [strict(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6]


def test_log_is_strict_json_with_non_finite_values(tmp_path, monkeypatch):
    assert log_line({"a": float("nan"), "b": float("inf"), "c": 1.5, "d": 2}) == '{"a": null, "b": null, "c": 1.5, "d": 2}\n'
    real = trainer_mod.obj.dmd_loss
    monkeypatch.setattr(trainer_mod.obj, "dmd_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    tr = make(tmp_path, max_steps=2, max_nonfinite_share=1.0)
    tr.train()
    recs = [strict(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["grad_norm_gen"] for r in recs] == [None, None] and recs[-1]["nonfinite_skipped"] == 2
    from pdmd.demos.distill import _plot_losses
    _plot_losses(tmp_path / "losses.png", tmp_path / "log.jsonl")  # the plot reader takes nulls
    assert (tmp_path / "losses.png").exists()


# ---------------------------------------------------------------- 5. max_steps on resume
def test_a_new_max_steps_is_refused_when_it_moves_steps_taken_to_another_phase(tmp_path):
    make(tmp_path, max_steps=8).train(stop_at=5)  # phases [4, 4]: steps 1-4 phase 1, step 5 phase 2
    tr = make(tmp_path, max_steps=10)  # [5, 5]: step 5 would be phase 1
    with pytest.raises(ValueError, match=r"from \[4, 4\] to \[5, 5\].*update 5 was trained in phase 2, it would "
                                         r"belong to phase 1"):
        tr.load()


def test_a_new_max_steps_is_allowed_when_the_steps_taken_keep_their_phases(tmp_path, capsys):
    make(tmp_path, max_steps=8).train(stop_at=3)  # all in phase 1 ([4, 4]); with 10: [5, 5], still phase 1
    cfg = tiny_cfg(max_steps=10)
    assert resume_point(cfg, tmp_path, resume=True) == tmp_path / "checkpoint.safetensors"
    assert "updates per phase [4, 4] -> [5, 5]; the 3 updates already taken keep their phases" in capsys.readouterr().err
    tr = make(tmp_path, max_steps=10)
    tr.load()
    tr.train()
    assert tr.step == 10 and tr.phase_lengths == [5, 5]


# ---------------------------------------------------------------- 6. SIGTERM / SIGINT
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_at_the_end_of_the_iteration_and_resumes_bit_identically(tmp_path, monkeypatch, signum):
    straight = make(tmp_path / "s", max_steps=6)
    straight.train()
    tr = make(tmp_path / "r", max_steps=6)
    real = PhasedDMDTrainer.iteration

    def signalled(self, *a, **k):
        rec = real(self, *a, **k)
        if self.step == 3:  # arrives during step 3: that step is finished, saved, then training stops
            os.kill(os.getpid(), signum)
        return rec
    monkeypatch.setattr(PhasedDMDTrainer, "iteration", signalled)
    handler = signal.getsignal(signum)
    with pytest.raises(Interrupted, match=f"{signum.name} after step 3") as e:
        tr.train()
    assert e.value.signum == signum and tr.step == 3
    assert signal.getsignal(signum) == handler  # the run's handlers are gone with it
    monkeypatch.setattr(PhasedDMDTrainer, "iteration", real)
    resumed = make(tmp_path / "r", max_steps=6)
    resumed.load()
    assert resumed.step == 3
    resumed.train()
    a, b = weights(straight), weights(resumed)
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_sigterm_from_outside_exits_143_with_a_checkpoint(tmp_path, config):
    run = {**TINY, "distill": {**TINY["distill"], "max_steps": 100000, "checkpoint_every": 100000}}
    config.write_text(yaml.safe_dump(run))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pdmd.cli", "distill", "--config", str(config), "--out", str(out),
                             "--quiet"], env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM after step" in err and "--resume" in err
    step = int(load_tensors(out / "checkpoint.safetensors")[1]["step"])
    assert [strict(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == list(range(1, step + 1))
    assert (out / ".lock").read_text() == ""  # released cleanly


# ---------------------------------------------------------------- 7. non-finite guard
def test_non_finite_stop_message_claims_only_what_was_checked(tmp_path):
    tr = make(tmp_path, max_steps=6, max_nonfinite=3, checkpoint_every=1)
    tr.train(stop_at=2)
    with torch.no_grad():
        tr.fake_module.net[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError) as e:
        tr.train()
    msg = str(e.value)
    assert "stopped without saving" in msg and "step 2), was checked to hold only finite values" in msg
    assert str(tmp_path / "checkpoint.safetensors") in msg
    fresh = make(tmp_path / "fresh", max_steps=6, max_nonfinite=1)
    fresh.start_phase(0)
    with pytest.raises(NonFiniteError, match="no checkpoint was written in this run"):
        fresh._apply(fresh.opt_fake, fresh.fake_params, False, "fake-score")


@pytest.mark.parametrize("share, fails", [(0.05, True), (0.2, False)])
def test_a_run_that_skipped_too_many_updates_ends_with_an_error(tmp_path, monkeypatch, share, fails):
    real = trainer_mod.obj.subinterval_loss
    calls = {"n": 0}

    def once_nan(*a, **k):
        calls["n"] += 1
        return real(*a, **k) * (float("nan") if calls["n"] == 1 else 1.0)
    monkeypatch.setattr(trainer_mod.obj, "subinterval_loss", once_nan)
    tr = make(tmp_path, max_steps=3, max_nonfinite_share=share)  # 1 of 9 updates skipped: 11 %
    if fails:
        with pytest.raises(NonFiniteError, match=r"1 of 9 updates \(11.1%\) .*max_nonfinite_share \(0.05\)"):
            tr.train()
    else:
        tr.train()
    assert load_tensors(tmp_path / "checkpoint.safetensors")[1]["step"] == "3"  # saved either way


# ---------------------------------------------------------------- 8. file permissions
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        make(tmp_path, max_steps=2, checkpoint_every=1).train()
        tr = make(tmp_path / "x", max_steps=1)
        tr.export_experts(tmp_path / "experts.safetensors")
    finally:
        os.umask(old)
    for name in ("checkpoint.safetensors", "checkpoint.step_000001.safetensors", "log.jsonl", "experts.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
