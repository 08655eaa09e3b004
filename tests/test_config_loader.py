"""Typed configs: building from dicts, overrides, and errors that name the bad key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from movekd.config.loader import ConfigError, apply_overrides, from_dict, load_yaml, to_dict


@dataclass
class Inner:
    lr: float = 1e-3
    groups: list[str] = field(default_factory=lambda: ["projector"])


@dataclass
class Outer:
    name: str
    precision: Literal["fp32", "bf16"] = "fp32"
    steps: int = 10
    out: Optional[Path] = None
    stages: list[Inner] = field(default_factory=lambda: [Inner()])
    inner: Inner = field(default_factory=Inner)


def test_builds_nested_and_converts():
    cfg = from_dict(Outer, {"name": "x", "steps": 3, "out": "runs/a", "stages": [{"lr": "2e-5"}, {}],
                            "inner": {"groups": ["a", "b"]}})
    assert cfg.steps == 3 and cfg.out == Path("runs/a")
    assert cfg.stages[0].lr == 2e-5 and cfg.stages[1].lr == 1e-3 and cfg.inner.groups == ["a", "b"]
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "x", "stpes": 3}, "unknown config key 'stpes'"),
        ({"name": "x", "stages": [{}, {"lrr": 1}]}, "unknown config key 'stages.1.lrr'"),
        ({"name": "x", "inner": {"lr": "fast"}}, "'inner.lr' must be float"),
        ({"name": "x", "precision": "fp8"}, "'precision' must be one of"),
        ({"name": "x", "steps": True}, "'steps' must be int"),
        ({}, "missing required config key 'name'"),
    ],
)
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_overrides_parse_yaml_values_and_index_lists():
    data = {"name": "x", "stages": [{"lr": 1.0}, {"lr": 2.0}]}
    apply_overrides(data, ["stages.1.lr=1e-4", "precision=bf16", "inner.groups=[a, b]"])
    cfg = from_dict(Outer, data)
    assert cfg.stages[1].lr == 1e-4 and cfg.precision == "bf16" and cfg.inner.groups == ["a", "b"]
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides(data, ["stages.5.lr=1"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(data, ["stages"])
    with pytest.raises(ConfigError, match="unknown config key 'inner.nope'"):
        from_dict(Outer, apply_overrides(data, ["inner.nope=1"]))


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
