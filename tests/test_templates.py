"""Chat templates: HF-style rendering, built-ins, and no silent fallback."""

from __future__ import annotations

import pytest

from edgerun import templates
from edgerun.errors import ChatTemplateError


def test_chatml_renders_turns_and_generation_prompt():
    t = templates.choose(None, "chatml", "m")
    out = t.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert out == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_gemma_folds_the_system_prompt_into_the_first_user_turn():
    t = templates.choose(None, "gemma", "m", bos_token="<bos>")
    out = t.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                    {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}])
    assert out == ("<bos><start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n"
                   "<start_of_turn>user\nV<end_of_turn>\n<start_of_turn>model\n")


def test_model_without_template_and_no_override_is_an_error():
    with pytest.raises(ChatTemplateError, match="no chat template; pass --chat-template"):
        templates.choose(None, None, "gemma3-270m")


def test_unknown_template_name_lists_the_builtins():
    with pytest.raises(ChatTemplateError, match="chatml, llama3, gemma"):
        templates.choose("{{ x }}", "vicuna-ish", "m")


def test_template_file_override(tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    t = templates.choose("{{ ignored }}", str(f), "m")
    assert t.render([{"role": "user", "content": "x"}]) == "[user]x"


def test_template_raise_exception_becomes_a_template_error():
    t = templates.ChatTemplate("{{ raise_exception('roles must alternate') }}", "gguf")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        t.render([])


def test_broken_template_is_reported_at_compile_time():
    with pytest.raises(ChatTemplateError, match="does not compile"):
        templates.ChatTemplate("{% for %}", "gguf")


def test_sandbox_refuses_attribute_escape():
    # a GGUF's template is untrusted input: the Jinja sandbox refuses Python internals
    t = templates.ChatTemplate("{{ messages.__class__.__mro__ }}", "gguf")
    with pytest.raises(ChatTemplateError, match="unsafe"):
        t.render([])
