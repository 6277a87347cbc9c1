"""pdmd_kernels stands alone: `pip install ./kernels` packages it by itself, and importing it (and running
an op) pulls in no pdmd, peft, diffusers, transformers or matplotlib module."""
import subprocess
import sys
import tomllib
from pathlib import Path

KERNELS = Path(__file__).resolve().parent.parent / "kernels"

PROBE = """
import sys, torch, pdmd_kernels as K
x = torch.randn(2, 3, requires_grad=True)
K.dmd_loss(x, real_cond=torch.randn(2, 3), fake=torch.randn(2, 3), form="normalized").sum().backward()
bad = sorted(m for m in sys.modules if m.split(".")[0] in {"pdmd", "peft", "diffusers", "transformers", "matplotlib"})
print("BAD", bad)
"""


def test_import_pulls_in_no_pdmd_or_heavy_dependency():
    proc = subprocess.run([sys.executable, "-c", PROBE], env={"PYTHONPATH": str(KERNELS), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "BAD []" in proc.stdout, proc.stdout


def test_kernels_pyproject_packages_every_subpackage_and_needs_only_torch():
    meta = tomllib.loads((KERNELS / "pyproject.toml").read_text())
    assert meta["project"]["dependencies"] == ["torch>=2.4"]
    found = sorted(".".join(p.relative_to(KERNELS).parts[:-1]) for p in KERNELS.glob("pdmd_kernels/**/__init__.py"))
    assert sorted(meta["tool"]["setuptools"]["packages"]) == found
