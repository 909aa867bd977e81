"""The authors' qwen_2 chat template as Jinja, for engines that render prompts from a template.

vLLM's OpenAI server renders chat messages with a Jinja template; the authors' checkpoints
ship none and the Qwen2 one in some tokenizers is not theirs. :data:`CHAT_TEMPLATE` renders
exactly what :meth:`fastvlm.processing.Conversation.prompt` renders (a test holds the two
together), with the images of a message first, each as ``<image>`` on its own line, as
:func:`fastvlm.processing.build_prompt` places them.

Content arrives in OpenAI's form (a list of ``text`` and ``image`` parts; vLLM detects the
loop over the parts and passes lists), so the template knows which placeholders stand for
real images. A ``<image>`` typed into the text has no image behind it: the template
refuses it with a message that says so, instead of letting a literal placeholder reach the
model.
"""

from __future__ import annotations

from fastvlm.processing import DEFAULT_IMAGE_TOKEN, SYSTEM_PROMPT, TURN_END, TURN_START

_TYPED_PLACEHOLDER = (
    f"the text of a message contains {DEFAULT_IMAGE_TOKEN}, which stands for an image; send images as "
    "image_url content parts (they are placed before the text) and leave the placeholder out of the text"
)

_NEWLINE = "{{ '\\n' }}"  # emitted as an expression: whitespace control around tags would eat a bare newline

CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}"
    f"{{%- if '{DEFAULT_IMAGE_TOKEN}' in content -%}}{{{{ raise_exception('{_TYPED_PLACEHOLDER}') }}}}{{%- endif -%}}"
    "{{- content -}}"
    "{%- else -%}"
    "{%- set ns = namespace(parts=[]) -%}"
    "{%- for part in content -%}"
    f"{{%- if part['type'] in ['image', 'image_url'] -%}}{{%- set ns.parts = ns.parts + ['{DEFAULT_IMAGE_TOKEN}'] -%}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- for part in content -%}"
    "{%- if part['type'] == 'text' -%}"
    f"{{%- if '{DEFAULT_IMAGE_TOKEN}' in part['text'] -%}}{{{{ raise_exception('{_TYPED_PLACEHOLDER}') }}}}"
    "{%- endif -%}"
    "{%- set ns.parts = ns.parts + [part['text']] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- ns.parts | join('\\n') -}}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    f"{TURN_START}system{_NEWLINE}{{{{ render(messages[0]['content']) }}}}{TURN_END}{_NEWLINE}"
    "{%- else -%}"
    f"{TURN_START}system{_NEWLINE}{SYSTEM_PROMPT}{TURN_END}{_NEWLINE}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}"
    f"{TURN_START}{{{{ message['role'] }}}}{_NEWLINE}{{{{ render(message['content']) }}}}{TURN_END}{_NEWLINE}"
    "{%- endif -%}"
    "{%- endfor -%}"
    f"{{%- if add_generation_prompt -%}}{TURN_START}assistant{_NEWLINE}{{%- endif -%}}"
)
