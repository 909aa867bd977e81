"""Continuous batching: a sequence gets the tokens it gets alone, whoever joins or leaves around it."""

from __future__ import annotations

import json

import pytest
import torch

from fastvlm.generation import prepare_prompt, stop_token_ids
from fastvlm.model import FastVLM
from fastvlm.processing import pad_sequences, tokenize_prompt
from fastvlm.serve.batch import DecodeBatch
from tests.conftest import fixture_path


@pytest.fixture(scope="module")
def model() -> FastVLM:
    return FastVLM.from_pretrained(fixture_path("apple_fastvlm_tiny"))


def _requests() -> list[dict]:
    golden = json.loads(fixture_path("apple_fastvlm_tiny", "golden.json").read_text())
    image = str(fixture_path("apple_fastvlm_tiny", "image.png"))
    return [  # (joins at step, image, question, max new tokens)
        {"join": 0, "image": image, "question": golden["question"], "max_new": 12},
        {"join": 2, "image": None, "question": "Write a long story about a cat.", "max_new": 9},
        {"join": 3, "image": image, "question": "What colour is it?", "max_new": 4},
        {"join": 6, "image": image, "question": golden["question"], "max_new": 7},
    ]


def _admit(model: FastVLM, request: dict) -> tuple[DecodeBatch, int]:
    tok = model.tokenizer
    assert tok is not None
    prompt = prepare_prompt(request["question"], request["image"] is not None)
    ids, mask = pad_sequences([tokenize_prompt(tok, prompt)], 0, "left")
    features = None
    if request["image"] is not None:
        features = model.encode_images(model.image_processor(request["image"])[None])
    batch, logits = DecodeBatch.prefill(model, ids, mask, image_features=features)
    batch.last_tokens = logits.argmax(-1)
    return batch, int(batch.last_tokens[0])


@torch.inference_mode()
def test_joining_and_leaving_rows_keep_every_sequence_s_greedy_tokens(model):
    requests = _requests()
    stops = stop_token_ids(model)
    alone = [
        model.generate(image=r["image"], prompt=r["question"], max_new_tokens=r["max_new"]).token_ids for r in requests
    ]
    outputs: list[list[int]] = [[] for _ in requests]
    running: DecodeBatch | None = None
    rows: list[int] = []  # request index of each row of `running`
    max_rows = 0

    def record(index: int, token: int) -> bool:
        """Keep ``token``; True when the request is finished."""
        if token in stops:
            return True
        outputs[index].append(token)
        return len(outputs[index]) >= requests[index]["max_new"]

    for step in range(40):
        for index, request in enumerate(requests):
            if request["join"] == step:
                joined, first = _admit(model, request)
                if not record(index, first):
                    running = joined if running is None else running.merge(joined)
                    rows.append(index)
        if running is not None and step > 0:
            tokens = running.step().argmax(-1)
            running.last_tokens = tokens
            keep = [row for row, token in enumerate(tokens.tolist()) if not record(rows[row], token)]
            rows = [rows[row] for row in keep]
            running = running.select(keep) if keep else None
        max_rows = max(max_rows, len(rows))
        if running is None and step > max(r["join"] for r in requests):
            break
    assert max_rows >= 3  # the schedule really ran several sequences at once
    assert outputs == alone


@torch.inference_mode()
def test_dropping_rows_trims_the_padding_no_row_needs(model):
    short = {"image": None, "question": "Hi", "max_new": 2}
    long = {"image": None, "question": "Tell me everything you know about the sea and the sky.", "max_new": 2}
    a, _ = _admit(model, short)
    b, _ = _admit(model, long)
    merged = a.merge(b)
    assert merged.length == b.length and merged.size == 2
    assert merged.attention_mask[0].sum() == a.length
    only_short = merged.select([0])
    assert only_short.length == a.length
    assert all(keys.shape[2] == a.length for keys, _ in only_short.steps.layers())
