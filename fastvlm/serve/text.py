"""Token ids to the text a client sees, piece by piece, with OpenAI's ``stop`` sequences.

Two things make this more than ``tokenizer.decode`` per token. A token can end in the
middle of a UTF-8 character (byte-level BPE), so a piece that decodes to a trailing
U+FFFD is held back until the next token completes it. And a stop sequence can span
tokens: the text that could still be the start of one is held back too, and when a stop
sequence appears the answer ends just before it (the sequence itself is not returned,
as OpenAI does). Streamed pieces therefore always join to the non-streamed text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class TextAssembler:
    """Feed token ids; get the new text that is safe to send. ``stopped`` once a stop sequence appeared."""

    tokenizer: PreTrainedTokenizerBase
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    sent: str = ""  # the text handed out so far
    stopped: bool = False

    def add(self, token_id: int) -> str:
        """The text that ``token_id`` makes safe to send (may be empty)."""
        if self.stopped:
            return ""
        self.token_ids.append(token_id)
        text = self._decoded()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        return self._release(text, final=False)

    def finish(self) -> str:
        """The rest of the text once generation has ended (held-back text that is no stop)."""
        if self.stopped:
            return ""
        return self._release(self._decoded(), final=True)

    @property
    def text(self) -> str:
        return self.sent

    def _decoded(self) -> str:
        return cast(str, self.tokenizer.decode(self.token_ids, skip_special_tokens=True))

    def _release(self, text: str, *, final: bool) -> str:
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            return self._send(text[:cut])
        if final:
            return self._send(text)
        return self._send(text[: len(text) - self._partial_stop(text)])

    def _send(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""  # nothing new (a decode never rewrites text already sent, but stay safe)
        piece = text[len(self.sent) :]
        self.sent = text
        return piece

    def _first_stop(self, text: str) -> int | None:
        """Where the earliest stop sequence begins in ``text`` (searching only unsent text and its overlap)."""
        start = max(0, len(self.sent) - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _partial_stop(self, text: str) -> int:
        """How many trailing characters of ``text`` could be the start of a stop sequence."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
