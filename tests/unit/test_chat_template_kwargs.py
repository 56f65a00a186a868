"""Chat-template variables (--chat-template-kwargs) and the non-thinking default for templates with
a thinking switch (Qwen3 / Qwen3.5 style), issue 15. The templates are tiny Jinja written here; the
expected texts are what those templates say they render."""

from __future__ import annotations

import argparse

import pytest

from safetyheads import prompts
from safetyheads.cli import common
from safetyheads.config import PromptConfig, from_dict, from_yaml, to_dict, to_yaml
from safetyheads.errors import UsageError
from safetyheads.prompts import format_prompts, template_kwargs
from test_prompts import make_tokenizer

# Qwen3's logic: thinking unless enable_thinking is defined and false (then an empty think block)
THINKING = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and enable_thinking is false %}<think></think>{% else %}<think>{% endif %}"
    "{% endif %}"
)
PERSONA = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{{ persona | default('') }}{% endif %}"
)


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    """Each test starts as a new process would: no template noted yet."""
    monkeypatch.setattr(prompts, "_noted_thinking", set())


def test_thinking_templates_default_to_non_thinking_with_one_note(capsys):
    tok = make_tokenizer(THINKING)
    texts = format_prompts(tok, ["hello world", "how do i bake bread"], "chat")
    assert texts == ["<s><|user|> hello world <|assistant|><think></think>",
                     "<s><|user|> how do i bake bread <|assistant|><think></think>"]
    format_prompts(tok, ["hello world"], "chat")  # a second call, same template: no second note
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "enable_thinking=False" in err and "--chat-template-kwargs" in err


def test_thinking_mode_on_request(capsys):
    tok = make_tokenizer(THINKING)
    (text,) = format_prompts(tok, ["hello world"], "chat", chat_template_kwargs={"enable_thinking": True})
    assert text == "<s><|user|> hello world <|assistant|><think>"
    assert capsys.readouterr().err == ""  # the user chose: nothing to note
    assert template_kwargs(tok, {"enable_thinking": True}) == {"enable_thinking": True}


def test_templates_without_the_switch_are_left_alone(capsys):
    tok = make_tokenizer()  # test_prompts' plain template
    assert template_kwargs(tok) == {}
    assert format_prompts(tok, ["hello world"], "chat") == ["<s><|user|> hello world <|assistant|>"]
    assert capsys.readouterr().err == ""


def test_other_template_variables_are_passed():
    tok = make_tokenizer(PERSONA)
    assert format_prompts(tok, ["hello world"], "chat") == ["<s><|user|> hello world <|assistant|>"]
    (text,) = format_prompts(tok, ["hello world"], "chat", chat_template_kwargs={"persona": "world"})
    assert text == "<s><|user|> hello world <|assistant|>world"


@pytest.mark.parametrize("bad,match", [
    ({"add_generation_prompt": False}, "cannot set add_generation_prompt"),
    (["enable_thinking"], "JSON object"),
    ({1: True}, "JSON object"),
])
def test_bad_kwargs_are_usage_errors(bad, match):
    tok = make_tokenizer(THINKING)
    with pytest.raises(UsageError, match=match):
        format_prompts(tok, ["hello world"], "chat", chat_template_kwargs=bad)
    with pytest.raises(UsageError, match=match):
        PromptConfig(chat_template_kwargs=bad)


def test_kwargs_need_the_chat_format():
    tok = make_tokenizer(THINKING)
    with pytest.raises(UsageError, match="only applies to the chat format"):
        format_prompts(tok, ["hello world"], "paper", chat_template_kwargs={"enable_thinking": True})
    with pytest.raises(UsageError, match="only applies to the chat format"):
        PromptConfig(format="raw", chat_template_kwargs={"enable_thinking": True})
    assert format_prompts(tok, ["hello world"], "raw") == ["hello world"]  # no template, no default


def test_prompt_config_round_trips_and_applies_them():
    config = PromptConfig(chat_template_kwargs={"enable_thinking": True, "persona": "x"})
    assert to_dict(config)["chat_template_kwargs"] == {"enable_thinking": True, "persona": "x"}
    assert from_dict(PromptConfig, to_dict(config)) == config
    assert from_yaml(PromptConfig, to_yaml(config)) == config
    assert from_dict(PromptConfig, {"format": "chat"}).chat_template_kwargs is None  # older manifests
    tok = make_tokenizer(THINKING)
    assert config.apply(tok, ["hello world"]) == ["<s><|user|> hello world <|assistant|><think>"]
    assert PromptConfig().apply(tok, ["hello world"]) == ["<s><|user|> hello world <|assistant|><think></think>"]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    common.add_prompt_args(parser)
    return parser.parse_args(list(argv))


def test_cli_option():
    assert common.prompt_config_from_args(_args()).chat_template_kwargs is None
    config = common.prompt_config_from_args(_args("--chat-template-kwargs", '{"enable_thinking": true}'))
    assert config == PromptConfig(format="chat", chat_template_kwargs={"enable_thinking": True})
    with pytest.raises(UsageError, match="not valid JSON"):
        common.prompt_config_from_args(_args("--chat-template-kwargs", "{enable_thinking: true}"))
    with pytest.raises(UsageError, match="JSON object"):
        common.prompt_config_from_args(_args("--chat-template-kwargs", "[1]"))
    with pytest.raises(UsageError, match="only applies to the chat format"):
        common.prompt_config_from_args(_args("--format", "paper", "--chat-template-kwargs", '{"a": 1}'))


# ------------------------------------------------------------------------------- through a real run


def _loaded(chat_template: str):
    from safetyheads.models import LoadedModel
    from tiny_chat import tiny_model, tiny_tokenizer

    return LoadedModel(model=tiny_model("llama", layers=2), tokenizer=tiny_tokenizer(chat_template),
                       spec="tiny-llama", revision=None, weights_sha256=None, source="memory")


# tiny_chat's ChatML template with Qwen3's switch
CHATML_THINKING = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


@pytest.mark.parametrize("user,recorded", [(None, {"enable_thinking": False}),
                                           ({"enable_thinking": True}, {"enable_thinking": True})])
def test_a_run_records_the_template_variables_it_used(tmp_path, user, recorded):
    """gships through the pipeline: the manifest's config holds the variables the prompts were
    rendered with, and the inputs hash is that of those texts."""
    import hashlib
    import json

    from safetyheads import analyses
    from safetyheads.data import PromptSet

    loaded = _loaded(CHATML_THINKING)
    data = PromptSet(name="tiny", prompts=["tell me a joke", "hi there"], ids=[0, 1], categories=[None, None],
                     source="memory", sha256=None)
    analyses.run_gships(loaded, data, PromptConfig(chat_template_kwargs=user), out=tmp_path / "run",
                        method="scaling", layers="1", quiet=True)
    config = json.loads((tmp_path / "run" / "manifest.json").read_text())["config"]
    assert config["chat_template_kwargs"] == recorded
    think = "<think>\n\n</think>\n\n" if recorded == {"enable_thinking": False} else ""
    texts = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{think}" for q in data.prompts]
    assert config["inputs_sha256"] == hashlib.sha256("\x00".join(texts).encode()).hexdigest()


def test_runs_without_template_variables_keep_their_config(tmp_path):
    import json

    from safetyheads import analyses
    from safetyheads.data import PromptSet
    from tiny_chat import CHAT_TEMPLATE

    data = PromptSet(name="tiny", prompts=["tell me a joke", "hi there"], ids=[0, 1], categories=[None, None],
                     source="memory", sha256=None)
    analyses.run_gships(_loaded(CHAT_TEMPLATE), data, "chat", out=tmp_path / "run", method="scaling",
                        layers="1", quiet=True)
    assert "chat_template_kwargs" not in json.loads((tmp_path / "run" / "manifest.json").read_text())["config"]


@pytest.mark.parametrize("user,recorded", [(None, {"enable_thinking": False}),
                                           ({"enable_thinking": True}, {"enable_thinking": True})])
def test_generation_uses_and_records_them(user, recorded, monkeypatch):
    from safetyheads import generation

    seen: list[list[str]] = []
    original = generation.generate_texts

    def spy(model, tokenizer, texts, **kwargs):
        seen.append(list(texts))
        return original(model, tokenizer, texts, **kwargs)

    monkeypatch.setattr(generation, "generate_texts", spy)
    loaded = _loaded(CHATML_THINKING)
    gen = generation.generate_responses(loaded.model, loaded.tokenizer, ["hi there"], max_new_tokens=2,
                                        progress=False, chat_template_kwargs=user)
    assert gen.settings["chat_template_kwargs"] == recorded
    think = "<think>\n\n</think>\n\n" if recorded == {"enable_thinking": False} else ""
    assert seen == [[f"<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n{think}"]]
