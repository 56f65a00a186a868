"""Config dataclasses: validation, dict/YAML round trips, and the shared argparse options."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

import pytest

from safetyheads.cli import common
from safetyheads.config import (
    DataConfig,
    ModelConfig,
    PromptConfig,
    RunConfig,
    from_dict,
    from_yaml,
    to_dict,
    to_yaml,
)
from safetyheads.errors import UsageError


@dataclass
class Nested:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)


CONFIGS = [
    ModelConfig(),
    ModelConfig(model="org/name", revision="abc123", device="cpu", dtype="bfloat16", device_map="auto",
                attn_implementation="eager"),
    DataConfig(),
    DataConfig(dataset="x.csv", column="goal", limit=5, sample=3, seed=7, data_dir="/d"),
    PromptConfig(format="paper"),
    PromptConfig(system_prompt="You are: careful.\nLine two"),
    RunConfig(out="runs/a", resume=True, quiet=True),
    Nested(data=DataConfig(dataset="advbench", limit=2)),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: type(c).__name__)
def test_round_trips(cfg):
    assert from_dict(type(cfg), to_dict(cfg)) == cfg
    assert from_yaml(type(cfg), to_yaml(cfg)) == cfg
    assert from_dict(type(cfg), json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_nested_round_trip_rebuilds_dataclasses():
    back = from_yaml(Nested, to_yaml(Nested(prompt=PromptConfig(format="raw"))))
    assert isinstance(back.prompt, PromptConfig) and back.prompt.format == "raw"


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: ModelConfig(dtype="float8"), "unknown dtype 'float8'"),
        (lambda: ModelConfig(device="gpu"), "unknown device 'gpu'"),
        (lambda: ModelConfig(attn_implementation="flash"), "unknown attention implementation"),
        (lambda: DataConfig(limit=0), "--limit must be a positive"),
        (lambda: DataConfig(sample=-3), "--sample must be a positive"),
        (lambda: PromptConfig(format="fancy"), "unknown prompt format 'fancy'"),
        (lambda: RunConfig(resume=True, force=True), "contradict"),
        (lambda: from_dict(DataConfig, {"dataset": "x", "limt": 3}), r"unknown field\(s\) limt"),
        (lambda: from_yaml(DataConfig, "dataset: [unclosed"), "invalid YAML"),
        (lambda: from_yaml(DataConfig, "- a\n- b\n"), "expected a mapping"),
    ],
)
def test_bad_values_are_usage_errors(make, message):
    with pytest.raises(UsageError, match=message):
        make()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    common.add_model_args(p)
    common.add_data_args(p)
    common.add_prompt_args(p)
    common.add_run_args(p)
    return p


def test_cli_defaults_match_config_defaults():
    args = _parser().parse_args([])
    assert common.model_config_from_args(args) == ModelConfig()
    assert common.data_config_from_args(args) == DataConfig()
    assert common.prompt_config_from_args(args) == PromptConfig()
    assert common.run_config_from_args(args) == RunConfig()


def test_cli_options_reach_configs():
    args = _parser().parse_args(
        "--model smollm2-135m-instruct --device cpu --dtype float16 --device-map auto --dataset advbench "
        "--column target --limit 4 --sample 2 --seed 9 --data-dir /tmp/d --format raw --out r --resume --quiet".split()
    )
    assert common.model_config_from_args(args) == ModelConfig("smollm2-135m-instruct", None, "cpu", "float16", "auto")
    assert common.data_config_from_args(args) == DataConfig("advbench", "target", 4, 2, 9, "/tmp/d")
    assert common.prompt_config_from_args(args) == PromptConfig("raw")
    assert common.run_config_from_args(args) == RunConfig("r", True, False, True)


def test_cli_bad_values():
    with pytest.raises(UsageError, match="--limit must be a positive"):
        common.data_config_from_args(_parser().parse_args(["--limit", "0"]))
    with pytest.raises(SystemExit):  # argparse rejects an unknown --format itself (exit 2, one line)
        _parser().parse_args(["--format", "fancy"])
