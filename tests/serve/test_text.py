"""TextAssembler: whole characters only, stop sequences across tokens, pieces that join to the text."""

from __future__ import annotations

import pytest

from fastvlm.serve.text import TextAssembler


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return tiny_model.tokenizer


def feed(assembler: TextAssembler, ids: list[int]) -> list[str]:
    pieces = [assembler.add(i) for i in ids]
    return [*pieces, assembler.finish()]


def test_pieces_join_to_the_decoded_text(tokenizer):
    ids = tokenizer("Hello world, this is a test of streaming.", add_special_tokens=False).input_ids
    assembler = TextAssembler(tokenizer)
    assert "".join(feed(assembler, ids)) == tokenizer.decode(ids) == assembler.text
    assert not assembler.stopped


def test_a_character_split_across_tokens_is_held_back_until_complete(tokenizer):
    ids = tokenizer("a🙂b", add_special_tokens=False).input_ids
    assert len(ids) > 3  # the emoji takes several byte-level tokens
    pieces = feed(TextAssembler(tokenizer), ids)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == "a🙂b"


def test_a_stop_sequence_spanning_tokens_ends_the_text_before_it(tokenizer):
    ids = tokenizer("Hello world, again", add_special_tokens=False).input_ids
    assembler = TextAssembler(tokenizer, stop=("lo wor",))
    pieces = feed(assembler, ids)
    assert "".join(pieces) == "Hel" == assembler.text
    assert assembler.stopped
    assert assembler.add(ids[0]) == ""  # nothing more once stopped


def test_text_that_only_looks_like_the_start_of_a_stop_is_released_at_the_end(tokenizer):
    ids = tokenizer("Hello wo", add_special_tokens=False).input_ids
    assembler = TextAssembler(tokenizer, stop=("lo world",))
    pieces = [assembler.add(i) for i in ids]
    assert "".join(pieces) == "Hel"  # "lo wo" may still become the stop
    assert assembler.finish() == "lo wo" and not assembler.stopped


def test_the_earliest_of_several_stops_wins(tokenizer):
    ids = tokenizer("one two three four", add_special_tokens=False).input_ids
    assembler = TextAssembler(tokenizer, stop=("four", "two"))
    assert "".join(feed(assembler, ids)) == "one "
