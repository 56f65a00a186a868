"""The manifest schema (manifest.py): what RunDir writes is what the dataclass reads back, field for
field, and the readers find each value where the commands put it (no alternative key names)."""

from __future__ import annotations

import json

import pytest

from safetyheads.manifest import Manifest
from safetyheads.runs import RunDir

SCORES_CONFIG = {"model": "tiny", "dataset": "advbench", "method": "scaling", "epsilon": 1e-5, "format": "chat",
                 "n_layers": 3, "n_heads": 4, "weights_sha256": "ab" * 32,
                 "data": {"n_prompts": 7, "ids": list(range(7))}}


def _written(tmp_path, config, **later) -> dict:
    run = RunDir.open(tmp_path / "run", config, command="gships")
    if later:
        run.update_manifest(**later)
    run.finish(top_heads=["1-2"])
    return json.loads((tmp_path / "run" / "manifest.json").read_text())


def test_written_manifest_round_trips_through_the_dataclass(tmp_path):
    on_disk = _written(tmp_path, SCORES_CONFIG, batch_size=12, shared_prefix_tokens=5)
    record = Manifest.from_dict(on_disk)
    assert record.to_dict() == on_disk
    # command-specific provenance stays flat at the top level of the file, and in `extra` here
    assert on_disk["batch_size"] == 12 and record.extra == {"batch_size": 12, "shared_prefix_tokens": 5}
    assert record.summary == {"top_heads": ["1-2"]} and isinstance(record.finished, str)
    assert record.compute_seconds is not None and record.seconds == record.compute_seconds


def test_readers_find_what_the_scores_config_holds(tmp_path):
    record = Manifest.from_dict(_written(tmp_path, SCORES_CONFIG))
    assert (record.model_name, record.dataset, record.method, record.format) == ("tiny", "advbench", "scaling", "chat")
    assert (record.n_layers, record.n_heads, record.epsilon) == (3, 4, 1e-5)
    assert record.weights_sha256 == "ab" * 32 and record.prompt_counts == [7]
    assert record.dataset_names == ["advbench"] and record.ablations == [] and record.target is None


def test_readers_on_an_evaluate_config():
    config = {"model": "m", "datasets": ["jailbreakbench", "maliciousinstruct"], "format": "raw",
              "ablations": [{"method": "scaling", "heads": "1-1", "epsilon": 1e-5}, "not a dict"]}
    record = Manifest.from_dict({"command": "evaluate", "config": config,
                                 "datasets": [{"name": "jailbreakbench", "n": 100}, {"name": "maliciousinstruct", "n": 90}],
                                 "model": {"spec": "other", "weights_sha256": "cd" * 32}})
    assert record.dataset is None and record.dataset_names == ["jailbreakbench", "maliciousinstruct"]
    assert record.prompt_counts == [100, 90] and record.ablations == [config["ablations"][0]]
    assert record.model_name == "m" and record.weights_sha256 == "cd" * 32   # the loaded model's hash
    assert record.method is None and record.epsilon is None


def test_resume_keeps_the_record_and_counts_the_resumption(tmp_path):
    first = _written(tmp_path, SCORES_CONFIG)
    again = RunDir.open(tmp_path / "run", SCORES_CONFIG, command="gships", resume=True)
    record = again.record
    assert record.finished is None and len(record.resumed) == 1 and record.started == first["started"]
    assert "finished" not in json.loads((tmp_path / "run" / "manifest.json").read_text())


def test_missing_or_odd_manifests_read_as_empty():
    for data in (None, [], {"config": "not a dict"}):
        record = Manifest.from_dict(data)
        assert record.config == {} and record.model_name is None and record.seconds is None
    spanned = Manifest.from_dict({"started": "2026-11-29T12:00:00", "finished": "2026-11-29T12:05:00"})
    assert spanned.seconds == 300.0
    assert Manifest.from_dict({"summary": {"seconds": 4.5}}).seconds == 4.5


def test_extra_cannot_shadow_a_schema_field():
    record = Manifest(command="x")
    record.extra["command"] = "y"
    with pytest.raises(ValueError, match="shadow"):
        record.to_dict()
    with pytest.raises(ValueError):
        record.set("config", {})


def test_read_is_what_runs_wrote_and_tells_a_broken_file(tmp_path):
    from safetyheads import manifest as manifests
    from safetyheads.errors import UsageError

    written = _written(tmp_path, SCORES_CONFIG)          # the JSON RunDir put on disk
    record = manifests.read(tmp_path / "run")
    assert record.to_dict() == written and record.method == "scaling" and record.n_heads == 4
    assert manifests.read(tmp_path / "nowhere") == Manifest()   # no manifest.json: an empty record
    (tmp_path / "run" / "manifest.json").write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        manifests.read(tmp_path / "run")
