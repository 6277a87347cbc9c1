"""Config loading: unknown or ill-typed fields and inconsistent values name the field."""
from pathlib import Path

import pytest
import yaml

from pdmd.config import RunConfig, from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_loads_and_matches_the_paper_layout():
    cfg = load_config(ROOT / "configs" / "toy.yaml")
    assert cfg.distill.method == "phased_sgts"
    assert cfg.distill.timesteps == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert cfg.distill.phase_boundaries == [0.5]
    assert cfg.generator.betas == [0.0, 0.999]


@pytest.mark.parametrize("data, field", [
    ({"distill": {"lr_gen": 1e-3}}, "distill.'lr_gen'"),
    ({"bogus": 1}, "'bogus'"),
    ({"distill": {"batch_size": "big"}}, "distill.batch_size"),
    ({"distill": {"batch_size": 2.5}}, "distill.batch_size"),
    ({"distill": {"bf16": "yes"}}, "distill.bf16"),
    ({"teacher": {"guidance_scale": "high"}}, "teacher.guidance_scale"),
    ({"distill": {"timesteps": [1.0, 0.5, 0.5, 0.0]}}, "distill.timesteps"),
    ({"distill": {"timesteps": [1.0, 0.25, 0.5, 0.0]}}, "distill.timesteps"),
    ({"distill": {"timesteps": [1.0, 0.0], "phase_boundaries": [0.5]}}, "distill.phase_boundaries"),
    ({"distill": {"timesteps": [1.0, 0.5, 0.0], "phase_boundaries": [0.75, 0.5]}}, "distill.phase_boundaries"),
    ({"distill": {"phase_boundaries": [0.6]}}, "distill.phase_boundaries"),
    ({"distill": {"clamp_max": 0}}, "distill.clamp_max"),
    ({"distill": {"clamp_max": -1.0}}, "distill.clamp_max"),
    ({"distill": {"method": "gan"}}, "distill.method"),
    ({"distill": {"betas": [0.9]}}, "distill.betas"),
    ({"distill": {"fake_updates": 0}}, "distill.fake_updates"),
    ({"distill": "fast"}, "distill"),
])
def test_bad_config_names_the_field(data, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.").replace("[", r"\[")):
        from_dict(data)


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"distill": {"timesteps": [1.0, 0.75, 0.8, 0.0]}}))
    with pytest.raises(ValueError, match="distill.timesteps"):
        load_config(p)
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(p)


def test_round_trip():
    cfg = RunConfig()
    assert from_dict(cfg.to_dict()) == cfg
