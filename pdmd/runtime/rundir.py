"""The run directory (``--out``): one run at a time, no debris, a log that survives crashes, rotated checkpoints.

Shared by every run kind (toy ``pdmd distill``/``compare``, digits, real models) so they behave alike:

- ``hold(out)``: an OS lock (``fcntl.flock`` on ``OUT/.lock``) for the run's lifetime. A second run into the
  same directory is refused with a ValueError naming the holder (pid, host, start time). The kernel drops the
  lock when its process dies, however it dies (``kill -9`` included), so a lock left by a killed run is never
  stale: the next run takes it over and says whose it was. Then temp files of a crashed save are removed.
- ``read_log``/``trim_log``/``log_line``: ``log.jsonl`` is strict JSON (non-finite numbers are written as
  null); a torn last line (a crash mid-write) is skipped by readers and dropped on resume, and records past
  the checkpoint's step are dropped so no step is logged twice.
- ``install``/``candidates``: the newest checkpoint keeps its plain name (``checkpoint.safetensors``, or
  ``checkpoint.dcp`` under torchrun); the one before it is renamed ``checkpoint.step_<step>.safetensors``
  (``.dcp``) and the ``distill.keep_checkpoints`` newest are kept. ``candidates`` lists them newest first,
  the order in which ``--resume`` tries them.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import math
import os
import re
import shutil
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

__all__ = ["hold", "clean_temps", "read_log", "trim_log", "log_line", "install", "candidates", "step_path", "warn",
           "step_dir", "step_dirs", "staging", "install_dir", "clean_step_temps", "rotate_steps"]

LOCK = ".lock"
_STEP = re.compile(r"^checkpoint\.step_(\d+)\.(safetensors|dcp)$")


def warn(msg: str) -> None:
    print(f"pdmd: warning: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- lock
@contextmanager
def hold(out: str | Path, par=None):
    """Create ``out``, lock it for this run (rank 0 under torchrun) and clean temp files; ValueError if another
    run holds it. Every rank learns whether rank 0 got the lock, so all fail together."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    main = par is None or par.is_main
    fd, err = None, None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        try:
            fd = _lock(out)
        except ValueError as e:
            err = e
    if par is not None and par.distributed and not par.all_finite(err is None):
        raise err or ValueError(f"--out {out} is in use by another pdmd run (rank 0 could not lock it)")
    if err is not None:
        raise err
    try:
        if main:
            clean_temps(out)
        if par is not None:
            par.barrier()  # no rank writes before rank 0 has removed the debris
        yield out
    finally:
        if fd is not None:
            os.ftruncate(fd, 0)  # an empty lock file: released cleanly (a killed run leaves its pid behind)
            os.close(fd)  # closing drops the flock; the file stays (unlinking it would race a new run)


def _lock(out: Path) -> int:
    path = out / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise ValueError(f"--out {out} is in use by another pdmd run ({holder}; lock {path}): wait for it to end "
                         "or choose another --out") from None
    except OSError as e:
        os.close(fd)
        raise ValueError(f"--out {out}: cannot lock {path} ({e.strerror})") from None
    previous = _holder(fd)
    if previous != "unknown holder":  # unlocked but not emptied: that run died without releasing it
        warn(f"{out} was last used by a run that did not end cleanly ({previous}); its lock was released when it "
             "died, taking over")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "started": datetime.datetime.now().isoformat(timespec="seconds"),
                              "argv": sys.argv}).encode(), 0)
    return fd


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 65536, 0) or b"null")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, TypeError, KeyError):
        return "unknown holder"


def clean_temps(out: Path) -> list[Path]:
    """Remove what a crash can leave in ``out``: ``*.tmp`` files and half-written ``*.tmp`` DCP directories.
    Only called with the lock held: the temps of a live run are never touched."""
    gone = []
    for p in sorted(out.glob("*.tmp")):
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        gone.append(p)
    if gone:
        warn(f"removed what an interrupted run left in {out}: {', '.join(p.name for p in gone)}")
    return gone


# ---------------------------------------------------------------------- log.jsonl
def log_line(rec: dict) -> str:
    """One strict-JSON line: non-finite floats become null (JSON has no NaN or Infinity)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def read_log(path: str | Path) -> list[dict]:
    """The records of ``log.jsonl``; lines that do not parse (a torn last line) are skipped."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def trim_log(path: str | Path, step: int) -> None:
    """Keep the records with ``step`` <= ``step`` (those the checkpoint covers), drop torn lines; atomic."""
    path = Path(path)
    if not path.exists():
        return
    text = path.read_text(errors="replace")
    keep = "".join(log_line(r) for r in read_log(path) if isinstance(r.get("step"), int) and r["step"] <= step)
    if keep != text:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(keep)
        os.replace(tmp, path)


# ---------------------------------------------------------------------- checkpoint rotation
def step_path(latest: Path, step: int) -> Path:
    """``checkpoint.step_000200.safetensors`` (or ``.dcp``) beside ``latest``."""
    return latest.with_name(f"checkpoint.step_{step:06d}{latest.suffix}")


def _rotated(latest: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in latest.parent.glob(f"checkpoint.step_*{latest.suffix}")
             if (m := _STEP.match(p.name))]
    return sorted(found, reverse=True)


def candidates(latest: str | Path) -> list[Path]:
    """Checkpoints to resume from, newest first: ``latest``, its ``.old`` (a DCP swap cut short), the rotated ones."""
    latest = Path(latest)
    old = latest.with_name(latest.name + ".old")
    return [p for p in (latest, old) if p.exists()] + [p for _, p in _rotated(latest)]


def _remove(p: Path) -> None:
    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def install(tmp: Path, latest: Path, keep: int, previous_step: int | None, new_step: int) -> None:
    """Make the finished ``tmp`` the newest checkpoint ``latest``, keeping the ``keep`` newest.

    The one it replaces (at ``previous_step``) is renamed to its step name first; between the two renames a
    crash leaves it under that name, where ``candidates`` finds it. A file replaces a file atomically; a DCP
    directory cannot be renamed over one, so with ``keep`` = 1 it is moved to ``.old`` for the swap."""
    if latest.exists():
        if keep > 1 and previous_step is not None and previous_step != new_step:
            dest = step_path(latest, previous_step)
            if dest.exists():
                _remove(dest)
            os.replace(latest, dest)
        elif latest.is_dir():
            old = latest.with_name(latest.name + ".old")
            if old.exists():
                _remove(old)
            os.replace(latest, old)
    os.replace(tmp, latest)
    old = latest.with_name(latest.name + ".old")
    if old.exists():
        _remove(old)
    for _, p in _rotated(latest)[max(keep - 1, 0):]:
        _remove(p)


# ---------------------------------------------------------------------- step folders (samples, periodic exports)
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(parent: str | Path, step: int) -> Path:
    """``parent/step_000200``: the folder of what a run wrote at one step (validation samples, an export)."""
    return Path(parent) / f"step_{step:06d}"


def step_dirs(parent: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of the ``step_N`` folders in ``parent``, oldest first."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in parent.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name)))


def staging(dest: Path) -> Path:
    """An empty ``dest.tmp`` to write ``dest``'s files into before ``install_dir``."""
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        _remove(tmp)
    tmp.mkdir(parents=True)
    return tmp


def install_dir(tmp: Path, dest: Path) -> None:
    """Make the finished folder ``tmp`` the folder ``dest``, replacing one there: a reader finds the old one or the
    new one, whole (a folder cannot be renamed over another, so the old one goes to ``dest.old`` first)."""
    old = dest.with_name(dest.name + ".old")
    if old.exists():
        _remove(old)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old.exists():
        _remove(old)


def clean_step_temps(parent: str | Path) -> None:
    """Remove the ``step_N.tmp`` folders an interrupted write left in ``parent``; restore a ``step_N.old`` whose
    replacement never arrived (a crash between the two renames of ``install_dir``)."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for p in sorted(parent.glob("step_*.tmp")):
        _remove(p)
    for p in sorted(parent.glob("step_*.old")):
        dest = p.with_name(p.name[:-len(".old")])
        _remove(p) if dest.exists() else os.replace(p, dest)


def rotate_steps(parent: str | Path, keep: int, upto: int) -> list[Path]:
    """Keep the ``keep`` newest ``step_N`` folders with N <= ``upto`` and remove the older ones; folders past
    ``upto`` (written before a resume to an earlier checkpoint) are left to be replaced when the run gets there."""
    mine = [p for s, p in step_dirs(parent) if s <= upto]
    gone = mine[:max(len(mine) - keep, 0)]
    for p in gone:
        _remove(p)
    return gone
