"""An offline stand-in tokenizer for the throughput benchmarks.

The training and evaluation benchmarks run FastVLM-sized models with random weights and
must not download anything, yet the real data path needs a tokenizer with Qwen2's chat
special tokens. Speed does not depend on which ids the text maps to, so a byte-level
BPE with no merges (one token per byte) and those specials is enough.

The serving benchmark needs one more thing: every id the LLM can emit must decode to
visible text, or a streamed answer of random-weight tokens arrives as empty chunks and
time to first token cannot be seen by the client. :func:`padded_byte_tokenizer` fills the
vocabulary up to the LLM's size with plain added tokens (``<v123>`` decodes to itself).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastvlm.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"  # Qwen2's padding token
EOS_TOKEN = "<|im_end|>"  # the end of a chat turn, where generation stops
TURN_START_TOKEN = "<|im_start|>"
FILLER_TOKEN = "<v{id}>"  # the text of the filler token with this id (padded_byte_tokenizer)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with the qwen_2 chat specials: enough to tokenise prompts offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens(
        {"pad_token": PAD_TOKEN, "eos_token": EOS_TOKEN, "additional_special_tokens": [TURN_START_TOKEN]}
    )
    return tokenizer


def padded_byte_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """:func:`byte_tokenizer` with filler tokens up to ``vocab_size``, so that every id decodes to text."""
    tokenizer = byte_tokenizer()
    if vocab_size < len(tokenizer):
        raise ConfigError(f"vocab_size {vocab_size} is below the byte tokenizer's {len(tokenizer)} tokens")
    tokenizer.add_tokens([FILLER_TOKEN.format(id=i) for i in range(len(tokenizer), vocab_size)])
    return tokenizer
