"""End to end through the CLI with tiny step counts: distill, resume, sample, compare."""
import json

import pytest
import yaml

from pdmd.cli import main
from trainer_helpers import config_file

TINY = {
    "teacher": {"width": 16, "depth": 2, "steps": 30, "batch_size": 64, "sample_steps": 8},
    "generator": {"lora_rank": 2},
    "distill": {"max_steps": 4, "batch_size": 16, "fake_updates_per_generator_update": 2, "pool_size": 64,
                "checkpoint_every": 2, "log_every": 1, "plot_every": 2},
    "eval": {"samples_per_prompt": 60, "diversity_groups": 2},
}


@pytest.fixture()
def config(tmp_path):
    yield from config_file(tmp_path, TINY)


def test_distill_resume_and_sample(tmp_path, config, capsys):
    out = tmp_path / "run"
    assert main(["distill", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["generator_updates"] == 4 and report["steps"] == 4 and report["phases"] == 2
    for who in ("teacher", "generator"):
        m = report[who]["mean"]
        assert m["modes"] == 15 and 0 <= m["covered"] <= 15 and m["diversity"] > 0
    for f in ("report.md", "samples.png", "losses.png", "experts.safetensors", "teacher.safetensors",
              "checkpoint.safetensors", "log.jsonl", "samples/step_000002.png"):
        assert (out / f).exists(), f
    assert "Teacher (8 steps, CFG 1.5)" in (out / "report.md").read_text()
    with pytest.raises(ValueError, match="--resume"):
        main(["distill", "--config", str(config), "--out", str(out), "--quiet"])
    # 4 -> 6 steps re-splits the phases ([2, 2] -> [3, 3]): update 3, trained in phase 2, would move to phase 1
    with pytest.raises(ValueError, match=r"max_steps is 6 .* \[2, 2\] to \[3, 3\]"):
        main(["distill", "--config", str(config), "--out", str(out), "--quiet", "--resume", "--max-steps", "6"])
    assert main(["distill", "--config", str(config), "--out", str(out), "--quiet", "--resume"]) == 0
    assert json.loads((out / "report.json").read_text())["generator_updates"] == 4
    assert json.loads((out / "report.json").read_text())["seconds"]["teacher_training"] == 0.0  # cached teacher

    csv = tmp_path / "s.csv"
    assert main(["sample", "--run", str(out), "--steps", "4", "--n", "10", "--out", str(csv)]) == 0
    lines = csv.read_text().splitlines()
    assert lines[0] == "x,y,prompt" and len(lines) == 11
    with pytest.raises(ValueError, match="steps must be 4"):
        main(["sample", "--run", str(out), "--steps", "2", "--n", "10", "--out", str(csv)])


def test_compare_writes_the_four_method_table(tmp_path, config):
    out = tmp_path / "cmp"
    quick = {**TINY, "distill": {**TINY["distill"], "plot_every": 1000, "checkpoint_every": 1000}}
    config.write_text(yaml.safe_dump(quick))
    assert main(["compare", "--config", str(config), "--out", str(out), "--quiet", "--max-steps", "4"]) == 0
    table = json.loads((out / "table.json").read_text())
    assert list(table["rows"])[1:] == ["DMD", "DMD with SGTS", "Phased DMD", "Phased DMD with SGTS", "Exact data"]
    md = (out / "table.md").read_text()
    assert md.count("\n| ") == 7  # header + 6 rows
    assert (out / "panel.png").exists()
