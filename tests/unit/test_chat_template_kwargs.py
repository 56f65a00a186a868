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
