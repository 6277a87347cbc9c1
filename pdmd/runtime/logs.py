"""Where a run's records go: ``OUT/log.jsonl`` always (the source of truth), and TensorBoard and/or wandb if chosen.

``Loggers(cfg, out, par)`` takes the config's ``log:`` section (``backends``, ``tensorboard_dir``, ``wandb_project``,
``wandb_mode``, ``wandb_run_name``; any object with those attributes) and does the work on rank 0; on the other
ranks every call is a no-op. The interface, for the trainer and for whoever logs samples:

- ``scalars(step, rec)``: one record. The whole record (strings too) is a line of ``log.jsonl``; its numbers (not
  bools, strings or lists; ``step`` is the x axis) go to TensorBoard (``add_scalar``, the key is the tag) and wandb.
- ``image(step, tag, array, path=None)``: an HxWx3 uint8 picture; ``path`` also saves it there (PNG, JPEG, ...).
- ``video(step, tag, frames, fps=16, path=None)``: TxHxWx3 uint8 frames; ``path`` also saves them there (``.gif``
  through Pillow, ``.mp4``/``.webm`` through imageio with imageio-ffmpeg). TensorBoard gets an animated GIF, the
  same record ``SummaryWriter.add_video`` writes, encoded here with Pillow (``add_video`` needs moviepy and fails
  with moviepy 2); wandb gets a ``wandb.Video`` of an encoded file (its numpy path needs moviepy).
- ``start(step)``: the (re)start of a run at ``step``: rank 0 trims ``log.jsonl`` to the records with step <= ``step``
  (those a resumed checkpoint covers) and opens the backends now, so that a bad backend fails before training.
  TensorBoard's writer gets ``purge_step = step + 1``: events of an earlier run in the same folder at the steps this
  one writes again are hidden, exactly the records ``log.jsonl`` dropped.
- ``close()``: flush and close everything; safe to call twice. A later call opens the backends again (TensorBoard:
  a new event file in the same folder; wandb: a new run of the same name).

Nothing written is lost on a crash: each ``log.jsonl`` line and each TensorBoard call is flushed to disk as it is
made (TensorBoard's writer otherwise queues events for up to two minutes), and ``close`` also runs at interpreter
exit (``weakref.finalize``). wandb writes through its own service process. TensorBoard and wandb are imported only
when chosen.
"""
from __future__ import annotations

import importlib.util
import numbers
import resource
import sys
import weakref
from pathlib import Path

from pdmd.runtime.rundir import log_line, trim_log

__all__ = ["Loggers", "BACKENDS", "WANDB_MODES", "missing_package", "peak_memory_gib", "LOG"]

BACKENDS = ("jsonl", "tensorboard", "wandb")
WANDB_MODES = ("offline", "online", "disabled")
LOG = "log.jsonl"
# backend -> (module that must import, what to install)
_PACKAGES = {"tensorboard": ("tensorboard", "pip install tensorboard (or pip install -e '.[log]')"),
             "wandb": ("wandb", "pip install wandb (or pip install -e '.[log]')")}


def missing_package(backend: str) -> str | None:
    """What to install for ``backend`` if its package is absent here, else None (looked up, not imported)."""
    if backend not in _PACKAGES:
        return None
    module, how = _PACKAGES[backend]
    return how if importlib.util.find_spec(module) is None else None


def peak_memory_gib(device) -> float:
    """The run's peak memory so far, GiB: on CUDA the caching allocator's peak on ``device``
    (``torch.cuda.max_memory_allocated``, a host-side counter: no device sync); elsewhere the process's peak
    resident set (``getrusage`` ``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


def _number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _uint8(x, ndim: int, what: str, shape: str):
    import numpy as np

    a = np.asarray(x)
    if a.ndim != ndim or a.shape[-1] != 3 or a.dtype != np.uint8 or 0 in a.shape:
        raise ValueError(f"{what} must be a {shape}x3 uint8 array (RGB), got shape {tuple(a.shape)} dtype {a.dtype}")
    return np.ascontiguousarray(a)


def _gif(frames, fps: int) -> bytes:
    """TxHxWx3 uint8 frames as an animated GIF (Pillow; GIF times are in 10 ms units)."""
    import io

    from PIL import Image

    pics = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    pics[0].save(buf, format="GIF", save_all=True, append_images=pics[1:], duration=max(1000 // fps, 10), loop=0)
    return buf.getvalue()


def _save_video(frames, fps: int, path: Path) -> None:
    if path.suffix.lower() == ".gif":
        path.write_bytes(_gif(frames, fps))
        return
    try:
        import imageio.v2 as imageio
    except ImportError:
        raise ValueError(f"saving {path}: {path.suffix} videos need imageio and imageio-ffmpeg (pip install imageio "
                         "imageio-ffmpeg), or give a .gif path") from None
    imageio.mimwrite(path, list(frames), fps=fps)


class _Open:
    """The open backends of one ``Loggers`` (a separate object so that the exit hook does not keep ``Loggers``
    alive)."""

    def __init__(self, cfg, out: Path, config: dict | None, purge_step: int | None):
        backends = set(cfg.backends)
        self.jsonl = (out / LOG).open("a")
        self.tb = self.wandb = None
        try:
            if "tensorboard" in backends:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(cfg.tensorboard_dir or out / "tensorboard"), purge_step=purge_step)
            if "wandb" in backends:
                self.wandb = _wandb_run(cfg, out, config)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close each backend once (the attribute is cleared first: a failing close is not retried)."""
        jsonl, tb, run = getattr(self, "jsonl", None), getattr(self, "tb", None), getattr(self, "wandb", None)
        self.jsonl = self.tb = self.wandb = None
        try:
            if jsonl is not None:
                jsonl.close()
            if tb is not None:
                tb.close()
        finally:
            if run is not None:
                run.finish()


def _wandb_run(cfg, out: Path, config: dict | None):
    import wandb

    try:
        return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or out.resolve().name, dir=str(out),
                          mode=cfg.wandb_mode, config=config, reinit="create_new")
    except Exception as e:  # online without a network or a login, most often: a user error (one line from the CLI)
        raise ValueError(f"log.backends has wandb, and wandb.init (mode {cfg.wandb_mode!r}) failed: {e}; set "
                           "log.wandb_mode: offline (then `wandb sync OUT/wandb/offline-run-*`), or log in with "
                           "`wandb login`") from e


class Loggers:
    """``log.jsonl`` plus the chosen backends of ``cfg`` (the ``log:`` config section), rank 0 only; see the module
    docstring. ``config``: the run's config as a dict, stored with a wandb run."""

    def __init__(self, cfg, out: str | Path, par=None, config: dict | None = None):
        bad = [b for b in cfg.backends if b not in BACKENDS]
        if bad:
            raise ValueError(f"log.backends: unknown {bad}; choose from {list(BACKENDS)}")
        self.cfg, self.out, self.config = cfg, Path(out), config
        self.active = par is None or par.is_main
        self._open: _Open | None = None
        self._exit = None
        self._opened_once = False
        self._start: int | None = None

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends written: jsonl always, then the chosen ones."""
        return ("jsonl", *[b for b in BACKENDS[1:] if b in self.cfg.backends])

    def _backends(self, step: int) -> _Open:
        if self._open is None:
            self.out.mkdir(parents=True, exist_ok=True)
            # only the first opening purges: a reopening after close() continues this run's own records
            purge = None if self._opened_once else (step if self._start is None else self._start + 1)
            self._open = _Open(self.cfg, self.out, self.config, purge)
            self._opened_once = True
            self._exit = weakref.finalize(self, self._open.close)  # runs once: at close() or at interpreter exit
        return self._open

    def start(self, step: int) -> None:
        """The run (re)starts at ``step``: trim ``log.jsonl`` to what the checkpoint covers, open the backends."""
        if not self.active:
            return
        if self._open is None:
            trim_log(self.out / LOG, step)
            self._start = step
        self._backends(step)

    def scalars(self, step: int, rec: dict) -> None:
        """``rec`` as a ``log.jsonl`` line (with ``step``); its numbers to TensorBoard and wandb."""
        if not self.active:
            return
        if rec.get("step", step) != step:
            raise ValueError(f"scalars(step={step}, rec): rec has step {rec['step']}")
        b = self._backends(step)
        b.jsonl.write(log_line(rec if "step" in rec else {"step": step, **rec}))
        b.jsonl.flush()
        nums = {k: float(v) for k, v in rec.items() if k != "step" and _number(v)}
        if b.tb is not None:
            for k, v in nums.items():
                b.tb.add_scalar(k, v, step)
            b.tb.flush()
        if b.wandb is not None and nums:
            b.wandb.log(nums, step=step)

    def image(self, step: int, tag: str, array, path=None) -> None:
        """An HxWx3 uint8 picture under ``tag``; ``path``: also saved to that file."""
        if not self.active:
            return
        a = _uint8(array, 3, f"image {tag!r}", "HxW")
        if path is not None:
            from PIL import Image

            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(path)
        b = self._backends(step)
        if b.tb is not None:
            b.tb.add_image(tag, a, step, dataformats="HWC")
            b.tb.flush()
        if b.wandb is not None:
            import wandb

            b.wandb.log({tag: wandb.Image(a)}, step=step)

    def video(self, step: int, tag: str, frames, fps: int = 16, path=None) -> None:
        """TxHxWx3 uint8 frames under ``tag`` at ``fps``; ``path``: also saved to that file (.gif, .mp4, ...)."""
        if not self.active:
            return
        f = _uint8(frames, 4, f"video {tag!r}", "TxHxW")
        if not (isinstance(fps, numbers.Integral) and fps >= 1):
            raise ValueError(f"video {tag!r}: fps must be a positive integer, got {fps!r}")
        if path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            _save_video(f, fps, path)
        b = self._backends(step)
        wandb_file = path is not None and path.suffix.lower() in (".gif", ".mp4", ".webm", ".ogg")  # wandb's formats
        gif = _gif(f, fps) if b.tb is not None or (b.wandb is not None and not wandb_file) else None
        if b.tb is not None:
            from tensorboard.compat.proto.summary_pb2 import Summary

            _, h, w, c = f.shape  # what SummaryWriter.add_video writes: an animated GIF as an image summary
            pic = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=gif)
            b.tb.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=pic)]), step)
            b.tb.flush()
        if b.wandb is not None:
            import tempfile

            import wandb

            with tempfile.TemporaryDirectory() as tmp:  # wandb copies the file into its run folder at log time
                if not wandb_file:
                    path = Path(tmp) / "video.gif"
                    path.write_bytes(gif)
                b.wandb.log({tag: wandb.Video(str(path))}, step=step)

    def close(self) -> None:
        """Flush and close every backend; a second call does nothing."""
        if self._exit is not None:
            self._exit()
        self._open = self._exit = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

