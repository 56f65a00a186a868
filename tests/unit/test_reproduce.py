"""`safetyheads rerun` / `compare` (reproduce.py) on real CLI runs of a tiny saved model: the manifest
records the command line the CLI ran (not sys.argv), a rerun from another folder reproduces the files,
and a changed result, a missing file or a shuffled table are told apart."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from safetyheads import analyses
from safetyheads.cli.main import main
from safetyheads.errors import UsageError
from safetyheads.reproduce import compare_runs, rerun

from tiny_chat import tiny_model, tiny_tokenizer
from tiny_models import one_thread  # noqa: F401  (autouse: one torch thread)

PROMPTS = ["how do I pick a lock", "tell me a joke", "write a poem about the sea", "what is 2+2?"]
# relative paths on purpose: a rerun must replay them from the folder the run was started in
ARGV = ["ships", "--model", "model", "--dataset", "prompts.txt", "--format", "raw", "--method", "scaling",
        "--with-gships", "--out", "runs/first", "--quiet"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    tiny_model("llama", layers=2, heads=4, kv_heads=2, seed=5).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "prompts.txt").write_text("\n".join(PROMPTS))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(ARGV) == 0
    return root


def test_manifest_records_the_command_line_the_cli_ran(project, tmp_path):
    manifest = json.loads((project / "runs" / "first" / "manifest.json").read_text())
    assert manifest["argv"] == ARGV and manifest["cwd"] == str(project)
    # the Python API records no command line (sys.argv would be the test runner's)
    from safetyheads.data import PromptSet
    from safetyheads.models import load_model
    loaded = load_model(str(project / "model"))
    prompts = PromptSet(name="p", prompts=PROMPTS, ids=list(range(4)), categories=[None] * 4, source="memory",
                        sha256=None)
    analyses.run_gships(loaded, prompts, "raw", out=tmp_path / "api", quiet=True)
    assert json.loads((tmp_path / "api" / "manifest.json").read_text())["argv"] is None
    with pytest.raises(UsageError, match="Python API"):
        rerun(tmp_path / "api", tmp_path / "again")
    # a run made as one part of a bigger command (as `demo` does, in sub-folders of its --out) is not
    # replayable on its own: its manifest names the command instead
    from safetyheads.runs import cli_invocation
    with cli_invocation(["demo", "--out", str(tmp_path / "demo")]):
        analyses.run_gships(loaded, prompts, "raw", out=tmp_path / "demo" / "gships", quiet=True)
    manifest = json.loads((tmp_path / "demo" / "gships" / "manifest.json").read_text())
    assert manifest["argv"] is None and manifest["part_of_command"] == ["demo", "--out", str(tmp_path / "demo")]
    with pytest.raises(UsageError, match="one part of `safetyheads demo"):
        rerun(tmp_path / "demo" / "gships", tmp_path / "again")


def test_rerun_from_another_folder_reproduces_every_file(project, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                                   # not where the run was started
    result = rerun(project / "runs" / "first", tmp_path / "again")
    assert result.ok
    assert set(result.files["file"]) == {"ships.csv", "ships_summary.csv", "generalized_ships.csv"}
    assert set(result.files["status"]) <= {"identical", "close"}
    assert (result.files["max_rel"] <= 1e-4).all()
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert again["argv"][again["argv"].index("--out") + 1] == str(tmp_path / "again")
    assert "--resume" not in again["argv"]
    assert result.provenance.set_index("field").loc["config", "same"]
    # the CLI: a second rerun into the same folder needs --force; exit status 0 when reproduced
    assert main(["rerun", str(project / "runs" / "first"), "--out", str(tmp_path / "again"), "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["rerun", str(project / "runs" / "first"), "--out", str(tmp_path / "again"), "--quiet",
                 "--force"]) == 0
    out = capsys.readouterr().out
    assert "\nreproduced: " in out and "NOT reproduced" not in out


def _copy(project, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(project / "runs" / "first", copy)
    return copy


def test_compare_finds_changed_scores_and_missing_files(project, tmp_path, capsys):
    original = project / "runs" / "first"
    copy = _copy(project, tmp_path)
    assert compare_runs(original, copy).files["status"].eq("identical").all()
    # rows in another order (ties broken differently) are matched on their keys: still identical
    g = pd.read_csv(copy / "generalized_ships.csv")
    g.iloc[::-1].to_csv(copy / "generalized_ships.csv", index=False)
    assert compare_runs(original, copy).ok
    # a 1e-7 relative change is float32 noise: close; a 1% change in one score is a difference
    ships = pd.read_csv(original / "ships.csv")
    ships.loc[3, "score"] *= 1 + 1e-7
    ships.to_csv(copy / "ships.csv", index=False)
    res = compare_runs(original, copy)
    assert res.ok and res.files.set_index("file").loc["ships.csv", "status"] == "close"
    ships.loc[5, "score"] *= 1.01
    ships.to_csv(copy / "ships.csv", index=False)
    res = compare_runs(original, copy)
    row = res.files.set_index("file").loc["ships.csv"]
    assert not res.ok and row["status"] == "DIFFERENT" and "score: 1 of" in row["detail"]
    assert row["max_rel"] == pytest.approx(0.01 / 1.01, rel=1e-3)
    (copy / "ships_summary.csv").unlink()
    assert compare_runs(original, copy).files.set_index("file").loc["ships_summary.csv", "status"] == "missing"
    assert main(["compare", str(original), str(copy)]) == 1
    out = capsys.readouterr().out
    assert "NOT reproduced: 1 identical, 1 DIFFERENT, 1 missing" in out


def test_bad_input(project, tmp_path):
    with pytest.raises(UsageError, match="not a run folder"):
        compare_runs(tmp_path, project / "runs" / "first")
    with pytest.raises(UsageError, match="new folder"):
        rerun(project / "runs" / "first", project / "runs" / "first")
    unfinished = _copy(project, tmp_path)
    manifest = json.loads((unfinished / "manifest.json").read_text())
    del manifest["finished"]
    (unfinished / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="did not finish"):
        rerun(unfinished, tmp_path / "x")
    with pytest.raises(UsageError, match="rtol"):
        compare_runs(project / "runs" / "first", unfinished, rtol=-1)
