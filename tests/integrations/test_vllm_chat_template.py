"""The Jinja chat template given to vLLM renders exactly what Conversation.prompt() renders."""

from __future__ import annotations

import pytest
from jinja2 import TemplateError
from transformers.utils.chat_template_utils import render_jinja_template

from fastvlm.integrations.vllm.chat_template import CHAT_TEMPLATE
from fastvlm.processing import Conversation, build_prompt


def render(messages: list[dict], add_generation_prompt: bool = True) -> str:
    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=CHAT_TEMPLATE, add_generation_prompt=add_generation_prompt
    )
    return rendered[0]


def image_then(text: str) -> list[dict]:
    """OpenAI-style content as vLLM passes it to the template: an image part, then a text part."""
    return [{"type": "image"}, {"type": "text", "text": text}]


def test_one_question_about_an_image_is_build_prompt() -> None:
    assert render([{"role": "user", "content": image_then("What is this?")}]) == build_prompt("What is this?")


def test_text_only_and_string_content() -> None:
    expected = build_prompt("Hello there", with_image=False)
    assert render([{"role": "user", "content": "Hello there"}]) == expected
    assert render([{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]) == expected


def test_multi_turn_with_system_and_several_text_parts_is_conversation_prompt() -> None:
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image_url"}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": [{"type": "text", "text": "And the shape?"}, {"type": "text", "text": "Exactly."}]},
    ]
    conversation = Conversation(system="Answer briefly.")
    conversation.add("user", "<image>\nColour?").add("assistant", "Red.").add("user", "And the shape?\nExactly.")
    assert render(messages) == conversation.prompt()
    assert render(messages, add_generation_prompt=False) == conversation.prompt(add_generation_prompt=False)


def test_an_image_alone_is_the_bare_placeholder() -> None:
    assert render([{"role": "user", "content": [{"type": "image"}]}]) == Conversation().add("user", "<image>").prompt()


@pytest.mark.parametrize("content", ["<image>\nDescribe.", [{"type": "text", "text": "look: <image>"}]])
def test_a_typed_placeholder_is_refused(content: object) -> None:
    with pytest.raises(TemplateError, match="contains <image>, which stands for an image"):
        render([{"role": "user", "content": content}])
