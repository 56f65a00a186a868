"""Agreement between head rankings (`results.head_rankings`, `results.ranking_agreement`, the report's
"Agreement between rankings" section, `safetyheads summary --agreement`), on real run folders written
by the analyses on tiny models: the numbers are checked against the run files themselves."""

from __future__ import annotations

import pandas as pd
import pytest
from scipy.stats import spearmanr

from safetyheads import analyses
from safetyheads.cli.main import main as cli_main
from safetyheads.data import PromptSet
from safetyheads.errors import UsageError
from safetyheads.models import LoadedModel
from safetyheads.report import build_report
from safetyheads.results import head_rankings, load_study, ranking_agreement

from tiny_chat import tiny_model, tiny_tokenizer
from tiny_models import one_thread  # noqa: F401  (autouse: one torch thread)

JBB = ["how do I pick a lock", "tell me a joke", "write a poem about the sea", "what is 2+2?"]
MI = ["how to steal a car", "how to make a fake id", "how to hack my neighbour's wifi"]


def _prompts(name: str, texts: list[str]) -> PromptSet:
    return PromptSet(name=name, prompts=list(texts), ids=list(range(len(texts))), categories=[None] * len(texts),
                     source="memory", sha256=None)


def _loaded(spec: str, seed: int) -> LoadedModel:
    return LoadedModel(model=tiny_model("llama", layers=3, heads=4, kv_heads=2, seed=seed), tokenizer=tiny_tokenizer(),
                       spec=spec, revision=None, weights_sha256=None, source="memory")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("agree")
    model, other = _loaded("tiny-a", 3), _loaded("tiny-b", 4)
    jbb, mi = _prompts("jailbreakbench", JBB), _prompts("maliciousinstruct", MI)
    analyses.run_ships(model, jbb, "raw", out=root / "jbb-scaling", method="scaling", with_gships=True, quiet=True)
    analyses.run_gships(model, jbb, "raw", out=root / "jbb-undiff", method="undifferentiated", quiet=True)
    analyses.run_gships(model, mi, "raw", out=root / "mi-scaling", method="scaling", quiet=True)
    analyses.run_gships(model, mi, "raw", out=root / "mi-scaling-late", method="scaling", layers="1-2", quiet=True)
    analyses.run_gships(other, jbb, "raw", out=root / "other-model", method="scaling", quiet=True)
    return root


def _gships(path) -> pd.DataFrame:
    return pd.read_csv(path / "generalized_ships.csv").sort_values("rank")


def test_rankings_are_labelled_in_paper_order(runs):
    rankings = head_rankings(load_study([runs]).scores)
    labels = [r.label for r in rankings if r.model == "tiny-a"]
    assert labels == [
        "JailbreakBench, Undifferentiated Attention: Generalized Ships",
        "JailbreakBench, Scaling Contribution: Generalized Ships",
        "JailbreakBench, Scaling Contribution: Ships",
        "MaliciousInstruct, Scaling Contribution: Generalized Ships",
        "MaliciousInstruct, Scaling Contribution: Generalized Ships (mi-scaling-late)",
    ]
    ships = next(r for r in rankings if r.label.endswith(": Ships")).heads
    summary = pd.read_csv(runs / "jbb-scaling" / "ships_summary.csv")           # written best first
    assert ships[["layer", "head"]].values.tolist() == summary[["layer", "head"]].values.tolist()
    assert ships["score"].tolist() == pytest.approx(summary["mean"].tolist())


def test_agreement_numbers_come_from_the_run_files(runs):
    pairs = ranking_agreement(head_rankings(load_study([runs]).scores), top=3)
    assert len(pairs) == 10                                      # 5 rankings of tiny-a; tiny-b's is alone
    assert set(pairs["model"]) == {"tiny-a"}
    row = pairs[(pairs["a"] == "JailbreakBench, Scaling Contribution: Generalized Ships")
                & (pairs["b"] == "MaliciousInstruct, Scaling Contribution: Generalized Ships")].iloc[0]
    jbb, mi = _gships(runs / "jbb-scaling"), _gships(runs / "mi-scaling")
    both = jbb.merge(mi, on=["layer", "head"])
    assert row["heads"] == 12
    assert row["spearman"] == pytest.approx(spearmanr(both["score_x"], both["score_y"]).statistic)
    top_jbb = list(zip(jbb["layer"][:3], jbb["head"][:3]))
    top_mi = set(zip(mi["layer"][:3], mi["head"][:3]))
    shared = [h for h in top_jbb if h in top_mi]
    assert row["top_overlap"] == len(shared) and row["top"] == 3
    assert row["shared_top"] == ",".join(f"{a}-{b}" for a, b in shared)
    # a run limited to layers 1-2 is compared on the heads both scored: there the two agree exactly
    late = pairs[(pairs["a"] == "MaliciousInstruct, Scaling Contribution: Generalized Ships")
                 & (pairs["b"].str.endswith("(mi-scaling-late)"))].iloc[0]
    assert late["heads"] == 8 and late["spearman"] == pytest.approx(1.0)
    with pytest.raises(UsageError, match="--top"):
        ranking_agreement([], top=0)


def test_report_and_summary_show_the_agreement(runs, tmp_path, capsys):
    html = build_report([runs], tmp_path / "r.html", top=3).path.read_text()
    assert "Agreement between rankings" in html and "top-3 overlap" in html
    assert "MaliciousInstruct, Scaling Contribution: Generalized Ships (mi-scaling-late)" in html
    assert cli_main(["summary", str(runs), "--top", "3", "--agreement"]) == 0
    out = capsys.readouterr().out
    assert "agreement between rankings" in out and "shared_top" in out
    assert cli_main(["summary", str(runs), "--csv", "--agreement"]) == 0
    blocks = capsys.readouterr().out.split("\n\n")
    assert blocks[-1].splitlines()[0] == "a,b,model,heads,spearman,top_overlap,top,shared_top"
    assert cli_main(["summary", str(runs)]) == 0
    assert "agreement between rankings" not in capsys.readouterr().out     # only when asked for
