"""A tiny random FastVLM and a tiny synthetic data set, shared by the training tests."""

from __future__ import annotations

import pytest

from fastvlm.model import FastVLM
from fastvlm.train.config import make_config
from fastvlm.train.synth import write_synthetic_dataset
from tests.conftest import fixture_path

IMAGE_SIZE = 128  # the fixture tower has stride 64: 4 visual tokens


@pytest.fixture(scope="session")
def tiny_init(tmp_path_factory):
    """A randomly initialised checkpoint with the architecture and tokenizer of the tiny fixture."""
    source = FastVLM.from_pretrained(fixture_path("apple_fastvlm_tiny"), fuse=False)
    config = source.config
    config.image_size = IMAGE_SIZE
    model = FastVLM.from_config(config, seed=0)
    model.tokenizer = source.tokenizer
    return model.save_pretrained(tmp_path_factory.mktemp("init") / "model")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """24 training and 4 test records with images."""
    out = tmp_path_factory.mktemp("data")
    write_synthetic_dataset(out, 28, size=IMAGE_SIZE, seed=1, test_fraction=4 / 28, progress=False)
    return out


def tiny_config(tiny_init, tiny_data, out, **overrides):
    values = dict(
        model=str(tiny_init),
        data=str(tiny_data / "train.jsonl"),
        output_dir=str(out),
        stage="2",
        lr=1e-3,
        global_batch_size=8,
        micro_batch_size=4,
        max_steps=6,
        progress=False,
        seed=0,
    )
    values.update(overrides)
    return make_config(**values)
