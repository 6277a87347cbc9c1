"""Build the native CPU backend: ``python -m pdmd_kernels.build [--force] [--strict] [--arch ARCH]``.

Runs CMake on the checkout's ``CMakeLists.txt`` against the installed torch (its own CMake package)
and puts ``_pdmd_native.so`` next to ``native.py``. It is a separate step rather than part of
``pip install`` because pip builds in an isolated environment without torch; ``scripts/bootstrap.sh``
runs it after the install. It is optional: without CMake or a C++ compiler, or on any build error,
it says so in one line and exits 0 (``--strict``: exits 1), and the PyTorch reference is used.
Up-to-date builds are skipped (sources, torch version and options unchanged). ``PDMD_NATIVE=0``
skips the build.

The instruction set is fixed (``--arch portable``, the default: x86-64-v2 on x86-64), so the library
computes the same bits on every x86-64 CPU; ``--arch native`` (or ``PDMD_NATIVE_ARCH=native``) opts
in to this CPU's whole instruction set, whose vector width changes the rounding of the loss sums.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def find_source(start: Path = PACKAGE_DIR) -> Path | None:
    """The checkout root holding CMakeLists.txt and kernels/csrc (None for an installed copy)."""
    for root in (start, *start.parents):
        if (root / "CMakeLists.txt").is_file() and (root / "kernels" / "csrc").is_dir():
            return root
    return None


ARCH_ENV = "PDMD_NATIVE_ARCH"


def default_arch() -> str:
    """``$PDMD_NATIVE_ARCH`` or "portable" (see CMakeLists.txt: portable, native or a -march value)."""
    return os.environ.get(ARCH_ENV) or "portable"


def _fingerprint(source: Path, arch: str) -> str:
    """Hash of everything the library depends on: sources, torch version, compiler choice, options."""
    h = hashlib.sha256()
    for f in [source / "CMakeLists.txt", *sorted((source / "kernels" / "csrc").glob("*"))]:
        h.update(f.name.encode() + f.read_bytes())
    h.update(importlib.metadata.version("torch").encode())
    h.update(f"{os.environ.get('CXX', '')}|arch={arch}".encode())
    return h.hexdigest()


def _libraries() -> list[Path]:
    return [p for p in PACKAGE_DIR.glob("_pdmd_native.*") if p.suffix in (".so", ".dylib", ".dll", ".pyd")]


def build(force: bool = False, arch: str | None = None, source: Path | None = None, quiet: bool = False) -> str | None:
    """Build if needed; returns None on success (or up to date), else the reason it was not built.

    ``arch``: "portable" (default, or ``$PDMD_NATIVE_ARCH``), "native", or a ``-march`` value.
    """
    if os.environ.get("PDMD_NATIVE", "1") == "0":
        return "skipped (PDMD_NATIVE=0)"
    arch = arch or default_arch()
    if not arch.replace("-", "").replace("_", "").replace(".", "").isalnum():
        return f"--arch / ${ARCH_ENV} must be portable, native or a -march value, got {arch!r}"
    source = source or find_source()
    if source is None:
        return f"no source checkout above {PACKAGE_DIR} (pass --source DIR)"
    cmake = shutil.which("cmake")
    if cmake is None:
        return "cmake not found"
    if not any(shutil.which(c) for c in filter(None, (os.environ.get("CXX"), "c++", "g++", "clang++"))):
        return "no C++ compiler found (c++, g++, clang++ or $CXX)"
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return "torch is not installed"
    build_dir = source / "build" / "native"
    stamp = build_dir / "pdmd_native.stamp"
    fingerprint = _fingerprint(source, arch)
    if not force and _libraries() and stamp.is_file() and stamp.read_text() == fingerprint:
        return None
    for lib in _libraries():  # never leave a library from other sources behind
        lib.unlink()
    stamp.unlink(missing_ok=True)
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "build.log"
    prefix = Path(spec.origin).parent / "share" / "cmake"
    steps = [
        [cmake, "-S", str(source), "-B", str(build_dir), f"-DCMAKE_PREFIX_PATH={prefix}",
         "-DCMAKE_BUILD_TYPE=Release", f"-DPDMD_NATIVE_OUTPUT_DIR={PACKAGE_DIR}",
         f"-DPDMD_NATIVE_ARCH={arch}"],
        [cmake, "--build", str(build_dir), "--parallel", str(os.cpu_count() or 1)],
    ]
    if not quiet:
        print("pdmd_kernels: building the native CPU backend (about a minute)...", flush=True)
    start = time.monotonic()
    with open(log, "w") as out:
        for cmd in steps:
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                for lib in _libraries():
                    lib.unlink()
                return f"the build failed (log: {log})"
    # Check that the library loads in a fresh interpreter (a broken one would only warn at import).
    check = subprocess.run(
        [sys.executable, "-c", "import pdmd_kernels.native as n, sys; sys.exit(0 if n.available() else n.unavailable_reason())"],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH"))))},
        capture_output=True, text=True)
    if check.returncode != 0:
        for lib in _libraries():
            lib.unlink()
        return f"the built library does not load: {(check.stderr or check.stdout).strip()[-500:]}"
    stamp.write_text(fingerprint)
    if not quiet:
        print(f"pdmd_kernels: native CPU backend built in {time.monotonic() - start:.0f} s: {_libraries()[0]}")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdmd_kernels.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the library could not be built")
    parser.add_argument("--arch", default=None,
                        help="portable (default: x86-64-v2 on x86-64, the same results on every x86-64 CPU), "
                             f"native (this CPU only, opt-in) or a -march value; default ${ARCH_ENV} or portable")
    parser.add_argument("--portable", dest="arch", action="store_const", const="portable",
                        help="same as --arch portable (the default; kept for old scripts)")
    parser.add_argument("--source", type=Path, help="checkout root with CMakeLists.txt (default: found above the package)")
    parser.add_argument("--quiet", action="store_true", help="print only a failure")
    args = parser.parse_args(argv)
    reason = build(args.force, args.arch, args.source, args.quiet)
    if reason is not None:
        print(f"pdmd_kernels: native CPU backend not built: {reason}; the PyTorch reference is used.",
              file=sys.stderr)
        return 1 if args.strict else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
