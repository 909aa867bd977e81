"""Image preprocessing and prompt tokenisation against the golden fixtures; bad images."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer

from fastvlm.processing import (
    IMAGE_TOKEN_INDEX,
    Conversation,
    ImageError,
    ImageProcessor,
    build_prompt,
    expand_to_square,
    load_image,
    tokenize_prompt,
)
from tests.conftest import fixture_path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(fixture_path("apple_fastvlm_tiny"))


@pytest.mark.parametrize("folder", ["apple_fastvlm_tiny", "hf_fastvlm_tiny"])
def test_preprocessing_matches_golden_pixels_within_one_level(folder):
    golden = load_file(fixture_path(folder, "golden.safetensors"))["pixel_values"]
    ours = ImageProcessor(256, "pad")(fixture_path("apple_fastvlm_tiny", "image.png"))[None]
    assert ours.shape == golden.shape and ours.dtype == torch.float32
    levels = (ours - golden).abs().max().item() * 255
    assert levels <= 1 + 1e-4, f"{levels:.3f} 8-bit levels apart"  # within 1/255


def test_golden_prompt_is_our_template_and_tokenises_to_golden_ids(tokenizer):
    golden = json.loads(fixture_path("apple_fastvlm_tiny", "golden.json").read_text())
    assert build_prompt(golden["question"]) == golden["prompt"]
    ids = tokenize_prompt(tokenizer, golden["prompt"])
    expected = load_file(fixture_path("apple_fastvlm_tiny", "golden.safetensors"))["input_ids"][0].tolist()
    assert ids == expected and ids.count(IMAGE_TOKEN_INDEX) == 1


def test_transformers_convention_ids_follow_from_ours(tokenizer):
    """hf golden ids = ours with the -200 replaced by 16 copies of the <image> token id."""
    golden = json.loads(fixture_path("hf_fastvlm_tiny", "golden.json").read_text())
    ids = tokenize_prompt(tokenizer, golden["prompt"])
    i = ids.index(IMAGE_TOKEN_INDEX)
    expanded = ids[:i] + [golden["image_token_id"]] * golden["image_tokens"] + ids[i + 1 :]
    expected = load_file(fixture_path("hf_fastvlm_tiny", "golden.safetensors"))["input_ids"][0].tolist()
    assert expanded == expected


def test_multi_turn_conversation_renders_like_the_authors_template():
    conv = Conversation().add("user", "<image>\nWhat is it?").add("assistant", "A sign.").add("user", "Color?")
    assert conv.prompt() == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n"
        "<|im_start|>assistant\nA sign.<|im_end|>\n"
        "<|im_start|>user\nColor?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_pad_to_square_is_black_and_centred():
    img = Image.new("RGB", (30, 10), (255, 255, 255))
    square = np.asarray(expand_to_square(img))
    assert square.shape == (30, 30, 3)
    assert (square[:10] == 0).all() and (square[20:] == 0).all() and (square[10:20] == 255).all()


def test_crop_mode_resizes_shortest_edge_and_centre_crops():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 40, 100))  # a red band on the left, cropped away by a centre crop
    out = ImageProcessor(64, "crop")(img)
    assert out.shape == (3, 64, 64)
    assert out[0].max() < 0.05  # no red left
    padded = ImageProcessor(64, "pad")(img)
    assert padded[0].max() > 0.95  # the pad path keeps the whole image


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    upright = np.asarray(load_image(path))
    assert upright.shape == (40, 20, 3)  # portrait after rotation
    assert upright[:18].mean() > 200 and upright[22:].mean() < 50  # white top half


def test_a_kept_orientation_stays_kept_when_the_image_is_decoded_again(tmp_path):
    """The benchmarks' loader keeps the stored orientation; the model's processor must not rotate it later."""
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    stored = load_image(path, exif_transpose=False)
    assert stored.size == (40, 20)
    assert load_image(stored).size == (40, 20)  # what generate() and the vLLM processor do with a PIL image
    assert load_image(path).size == (20, 40)  # the file itself still reads upright by default


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("L", (8, 8), 128),
        lambda: Image.new("RGBA", (8, 8), (128, 128, 128, 0)),
        lambda: Image.new("P", (8, 8), 0).convert("P"),
        lambda: Image.new("CMYK", (8, 8), (0, 0, 0, 127)),
        lambda: Image.fromarray(np.full((8, 8), 128 * 257, dtype=np.uint16)),
        lambda: Image.new("I", (8, 8), 128 * 257),
        lambda: Image.new("F", (8, 8), 0.5),
    ],
)
def test_any_mode_becomes_8bit_rgb(make):
    img = load_image(make())
    assert img.mode == "RGB" and img.size == (8, 8)


def test_sixteen_bit_grey_keeps_its_brightness():
    img = Image.fromarray(np.full((4, 4), 128 * 257, dtype=np.uint16))
    assert abs(np.asarray(load_image(img)).mean() - 128) <= 1


def test_arrays_and_tensors_are_accepted():
    chw = torch.rand(3, 16, 12)
    hwc = (np.random.rand(16, 12, 3) * 255).astype(np.uint8)
    assert load_image(chw).size == (12, 16)
    assert load_image(hwc).size == (12, 16)
    with pytest.raises(ImageError, match="values in \\[0, 1\\]"):
        load_image(torch.full((3, 4, 4), 2.0))
    with pytest.raises(ImageError, match="expected an image array"):
        load_image(np.zeros((5, 5, 7), dtype=np.uint8))


def test_missing_unreadable_and_truncated_files_are_named(tmp_path):
    with pytest.raises(ImageError, match="image file not found"):
        load_image(tmp_path / "none.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="cannot read image .*junk.png"):
        load_image(junk)
    good = tmp_path / "good.png"
    Image.fromarray((np.random.rand(64, 64, 3) * 255).astype(np.uint8)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(cut)


def test_encoded_bytes_decode_like_the_file_and_bad_bytes_are_named(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray((np.random.rand(20, 30, 3) * 255).astype(np.uint8)).save(good)
    assert np.array_equal(np.asarray(load_image(good.read_bytes())), np.asarray(load_image(good)))
    with pytest.raises(ImageError, match=r"cannot read image \(encoded bytes\): not an image file"):
        load_image(b"not an image")
    with pytest.raises(ImageError, match=r"\(encoded bytes\): the file is truncated or corrupt"):
        load_image(good.read_bytes()[:200])


def test_decompression_bomb_is_refused_unless_allowed(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12_000, 10_000)).save(bomb)  # 120 MP, a few KB on disk
    with pytest.raises(ImageError, match="120 MP, more than the 100 MP allowed"):
        load_image(bomb)
    assert load_image(bomb, max_pixels=None).size == (12_000, 10_000)
    assert Image.MAX_IMAGE_PIXELS is not None  # PIL's own guard is restored


def test_images_loaded_from_many_threads_leave_pils_guard_on(tmp_path):
    path = tmp_path / "small.png"
    Image.new("RGB", (8, 8)).save(path)
    limit = Image.MAX_IMAGE_PIXELS

    def load_many() -> None:
        for _ in range(300):
            load_image(path)

    threads = [threading.Thread(target=load_many) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert Image.MAX_IMAGE_PIXELS == limit is not None
