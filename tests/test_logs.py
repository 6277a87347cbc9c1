"""Logging backends (``pdmd.runtime.logs.Loggers``, the ``log:`` config section): what TensorBoard and wandb hold is
what ``log.jsonl`` holds, at the same steps; pictures and videos come back at their size; a resume hides the
events past the checkpoint; a kill loses nothing written; config mistakes name the field and the fix."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pdmd.config import ConfigError, LogConfig, from_dict
from pdmd.core.trainer import PhasedDMDTrainer
from pdmd.demos.toy import ToyData
from pdmd.runtime.logs import Loggers
from pdmd.runtime.rundir import read_log
from trainer_helpers import tiny_cfg, tiny_teacher

ROOT = Path(__file__).resolve().parents[1]
TRAINER_KEYS = {"loss_fake", "grad_norm_fake", "loss_gen", "g_rms", "grad_norm_gen", "phase", "step_time",
                "compile_time", "samples_per_s", "nonfinite_skipped", "peak_memory_gib"}


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb without a network and without writing outside tmp_path."""
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": tmp_path / "wandb_dir",
                 "WANDB_CONFIG_DIR": tmp_path / "wandb_config", "WANDB_CACHE_DIR": tmp_path / "wandb_cache",
                 "WANDB_DATA_DIR": tmp_path / "wandb_data", "WANDB_DISABLE_GIT": "true"}.items():
        monkeypatch.setenv(k, str(v))


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})  # 0: keep every event
    acc.Reload()
    return acc


def _scalars(acc, tag: str) -> dict[int, float]:
    steps = [e.step for e in acc.Scalars(tag)]
    assert len(steps) == len(set(steps)), f"{tag}: a step logged twice: {steps}"
    return {e.step: e.value for e in acc.Scalars(tag)}


def _wandb_records(out: Path):
    """The records of the one offline wandb run in ``out`` (its ``run-<id>.wandb`` file: wandb's header, then
    LevelDB-log framing of 32 KiB blocks, each record a ``wandb_internal_pb2.Record``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = out.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (n == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        chunk += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST
            r = pb.Record()
            r.ParseFromString(chunk)
            chunk = b""
            yield r


def _wandb_history(out: Path) -> tuple[dict[int, dict], list]:
    """({step: {key: value}} of the logged rows, the run records)."""
    rows, runs = {}, []
    for r in _wandb_records(out):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            rows.setdefault(row.pop("_step"), {}).update(row)
        elif kind == "run":
            runs.append(r.run)
    return rows, runs


# ---------------------------------------------------------------------------------------------- the trainer
def test_toy_run_writes_the_jsonl_records_to_tensorboard_and_wandb(tmp_path, offline_wandb):
    cfg = tiny_cfg(max_steps=5, log_every=2)
    cfg = cfg.model_copy(update={"log": LogConfig(backends=["jsonl", "tensorboard", "wandb"])})
    out = tmp_path / "toyrun"
    tr = PhasedDMDTrainer(cfg, tiny_teacher(), ToyData(), out, progress=False)
    tr.train()
    recs = read_log(out / "log.jsonl")
    assert [r["step"] for r in recs] == [2, 4, 5]  # every log_every updates and the last
    assert set(recs[0]) == TRAINER_KEYS | {"step"}
    assert all(r["peak_memory_gib"] > 0 and r["samples_per_s"] > 0 for r in recs)

    acc = _events(out / "tensorboard")
    assert set(acc.Tags()["scalars"]) == TRAINER_KEYS
    for key in TRAINER_KEYS:  # a TensorBoard scalar is a float32
        assert _scalars(acc, key) == {r["step"]: float(np.float32(r[key])) for r in recs}, key

    rows, runs = _wandb_history(out)
    assert [r.display_name for r in runs] == ["toyrun"] and runs[0].project == "pdmd"
    assert sorted(rows) == [2, 4, 5]
    for r in recs:
        got = {k: v for k, v in rows[r["step"]].items() if not k.startswith("_")}
        assert got == {k: float(r[k]) for k in TRAINER_KEYS}, r["step"]

    # the logs outlive a train() call: a later write reopens them (no purge: the run's own events stay)
    tr.logs.image(5, "samples", np.zeros((6, 10, 3), np.uint8))
    tr.logs.close()
    tr.logs.close()  # twice is fine
    acc = _events(out / "tensorboard")
    assert _scalars(acc, "loss_fake").keys() == {2, 4, 5} and len(acc.Images("samples")) == 1


def test_resume_hides_the_events_past_the_checkpoint(tmp_path):
    """Steps 1-3 logged, checkpoint at 2, resumed: TensorBoard then shows 1, 2 and the resumed run's 3, 4, as
    log.jsonl does. Without the purge step 3 shows twice; with purge_step = the checkpoint's step, step 2 is lost."""
    cfg = tiny_cfg(max_steps=4, log_every=1, checkpoint_every=2)
    cfg = cfg.model_copy(update={"log": LogConfig(backends=["tensorboard"])})
    first = PhasedDMDTrainer(cfg, tiny_teacher(), ToyData(), tmp_path, progress=False)
    first.train(stop_at=3)  # saves at steps 2 and 3; resuming from step 2 is a crash after step 3
    before = _scalars(_events(tmp_path / "tensorboard"), "step_time")
    again = PhasedDMDTrainer(cfg, tiny_teacher(), ToyData(), tmp_path, progress=False)
    again.load(tmp_path / "checkpoint.step_000002.safetensors")
    assert again.step == 2
    again.train()
    recs = read_log(tmp_path / "log.jsonl")
    got = _scalars(_events(tmp_path / "tensorboard"), "step_time")
    assert [r["step"] for r in recs] == sorted(got) == [1, 2, 3, 4]
    assert got == {r["step"]: float(np.float32(r["step_time"])) for r in recs}
    assert got[2] == before[2]  # kept from the first run
    assert got[3] != before[3]  # the resumed run's (a wall time: never equal to the microsecond)


# ---------------------------------------------------------------------------------------------- Loggers itself
def test_images_and_videos_come_back_at_their_size(tmp_path, offline_wandb):
    rng = np.random.default_rng(0)
    pic = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    colours = rng.integers(0, 256, (5, 3), dtype=np.uint8)  # 5 colours: a GIF palette holds them exactly
    frames = np.broadcast_to(colours[:, None, None, :], (5, 8, 14, 3)).copy()
    frames[:, :4, :7] = colours[::-1, None, None, :]
    cfg = LogConfig(backends=["tensorboard", "wandb"])
    with Loggers(cfg, tmp_path, config={"seed": 0}) as logs:
        logs.scalars(1, {"val/energy": 0.25, "note": "text is skipped", "shape": [1, 2], "ok": True})
        logs.image(1, "val/samples", pic, path=tmp_path / "pics" / "s1.png")
        logs.video(1, "val/video", frames, fps=8, path=tmp_path / "pics" / "v1.gif")
        logs.video(2, "val/video", frames[:3], fps=8)
    assert read_log(tmp_path / "log.jsonl") == [
        {"step": 1, "val/energy": 0.25, "note": "text is skipped", "shape": [1, 2], "ok": True}]

    acc = _events(tmp_path / "tensorboard")
    assert acc.Tags()["scalars"] == ["val/energy"]
    (im,) = acc.Images("val/samples")
    assert (im.step, im.width, im.height) == (1, 20, 12)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(im.encoded_image_string))), pic)  # PNG: lossless
    assert np.array_equal(np.asarray(Image.open(tmp_path / "pics" / "s1.png")), pic)
    vids = acc.Images("val/video")
    assert [(v.step, v.width, v.height) for v in vids] == [(1, 14, 8), (2, 14, 8)]
    for v, n in zip(vids, (5, 3)):
        gif = Image.open(io.BytesIO(v.encoded_image_string))
        assert gif.format == "GIF" and gif.n_frames == n
        for i in range(n):
            gif.seek(i)
            assert np.array_equal(np.asarray(gif.convert("RGB")), frames[i])
    assert Image.open(tmp_path / "pics" / "v1.gif").n_frames == 5

    rows, runs = _wandb_history(tmp_path)
    assert runs[0].display_name == tmp_path.name
    assert rows[1]["val/energy"] == 0.25 and "note" not in rows[1] and "shape" not in rows[1] and "ok" not in rows[1]
    assert rows[1]["val/samples/_type"] == "image-file"
    assert (rows[1]["val/samples/width"], rows[1]["val/samples/height"]) == (20, 12)
    assert rows[1]["val/video/_type"] == rows[2]["val/video/_type"] == "video-file"
    run_dir = next(tmp_path.glob("wandb/offline-run-*"))
    for row in (rows[1], rows[2]):
        for key in ("val/samples/path", "val/video/path"):
            if key in row:
                assert (run_dir / "files" / row[key]).is_file()


def test_mp4_video_through_imageio(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    import imageio.v2 as imageio

    frames = np.zeros((4, 16, 16, 3), np.uint8)
    with Loggers(LogConfig(), tmp_path) as logs:
        logs.video(3, "v", frames, fps=4, path=tmp_path / "v.mp4")
    assert len(imageio.mimread(tmp_path / "v.mp4")) == 4


def test_bad_pictures_are_refused(tmp_path):
    logs = Loggers(LogConfig(), tmp_path)
    with pytest.raises(ValueError, match=r"image 'x' must be a HxWx3 uint8 array \(RGB\), got shape \(4, 4\) dtype"):
        logs.image(1, "x", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="got shape \\(4, 4, 3\\) dtype float32"):
        logs.image(1, "x", np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="video 'v' must be a TxHxWx3 uint8"):
        logs.video(1, "v", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="fps must be a positive integer"):
        logs.video(1, "v", np.zeros((2, 4, 4, 3), np.uint8), fps=0)
    with pytest.raises(ValueError, match="rec has step 2"):
        logs.scalars(1, {"step": 2, "a": 1.0})
    logs.close()


def test_other_ranks_write_nothing(tmp_path):
    class Rank1:
        is_main = False

    logs = Loggers(LogConfig(backends=["tensorboard", "wandb"]), tmp_path / "o", Rank1())
    logs.start(0)
    logs.scalars(1, {"a": 1.0})
    logs.image(1, "x", np.zeros((2, 2, 3), np.uint8), path=tmp_path / "o" / "x.png")
    logs.video(1, "v", np.zeros((2, 2, 2, 3), np.uint8))
    logs.close()
    assert not (tmp_path / "o").exists()


def test_a_killed_run_keeps_what_it_logged(tmp_path):
    """SIGTERM with its default action (no handler, no atexit): every call made before it is on disk."""
    script = textwrap.dedent(f"""
        import os, signal
        from pdmd.config import LogConfig
        from pdmd.runtime.logs import Loggers
        logs = Loggers(LogConfig(backends=["tensorboard"]), {str(tmp_path)!r})
        logs.start(0)
        for step in (1, 2, 3):
            logs.scalars(step, {{"loss": step / 4}})
        os.kill(os.getpid(), signal.SIGTERM)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert [r["loss"] for r in read_log(tmp_path / "log.jsonl")] == [0.25, 0.5, 0.75]
    assert _scalars(_events(tmp_path / "tensorboard"), "loss") == {1: 0.25, 2: 0.5, 3: 0.75}


# ---------------------------------------------------------------------------------------------- the config
def test_log_config_defaults_and_errors(monkeypatch):
    cfg = from_dict({})
    assert cfg.log.backends == ["jsonl"] and cfg.log.wandb_mode == "offline" and cfg.log.wandb_project == "pdmd"
    assert Loggers(cfg.log, "x").backends == ("jsonl",)
    assert Loggers(LogConfig(backends=["wandb"]), "x").backends == ("jsonl", "wandb")  # jsonl whether listed or not
    assert from_dict({"log": {"backends": []}}).log.backends == []
    with pytest.raises(ConfigError, match=r"log\.backends has unknown 'tensorbord': choose from jsonl, tensorboard, "
                                          r"wandb"):
        from_dict({"log": {"backends": ["jsonl", "tensorbord"]}})
    with pytest.raises(ConfigError, match=r"log\.wandb_mode must be one of offline, online, disabled, got 'local'"):
        from_dict({"log": {"wandb_mode": "local"}})
    with pytest.raises(ConfigError, match=r"log\.backends"):
        from_dict({"log": {"backends": "wandb"}})  # a list, not a string

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"log\.backends has wandb, but the wandb package is not installed here: "
                                          r"pip install wandb \(or pip install -e '\.\[log\]'\)"):
        from_dict({"log": {"backends": ["wandb"]}})
    from_dict({"log": {"backends": ["tensorboard"]}})  # the others are unaffected


def test_a_failing_wandb_init_says_what_to_do(tmp_path, monkeypatch, offline_wandb):
    import wandb

    def no_login(**kw):
        raise wandb.errors.UsageError("No API key configured")
    monkeypatch.setattr(wandb, "init", no_login)
    logs = Loggers(LogConfig(backends=["tensorboard", "wandb"], wandb_mode="online"), tmp_path)
    with pytest.raises(ValueError, match=r"wandb.init \(mode 'online'\) failed: No API key configured; set "
                                         r"log.wandb_mode: offline"):
        logs.start(0)
    logs.close()
