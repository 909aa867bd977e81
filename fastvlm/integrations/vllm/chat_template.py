"""The authors' qwen_2 chat template as Jinja, for engines that render prompts from a template.

It lives in :mod:`fastvlm.processing` (the exported ONNX folders carry it too) and is
re-exported here for the vLLM server.

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

from fastvlm.processing import CHAT_TEMPLATE as CHAT_TEMPLATE
