"""Every user error of every ``pdmd`` command: exit code 2 and exactly one ``pdmd: error:`` line naming the file and
the field, no traceback (``pdmd.cli.entry`` in process). Bugs keep their traceback; Ctrl-C exits 130."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import yaml

import pdmd.demos.distill
from pdmd.cli import entry
from pdmd.config import ConfigError, load_config, load_yaml
from pdmd.pipeline.real import load_real_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()  # a loaded config sets torch's thread count
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def no_run(monkeypatch):
    """A config that should be refused but is not fails at once instead of training a default teacher."""
    def accepted(*a, **k):
        raise AssertionError("the bad input was accepted")
    monkeypatch.setattr(pdmd.demos.distill, "distill", accepted)


def user_error(capsys, argv, *named) -> str:
    """Run ``pdmd argv``; check the one-line error contract and that each of ``named`` is in the line."""
    try:
        code = entry([str(a) for a in argv])
    except SystemExit as e:  # argparse exits by itself
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("pdmd: error:")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
    for name in named:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def write(tmp_path, text: str | bytes, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def distill(tmp_path, cfg) -> list:
    return ["distill", "--config", cfg, "--out", tmp_path / "run", "--quiet"]


# ------------------------------------------------------------------ reading the file
def test_yaml_syntax_error_gives_file_and_line(tmp_path, capsys, no_run):
    p = write(tmp_path, "seed: 0\ndistill:\n  batch_size: 4\n  betas: [0.0, 0.9\nteacher: {}\n")
    line = user_error(capsys, distill(tmp_path, p), "invalid YAML")
    assert re.search(re.escape(str(p)) + r":[45]: ", line), line  # the scanner stops at the next key
    assert not (tmp_path / "run").exists()  # nothing done


def test_duplicate_keys_are_refused_with_key_and_line(tmp_path, capsys, no_run):
    p = write(tmp_path, "distill:\n  lr_generator: 1e-4\n  batch_size: 8\n  lr_generator: 3e-4\n")
    user_error(capsys, distill(tmp_path, p), f"{p}:4:", "distill.lr_generator is given twice", "line 2")
    # the same key in two different mappings is no duplicate; a merge key may be overridden on purpose
    ok = write(tmp_path, "teacher: {lr: 1e-3}\ndistill: {lr_fake: 1e-3}\n", "ok.yaml")
    assert load_config(ok).teacher.lr == 1e-3
    assert load_yaml(write(tmp_path, "a: &a {x: 1}\nb:\n  <<: *a\n  x: 2\n", "m.yaml"))[0]["b"] == {"x": 2}


@pytest.mark.parametrize("text, value", [
    ("1e-4", 1e-4), ("1E5", 1e5), ("-2e+3", -2e3), ("1.0e5", 1e5), (".5e1", 5.0), ("+3e0", 3.0),
    ("2.5e-3", 2.5e-3), ("1.5", 1.5), (".inf", float("inf")),
    ("12", 12), ("-7", -7), ("0x1f", 31), ("1_000", 1000),  # ints stay ints
    ("1e-4x", "1e-4x"), ("e5", "e5"), ("1e", "1e"), ("'1e-4'", "1e-4"), ("1e-4.5", "1e-4.5"),  # strings stay strings
])
def test_yaml_12_floats(tmp_path, text, value):
    got = load_yaml(write(tmp_path, f"v: {text}\n"))[0]["v"]
    assert got == value and type(got) is type(value), (text, got)


def test_a_config_with_1e_minus_4_loads(tmp_path):
    cfg = load_config(write(tmp_path, "teacher: {lr: 2E-3}\ndistill:\n  lr_generator: 1e-4\n  max_steps: 1e3\n"))
    assert cfg.generator.lr == 1e-4 and cfg.teacher.lr == 2e-3
    assert cfg.distill.max_steps == 1000 and type(cfg.distill.max_steps) is int  # an integral float is an int


def test_missing_config_directory_and_not_utf8(tmp_path, capsys, no_run):
    user_error(capsys, distill(tmp_path, tmp_path / "nope.yaml"), "nope.yaml", "no such config file")
    user_error(capsys, ["compare", "--config", tmp_path, "--out", tmp_path / "o"], str(tmp_path), "is a directory")
    p = write(tmp_path, b"seed: 0\ndistill:\n  method: ph\xe4sed\n")  # latin-1, not UTF-8
    user_error(capsys, distill(tmp_path, p), f"{p}:3:", "not UTF-8", "0xe4")
    p = write(tmp_path, "seed: 0\nteacher: {width: 8\x00}\n")
    user_error(capsys, distill(tmp_path, p), f"{p}:2:", "#x0000")
    p = write(tmp_path, "- 1\n- 2\n")
    user_error(capsys, distill(tmp_path, p), str(p), "mapping")


# ------------------------------------------------------------------ fields
def test_unknown_and_ill_typed_fields_name_file_line_and_field(tmp_path, capsys, no_run):
    p = write(tmp_path, "seed: 0\ndistill:\n  max_steps: 4\n  lr_generator: abc\n")
    user_error(capsys, distill(tmp_path, p), f"{p}:4: distill.lr_generator must be a finite number, got 'abc'")
    p = write(tmp_path, "distill:\n  batch_size: 8\n  lr_gen: 1e-3\n")
    user_error(capsys, distill(tmp_path, p), f"{p}:3:", "distill.'lr_gen'", "did you mean 'lr_generator'")
    p = write(tmp_path, "distill:\n  betas:\n    - 0.0\n    - yes\n")
    user_error(capsys, distill(tmp_path, p), f"{p}:4:", "distill.betas[1]")
    p = write(tmp_path, "teacher: {width: 8}\ndistill:\n  timesteps: [1.0, 0.5, 0.6, 0.0]\n")
    user_error(capsys, distill(tmp_path, p), f"{p}:3:", "distill.timesteps", "strictly decreasing")


@pytest.mark.parametrize("field, text, says", [
    ("distill.lr_generator", "1e300", "float32"),  # finite in Python, inf in float32
    ("distill.lr_generator", "2.0", "(0, 1)"),  # an Adam lr >= 1 diverges at once
    ("teacher.lr", "1", "(0, 1)"),
    ("distill.lr_fake", ".inf", "finite"),
    ("distill.clamp_max", ".nan", "finite"),
    ("distill.grad_clip", "-.inf", "finite"),
    ("distill.batch_size", "1e30", "64 bits"),
    ("distill.pool_size", str(10**30), "64 bits"),
    ("distill.batch_size", "-4", ">= 1"),
    ("distill.batch_size", "2.5", "integer"),
    ("seed", "-1", ">= 0"),
    ("distill.weight_decay", "-0.1", ">= 0"),
])
def test_numbers_that_overflow_or_are_absurd_name_the_field(tmp_path, capsys, no_run, field, text, says):
    sec, _, name = field.rpartition(".")
    body = f"{sec}:\n  {name}: {text}\n" if sec else f"{name}: {text}\n"
    p = write(tmp_path, "threads: 1\n" + body)
    user_error(capsys, distill(tmp_path, p), f"{p}:{3 if sec else 2}: {field}", says)


# ------------------------------------------------------------------ the machine: device, --out, memory
def test_a_device_that_is_not_there(tmp_path, capsys, no_run, monkeypatch):
    p = write(tmp_path, "seed: 0\ndevice: cudax\n")
    user_error(capsys, distill(tmp_path, p), f"{p}:2: device must be 'cpu', 'cuda' or 'cuda:<index>'")
    p = write(tmp_path, "seed: 0\ndevice: cuda:7\n")
    assert load_config(p).device == "cuda:7"  # a config for a GPU machine loads anywhere; running it is checked
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    user_error(capsys, distill(tmp_path, p), f"{p}:2: device is 'cuda:7'", "no CUDA device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    user_error(capsys, distill(tmp_path, p), f"{p}:2: device is 'cuda:7'", "2 CUDA device(s): cuda:0 .. cuda:1")
    assert not (tmp_path / "run").exists()


def test_an_out_that_is_a_file_or_unwritable(tmp_path, capsys, no_run, monkeypatch):
    cfg = write(tmp_path, "seed: 0\n")
    f = write(tmp_path, "x", "afile")
    user_error(capsys, ["distill", "--config", cfg, "--out", f], "--out", str(f), "is a file, not a directory")
    user_error(capsys, ["compare", "--config", cfg, "--out", f / "sub"], "--out", str(f / "sub"), "is a file")
    user_error(capsys, ["toy1d", "--out", f / "a" / "b"], "--out", "is a file")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root writes anyway: let the check see what a user (or a read-only mount) sees
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
        user_error(capsys, ["distill", "--config", cfg, "--out", ro / "run"], "--out", str(ro), "not writable")
        assert not (ro / "run").exists()
    finally:
        ro.chmod(0o700)


def test_out_of_memory_at_start_says_what_size(tmp_path, capsys):
    # the teacher's first batch asks for 10**17 int64 labels: 711 PiB, more than any x86-64 address space
    # (2**57 bytes), so the allocator refuses at once whatever the overcommit setting
    p = write(tmp_path, "teacher: {batch_size: 100000000000000000}\n")
    user_error(capsys, distill(tmp_path, p), "out of memory", "711 PiB (800000000000000000 bytes)",
               "teacher.batch_size", "distill.batch_size", str(p))
    # sizes whose product overflows int64 are the same mistake
    p = write(tmp_path, f"teacher: {{batch_size: {2**62}}}\n")
    user_error(capsys, distill(tmp_path, p), "out of memory", "more than 2**63 bytes", str(p))


@pytest.mark.parametrize("exc, size", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
                            "79.19 GiB of which 3.12 GiB is free."), "20.00 GiB"),
    (MemoryError("Unable to allocate 7.28 TiB for an array with shape (10**12,) and data type float64"), "7.28 TiB"),
    (MemoryError(), "an unreported size"),
])
def test_out_of_memory_from_cuda_and_python(tmp_path, capsys, monkeypatch, exc, size):
    def boom(*a, **k):
        raise exc
    monkeypatch.setattr(pdmd.demos.distill, "distill", boom)
    user_error(capsys, distill(tmp_path, write(tmp_path, "seed: 0\n")), "out of memory", size, "distill.batch_size")


# ------------------------------------------------------------------ real-model configs: the same loader
def _real(tmp_path, edit=lambda t: t) -> Path:
    text = (ROOT / "configs" / "qwen-image.yaml").read_text().replace("device: cuda ", "device: cpu  ")
    return write(tmp_path, edit(text), "real.yaml")


def _line(p: Path, start: str) -> int:
    return next(i for i, t in enumerate(p.read_text().splitlines(), 1) if t.startswith(start))


def test_real_configs_use_the_same_loader(tmp_path, capsys):
    p = _real(tmp_path, lambda t: t.replace("  guidance_scale: 4.0", "  guidance_scale: 4.0\n  guidance_scale: 5.0"))
    n = _line(p, "  guidance_scale: 5.0")
    user_error(capsys, distill(tmp_path, p), f"{p}:{n}: teacher.guidance_scale is given twice")
    user_error(capsys, ["encode-prompts", "--config", p], f"{p}:{n}: teacher.guidance_scale is given twice")
    p = _real(tmp_path, lambda t: t.replace("  lr: 5.0e-5", "  lr: 5e-5").replace("  lr: 4.0e-7", "  lr: 4E-7"))
    rc = load_real_config(p)  # YAML 1.2 floats: PyYAML alone reads both as strings
    assert (rc.generator.lr, rc.fake.lr) == (5e-5, 4e-7)
    p = _real(tmp_path, lambda t: t.replace("  batch_size: 64", "  batch_size: lots"))
    user_error(capsys, distill(tmp_path, p), f"{p}:{_line(p, '  batch_size: lots')}: distill.batch_size")
    p = _real(tmp_path, lambda t: t.replace("  method: phased_sgts", "  method: phased_sgts\n  sgst: false"))
    user_error(capsys, distill(tmp_path, p), f"{p}:{_line(p, '  sgst')}: unknown config field 'distill.sgst'")
    p = _real(tmp_path, lambda t: t.replace("  kind: qwen-image", "  kind: sdxl"))
    user_error(capsys, distill(tmp_path, p), f"{p}:{_line(p, '  kind: sdxl')}: model.kind")
    p = _real(tmp_path, lambda t: t.replace("  guidance_scale: 4.0", "  guidance_scale: -1"))
    user_error(capsys, distill(tmp_path, p), f"{p}:{_line(p, '  guidance_scale: -1')}: teacher.guidance_scale")
    p = _real(tmp_path, lambda t: t.replace("device: cpu  ", "device: cuda:9"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        user_error(capsys, ["encode-prompts", "--config", p], f"{p}:{_line(p, 'device')}: device is 'cuda:9'")
    user_error(capsys, ["compare", "--config", _real(tmp_path), "--out", tmp_path / "c"], "real.yaml", "pdmd distill")
    user_error(capsys, ["encode-prompts", "--config", write(tmp_path, "seed: 0\n")], "c.yaml", "'model' section")


# ------------------------------------------------------------------ other commands, and what is not a user error
def test_other_commands(tmp_path, capsys):
    user_error(capsys, ["distill", "--outt", tmp_path], "pdmd distill:", "--out")  # argparse
    user_error(capsys, ["plan", "--model", "wan2.1-14b", "--gpus", "0"], "gpus")
    user_error(capsys, ["sample", "--run", tmp_path, "--out", tmp_path / "s.csv"], "--run", "experts.safetensors")
    user_error(capsys, ["sample", "--pipeline", tmp_path, "--experts", tmp_path, "--prompts", tmp_path / "p.txt",
                        "--out", tmp_path / "o"], "--prompts", "p.txt")
    user_error(capsys, ["sample", "--pipeline", tmp_path, "--experts", tmp_path, "--prompt", "a cat",
                        "--device", "cuda:3", "--out", tmp_path / "o"], "--device")
    user_error(capsys, ["eval", "diversity", "--samples", tmp_path / "none"], "samples", "not a directory")


def test_bugs_keep_their_traceback_and_ctrl_c_exits_130(tmp_path, capsys, monkeypatch):
    cfg = write(tmp_path, "seed: 0\n")

    def bug(*a, **k):
        raise RuntimeError("an index went wrong")
    monkeypatch.setattr(pdmd.demos.distill, "distill", bug)
    with pytest.raises(RuntimeError, match="index went wrong"):
        entry([str(a) for a in distill(tmp_path, cfg)])

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(pdmd.demos.distill, "distill", interrupted)
    assert entry([str(a) for a in distill(tmp_path, cfg)]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip() == "pdmd: interrupted"


def test_config_error_carries_file_line_and_field(tmp_path):
    p = write(tmp_path, "distill:\n  fake_updates: 0\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert (e.value.file, e.value.line, e.value.field) == (p, 2, "distill.fake_updates")
    assert isinstance(e.value, ValueError)  # callers that catch ValueError keep working
