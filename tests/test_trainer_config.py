"""Config loading: unknown or ill-typed fields and inconsistent values name the field."""
import re
import typing
import warnings
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from pdmd.cli import entry
from pdmd.config import ConfigError, ConfigWarning, RunConfig, from_dict, load_config, markdown
from pdmd.config_aliases import CONVERTED, RENAMED

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


# ------------------------------------------------------------------ one schema: old names, --set, the docs' table

OLD = {"distill": {"lr_generator": 3e-4, "lr_fake": 2e-3, "fake_updates": 3, "betas": [0.0, 0.99], "weight_decay": 0.01,
                   "optimizer_generator": "adamw", "optimizer_fake": "adamw8bit-v", "lora_rank": 4, "lora_alpha": 2.0,
                   "fake_kind": "lora", "fake_lora_rank": 8, "fake_dtype": "float32",
                   "steps": [1.0, 0.6, 0.3], "sgts": False}}
NEW = {"distill": {"fake_updates_per_generator_update": 3, "timesteps": [1.0, 0.6, 0.3, 0.0], "method": "phased"},
       "generator": {"lr": 3e-4, "betas": [0.0, 0.99], "weight_decay": 0.01, "optimizer": "adamw", "lora_rank": 4,
                     "lora_alpha": 2.0},
       "fake": {"lr": 2e-3, "optimizer": "adamw8bit-v", "kind": "lora", "lora_rank": 8, "dtype": "float32"}}


def test_every_old_name_is_read_with_a_warning_naming_the_new_field():
    assert {f"distill.{k}" for k in OLD["distill"]} == set(RENAMED) | {"distill.steps", "distill.sgts"}
    with pytest.warns(ConfigWarning) as got:
        old = from_dict(OLD)
    assert old == from_dict(NEW)
    said = " ".join(str(w.message) for w in got)
    for o, n in {**RENAMED, **{k: v[0] for k, v in CONVERTED.items() if k.startswith("distill.")}}.items():
        assert f"{o} is now {n}" in said, o
    with pytest.warns(ConfigWarning, match="fake.full_parameters is now fake.kind"):
        assert from_dict({"fake": {"full_parameters": False}}).fake.kind == "lora"


def test_old_and_new_name_together_and_bad_values_under_old_names(tmp_path):
    with pytest.raises(ConfigError, match="distill.lr_generator and generator.lr are the same field"):
        from_dict({"distill": {"lr_generator": 1e-4}, "generator": {"lr": 1e-4}})
    p = tmp_path / "c.yaml"
    p.write_text("seed: 0\ndistill:\n  fake_kind: big\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        with pytest.raises(ConfigError) as e:
            load_config(p)
    assert str(e.value).startswith(f"{p}:3: distill.fake_kind must be 'full' or 'lora', got 'big'")
    assert str(e.value).endswith("(distill.fake_kind is now fake.kind)")


def test_set_overrides_are_typed_by_the_schema_and_win_over_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("distill:\n  batch_size: 8\n  lr_generator: 1e-4\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)  # the file's old name is replaced by --set: no warning left
        cfg = load_config(p, overrides=["generator.lr=2e-4", "distill.timesteps=[1.0, 0.5, 0.0]", "distill.bf16=true",
                                        "seed=3", "fake.betas=null"])
    assert (cfg.generator.lr, cfg.distill.timesteps, cfg.distill.bf16, cfg.seed) == (2e-4, [1.0, 0.5, 0.0], True, 3)
    assert cfg.distill.phase_boundaries == [0.5] and cfg.distill.batch_size == 8
    for item, says in (("distill.batch_size=lots", "distill.batch_size must be an integer, got 'lots'"),
                       ("distill.bf16=1", "distill.bf16 must be true or false"),
                       ("distill.batchsize=4", "unknown config field 'distill.batchsize'"),
                       ("generator.lr=3", "generator.lr must lie in (0, 1)")):
        with pytest.raises(ConfigError) as e:
            load_config(p, overrides=[item])
        assert str(e.value).startswith(f"--set {item}: {says}"), str(e.value)
    with pytest.raises(ConfigError, match="expected section.field=value"):
        load_config(p, overrides=["distill.batch_size"])


def _ran(monkeypatch, module, name):
    """Replace ``module.name`` by a recorder of the config it is given."""
    seen = {}

    def record(cfg, *a, **k):
        seen["cfg"] = cfg
        raise SystemExit(0)
    monkeypatch.setattr(module, name, record)
    return seen


@pytest.mark.parametrize("command", ["distill", "compare", "encode-prompts"])
def test_every_command_that_reads_a_config_takes_set(tmp_path, monkeypatch, capsys, command):
    import pdmd.demos.distill
    import pdmd.pipeline.real

    if command == "encode-prompts":
        text = (ROOT / "configs" / "qwen-image.yaml").read_text().replace("device: cuda ", "device: cpu  ")
        seen = _ran(monkeypatch, pdmd.pipeline.real, "encode_real")
    else:
        text = "seed: 0\n"
        seen = _ran(monkeypatch, pdmd.demos.distill, command)
    p = tmp_path / "c.yaml"
    p.write_text(text)
    args = [command, "--config", str(p)] + ([] if command == "encode-prompts" else ["--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        entry(args + ["--set", "generator.lora_rank=3", "--set", "fake.lr=1e-5"])
    assert (seen["cfg"].generator.lora_rank, seen["cfg"].fake.lr) == (3, 1e-5)
    assert entry(args + ["--set", "generator.lora_rank=2.5"]) == 2
    assert "pdmd: error: --set generator.lora_rank=2.5: generator.lora_rank must be an integer" in capsys.readouterr().err


def test_docs_field_table_is_the_generated_one():
    doc = (ROOT / "docs" / "config.md").read_text()
    m = re.search(r"<!-- generated: python -m pdmd.config --markdown -->\n(.*)<!-- end generated -->", doc, re.S)
    assert m, "docs/config.md lost its generated block"
    assert m.group(1) == markdown(), "docs/config.md is stale: python -m pdmd.config --markdown"
    for section, field in RunConfig.model_fields.items():  # every field of the schema is in the table
        ann = field.annotation
        cls = next((a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        for name in cls.model_fields if cls else ():
            assert f"`{section}.{name}`" in m.group(1)
