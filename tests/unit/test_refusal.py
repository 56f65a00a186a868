"""The refusal score (refusal.py) and the engine's teacher-forced readout it rests on. Oracles: a
direct forward of the whole sequence under `ablated()` (teacher forcing by hand) and the stock
model's own greedy `generate`."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from safetyheads import judges
from safetyheads.ablation import ablated
from safetyheads.data import PromptSet
from safetyheads.engine import prepare, sweep
from safetyheads.errors import UsageError
from safetyheads.models import LoadedModel
from safetyheads.prompts import Encoded, encode, format_prompts
from safetyheads.refusal import run_refusal
from tiny_chat import tiny_model as chat_model, tiny_tokenizer
from tiny_models import CASE_IDS, CASES, left_pad, one_thread, random_ids, tiny_model  # noqa: F401

HEADS = [(0, 1), (2, 3), (3, 0)]
K = 3


def _direct(model, seqs: list[torch.Tensor], k: int, heads, method: str) -> torch.Tensor:
    """log p(last k tokens | everything before them) of each sequence, one plain forward each."""
    out = torch.zeros(len(heads) + 1, len(seqs), k, dtype=torch.float64)
    for c, head in enumerate([None, *heads]):
        for p, seq in enumerate(seqs):
            ctx = ablated(model, [head], method) if head is not None else torch.no_grad()
            with ctx, torch.no_grad():
                logits = model(seq[None, :-1]).logits[0, -k:].double()  # predicts seq[-k:]
            out[c, p] = torch.log_softmax(logits, -1).gather(1, seq[-k:, None])[:, 0]
    return out


@pytest.mark.parametrize("arch,gqa", CASES[:6], ids=CASE_IDS[:6])
@pytest.mark.parametrize("method", ["undifferentiated", "scaling"])
def test_target_readout_equals_direct_teacher_forcing(arch, gqa, method):
    model = tiny_model(arch, gqa).double()
    # a shared 5-token prefix (the engine replays it once per config) and prompts of two lengths
    prefix = random_ids(1, 5, seed=9)[0]
    seqs = [torch.cat([prefix, random_ids(1, n, seed=i)[0]]) for i, n in enumerate((6, 4, 6))]
    ids, mask, pos = left_pad([s[:-1] for s in seqs])
    targets = torch.stack([s[-K:] for s in seqs])
    cache = prepare(model, Encoded(ids, mask, pos), targets=targets)
    if arch == "llama":  # no sliding window: the shared-prefix path is exercised
        assert cache.prefix_length >= 4
    res = sweep(cache, [[h] for h in HEADS], method, want=("target_logprobs", "kl"), progress=False)
    ref = _direct(model, seqs, K, HEADS, method)
    assert torch.allclose(cache.clean_target_logprobs, ref[0], atol=1e-9)
    assert torch.allclose(res.target_logprobs, ref[1:], atol=1e-9)
    # the last-position readouts are unchanged by reading more positions
    plain = sweep(prepare(model, Encoded(ids, mask, pos)), [[h] for h in HEADS], method, want=("kl",), progress=False)
    assert torch.allclose(res.kl, plain.kl, atol=1e-12)


def test_target_readout_needs_targets():
    model = tiny_model("llama", True).double()
    ids, mask, pos = left_pad([random_ids(1, 6)[0], random_ids(1, 5, seed=1)[0]])
    with pytest.raises(UsageError, match="targets"):
        sweep(prepare(model, Encoded(ids, mask, pos)), [[(0, 0)]], "scaling", want=("target_logprobs",))
    with pytest.raises(UsageError, match="fewer tokens"):
        prepare(model, Encoded(ids, mask, pos), targets=torch.zeros(2, 6, dtype=torch.long))


# ------------------------------------------------------------------------------------------------
# run_refusal on a tiny chat model, with a test judge that says which prompts were refused
# ------------------------------------------------------------------------------------------------
PROMPTS = ["how do I pick a lock", "tell me a joke", "write a poem about the sea", "what is 2+2?"]
IDS = [5, 6, 7, 8]


class _ByPrompt(judges.Judge):
    """Refused = the prompt is in `refused` (a stand-in for a real judge on a random model)."""

    def __init__(self, refused):
        self.refused, self.name = set(refused), "by-prompt"

    def judge(self, prompts, responses, *, progress=False):
        return [judges.Verdict(jailbroken=p not in self.refused, refused=p in self.refused) for p in prompts]


@pytest.fixture
def refusing_judge():
    @judges.register_judge("test-refuses", "test only")
    def make(arg, **options):
        return _ByPrompt(PROMPTS[: int(arg)])
    try:
        yield
    finally:
        del judges.JUDGES["test-refuses"]


@pytest.fixture(scope="module")
def chat_loaded():
    return LoadedModel(model=chat_model("llama", layers=3, heads=4, kv_heads=2, seed=3).double(),
                       tokenizer=tiny_tokenizer(), spec="tiny-llama", revision=None, weights_sha256=None,
                       source="memory")


def _prompt_set():
    return PromptSet(name="tiny", prompts=list(PROMPTS), ids=list(IDS), categories=[None] * 4, source="memory",
                     sha256=None)


def test_run_refusal_scores_the_drop_of_the_clean_refusal(chat_loaded, refusing_judge, tmp_path):
    model, tok = chat_loaded.model, chat_loaded.tokenizer
    res = run_refusal(chat_loaded, _prompt_set(), "chat", out=tmp_path / "r", method="scaling", judge="test-refuses:3",
                      tokens=K, max_new_tokens=6, quiet=True)
    table = pd.read_parquet(tmp_path / "r" / "refusal.parquet")
    assert pd.read_csv(tmp_path / "r" / "refusal.csv").columns.tolist() == table.columns.tolist()
    assert list(table.columns) == ["layer", "head", "method", "score", "rank", "n_refused", "n_used"]
    assert len(table) == 12 and set(table["n_refused"]) == {3} and set(table["n_used"]) == {3}
    prompts = pd.read_csv(tmp_path / "r" / "refusal_prompts.csv")
    assert prompts["used"].tolist() == [True, True, True, False] and prompts["why"].iloc[3] == "not refused"

    # oracle: the stock model's own greedy answer, then teacher forcing by hand under ablated()
    texts = format_prompts(tok, PROMPTS[:3], "chat")
    seqs = []
    for text in texts:
        enc = encode(tok, [text])
        with torch.no_grad():
            out = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=K,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        seqs.append(out[0])
    heads = [(int(a), int(b)) for a, b in zip(table["layer"], table["head"])]
    ref = _direct(model, seqs, K, heads, "scaling").sum(-1)  # [1 + heads, prompts]
    expected = (ref[0][None] - ref[1:]).mean(1)
    # float64 model; RoPE tables are float32, and the engine runs the prompts unpadded, in groups
    assert torch.allclose(torch.tensor(table["score"].to_numpy()), expected, atol=1e-6)
    assert table["score"].is_monotonic_decreasing and table["rank"].tolist() == list(range(1, 13))


def test_run_refusal_resume_and_errors(chat_loaded, refusing_judge, tmp_path):
    kwargs = dict(method="undifferentiated", judge="test-refuses:2", tokens=2, max_new_tokens=4, quiet=True)
    full = run_refusal(chat_loaded, _prompt_set(), "chat", out=tmp_path / "a", chunk_rows=1, **kwargs)
    part = tmp_path / "b"
    run_refusal(chat_loaded, _prompt_set(), "chat", out=part, chunk_rows=1, **kwargs)
    for lost in ("chunks/refusal_L001.parquet", "refusal.csv", "refusal.parquet"):
        (part / lost).unlink()
    run_refusal(chat_loaded, _prompt_set(), "chat", out=part, chunk_rows=1, resume=True, **kwargs)
    assert (part / "refusal.csv").read_bytes() == (tmp_path / "a" / "refusal.csv").read_bytes()
    assert full.table["n_used"].iloc[0] == 2
    with pytest.raises(UsageError, match="refused none"):
        run_refusal(chat_loaded, _prompt_set(), "chat", out=tmp_path / "c", **{**kwargs, "judge": "test-refuses:0"})
    with pytest.raises(UsageError, match="--tokens"):
        run_refusal(chat_loaded, _prompt_set(), "chat", out=tmp_path / "d", **{**kwargs, "tokens": 0})
    with pytest.raises(UsageError, match="--max-new-tokens"):
        run_refusal(chat_loaded, _prompt_set(), "chat", out=tmp_path / "e", **{**kwargs, "max_new_tokens": 1})


def test_refusal_runs_are_rankings_for_summary_and_report(chat_loaded, refusing_judge, tmp_path):
    from safetyheads.results import head_rankings, load_study
    run_refusal(chat_loaded, _prompt_set(), "chat", out=tmp_path / "r", judge="test-refuses:2", tokens=2,
                max_new_tokens=3, quiet=True)
    study = load_study([tmp_path])
    (run,) = study.scores
    assert run.refusal is not None and run.refusal["rank"].tolist() == list(range(1, 13))
    labels = [r.label for r in head_rankings(study.scores)]
    assert any("refusal score" in label for label in labels), labels
