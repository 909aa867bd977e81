"""Commands about one checkpoint: predict, chat, convert, info, convert-tower, init.

Each command's flags are registered next to its handler. The handlers only read
flags, call the library and print; a model is loaded after the cheap checks
(the image file, the output path) so a mistake is reported before the wait.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fastvlm.cli.common import (
    CHECKPOINT_FORMATS,
    DTYPES,
    Subparsers,
    add_dtype,
    add_llm_size,
    add_model_arguments,
    generation_kwargs,
    load_model,
    result_report,
)
from fastvlm.cli.export import add_backend_arguments, predict_onnx
from fastvlm.errors import ConfigError, FastVLMError, OutputExistsError, UsageError
from fastvlm.processing import DEFAULT_MAX_PIXELS, load_image
from fastvlm.quantization import QUANTIZATIONS
from fastvlm.vision.layouts import TOWER_LAYOUTS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from fastvlm.model import FastVLMConfig

CHAT_END_WORDS = ("exit", "quit")
RELEASED_IMAGE_SIZE = 1024  # the input side of the released checkpoints (apple/ml-fastvlm)


def register(subparsers: Subparsers) -> None:
    _register_predict_and_chat(subparsers)
    _register_conversions(subparsers)
    _register_init(subparsers)


# ------------------------------------------------------------------------------ predict, chat


def _register_predict_and_chat(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("predict", help="answer a question about an image")
    add_model_arguments(p, auto_dtype=True)
    p.add_argument("--image", help="image file (omit for a text-only prompt)")
    p.add_argument("--prompt", required=True, help="the question, or a full qwen_2 prompt with <image>")
    p.add_argument("--json", action="store_true", help="print text, token ids and timings as JSON")
    add_backend_arguments(p)
    _add_quantization(p)
    p.set_defaults(func=cmd_predict)

    p = subparsers.add_parser("chat", help="an interactive conversation about an image")
    add_model_arguments(p, auto_dtype=True)
    p.add_argument("--image", help="image file (omit for text-only chat)")
    _add_quantization(p)
    p.set_defaults(func=cmd_chat)


def _add_quantization(parser: argparse.ArgumentParser) -> None:
    """``--quantization int8|int4``: torchao weight-only quantization of the decoder (fastvlm.quantization)."""
    parser.add_argument(
        "--quantization",
        choices=list(QUANTIZATIONS),
        help="quantize the decoder's linear weights with torchao after loading (int4 on CPU is fastest with "
        "--dtype bf16; on CUDA it needs it)",
    )


def cmd_predict(args: argparse.Namespace) -> None:
    from fastvlm.generation import GenerationResult, TextStream  # transformers: only when a command needs it

    if args.backend == "onnx":
        predict_onnx(args)
        return
    image = None
    if args.image is not None:  # decode (and reject a bad image) before spending time on the model
        image = load_image(args.image, max_pixels=None if args.allow_large_images else DEFAULT_MAX_PIXELS)
    model = load_model(args)
    # The image was decoded above; only resize and normalise it now (it is never decoded twice).
    pixels = None if image is None else model.image_processor.preprocess(image)[None]
    if args.json:
        result = model.generate(prompt=args.prompt, pixel_values=pixels, **generation_kwargs(args))
        assert isinstance(result, GenerationResult)  # one prompt, not streamed
        print(json.dumps(result_report(result), indent=2))
        return
    stream = model.generate(prompt=args.prompt, pixel_values=pixels, stream=True, **generation_kwargs(args))
    assert isinstance(stream, TextStream)
    for piece in stream:
        print(piece, end="", flush=True)
    print()
    assert stream.result is not None  # set once the stream is exhausted
    t = stream.result.timings
    print(
        f"[vision {t.vision_ms:.0f} ms, prefill {t.prefill_ms:.0f} ms, TTFT {t.ttft_ms:.0f} ms, "
        f"{t.decode_tokens_per_s:.1f} tokens/s]",
        file=sys.stderr,
    )


def cmd_chat(args: argparse.Namespace) -> None:
    from fastvlm.generation import TextStream

    model = load_model(args)
    session = model.chat(args.image)
    print("Chat about the image; an empty line, 'exit' or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            break
        if not question or question in CHAT_END_WORDS:
            break
        print("fastvlm> ", end="", flush=True)
        try:
            answer = session.ask(question, stream=True, **generation_kwargs(args))
            assert isinstance(answer, TextStream)
            for piece in answer:
                print(piece, end="", flush=True)
        except FastVLMError as err:  # e.g. the conversation outgrew the context: say so, keep the session
            print(f"\n[error: {err}]", file=sys.stderr)
            continue
        print()


# ------------------------------------------------------------------------------ convert, info, convert-tower


def _register_conversions(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("convert", help="rewrite a FastVLM checkpoint folder in another format")
    p.add_argument("src", help="checkpoint folder or hub id (any format)")
    p.add_argument("dst", help="output folder")
    p.add_argument("--format", choices=list(CHECKPOINT_FORMATS), required=True)
    add_dtype(p, help="cast the weights (default: keep them as stored)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = subparsers.add_parser("info", help="describe a vision-tower checkpoint (.safetensors or .bin)")
    p.add_argument("path")
    p.set_defaults(func=cmd_info)

    p = subparsers.add_parser("convert-tower", help="rewrite a vision-tower checkpoint in another key layout")
    p.add_argument("src", help="input .safetensors/.bin (any layout, prefixed or not)")
    p.add_argument("dst", help="output .safetensors")
    p.add_argument("--layout", choices=list(TOWER_LAYOUTS), required=True)
    p.add_argument("--prefix", action="store_true", help="add the prefix the tower has inside a full checkpoint")
    p.add_argument("--reparameterize", action="store_true", help="convert a training-form tower to the inference form")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert_tower)


def _refuse_to_overwrite(dst: Path, overwrite: bool, what: str) -> None:
    if dst.exists() and not overwrite:
        raise OutputExistsError(f"{dst} exists; pass --overwrite to replace {what}")


def cmd_convert(args: argparse.Namespace) -> None:
    from fastvlm.model import FastVLM

    dst = Path(args.dst)
    _refuse_to_overwrite(dst, args.overwrite, "the checkpoint files in it")
    model = FastVLM.from_pretrained(args.src, fuse=False, dtype=DTYPES[args.dtype] if args.dtype else None)
    model.save_pretrained(dst, format=args.format, overwrite=args.overwrite)
    print(f"wrote {dst} in the {args.format} format")


def cmd_info(args: argparse.Namespace) -> None:
    from fastvlm.files import read_state_dict
    from fastvlm.vision import FastViT
    from fastvlm.vision.layouts import detect_tower_layout, extract_tower_state_dict

    state_dict = read_state_dict(args.path)
    tensors, prefix = extract_tower_state_dict(state_dict)
    layout = detect_tower_layout(tensors)
    model = FastViT.from_state_dict(state_dict, device="meta")
    cfg = model.config
    report = {
        "layout": layout,
        "prefix": prefix,
        "form": "inference" if cfg.inference_mode else "training",
        "parameters": model.num_parameters(),
        "config": cfg.to_dict(),
        "has_clip_head": "head.proj" in tensors,
    }
    print(json.dumps(report, indent=2))


def cmd_convert_tower(args: argparse.Namespace) -> None:
    from fastvlm.files import read_state_dict, save_safetensors_atomic
    from fastvlm.vision import FastViT
    from fastvlm.vision.layouts import convert_tower_state_dict, extract_tower_state_dict

    src, dst = Path(args.src), Path(args.dst)
    _refuse_to_overwrite(dst, args.overwrite, "it")
    if dst.suffix != ".safetensors":
        raise UsageError(f"output must be a .safetensors file, got {dst}")
    state_dict = read_state_dict(src)
    if args.reparameterize:
        head = extract_tower_state_dict(state_dict)[0].get("head.proj")
        state_dict = FastViT.from_state_dict(state_dict, dtype=None).reparameterize().state_dict()
        if head is not None:  # the unused CLIP head travels along unchanged
            state_dict["head.proj"] = head
    out = convert_tower_state_dict(state_dict, args.layout, prefix=args.prefix)
    save_safetensors_atomic(out, dst, metadata={"format": "pt", "fastvlm_tower_layout": args.layout})
    print(f"wrote {len(out)} tensors in the {args.layout} layout to {dst}")


# ------------------------------------------------------------------------------ init


def _register_init(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("init", help="write a randomly initialised FastVLM checkpoint (to train from scratch)")
    p.add_argument("out", help="folder to create")
    p.add_argument("--like", help="copy the architecture and tokenizer of this checkpoint (weights are not copied)")
    add_llm_size(p, help="released architecture (no --like)")
    p.add_argument("--tokenizer", help="tokenizer folder or hub id (with --llm)")
    p.add_argument("--image-size", type=int, help="input resolution (a multiple of 64 for FastViTHD)")
    p.add_argument(
        "--tower-form",
        choices=["train", "inference"],
        default="train",
        help="train: the multi-branch form with batch norms that trains from scratch (default); inference: the "
        "re-parameterised form of released checkpoints",
    )
    p.add_argument("--hidden-size", type=int, help="change the LLM's width")
    p.add_argument("--layers", type=int, help="change the LLM's depth")
    p.add_argument("--heads", type=int, help="attention heads")
    p.add_argument("--kv-heads", type=int, help="key/value heads (grouped-query attention)")
    p.add_argument("--intermediate-size", type=int, help="MLP width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_init)


def cmd_init(args: argparse.Namespace) -> None:
    from fastvlm.model import FastVLM
    from fastvlm.presets import resize_text_config

    config, tokenizer = _init_architecture(args)
    config.vision = config.vision.replace(inference_mode=args.tower_form == "inference")
    config.text = resize_text_config(
        config.text,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate_size,
    )
    if args.image_size:
        if args.image_size % config.vision.stride:
            raise ConfigError(f"--image-size must be a multiple of the tower's stride {config.vision.stride}")
        config.image_size = args.image_size
    model = FastVLM.from_config(config, seed=args.seed)
    model.tokenizer = tokenizer
    path = model.save_pretrained(args.out, overwrite=args.overwrite)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"wrote a randomly initialised FastVLM ({params:.1f}M parameters, {config.image_size} px) to {path}")


def _init_architecture(args: argparse.Namespace) -> tuple[FastVLMConfig, PreTrainedTokenizerBase | None]:
    """The config and tokenizer to start from: another checkpoint's (--like) or a released size's."""
    from fastvlm.model import FastVLM
    from fastvlm.presets import fastvlm_config

    if args.like:
        source = FastVLM.from_pretrained(args.like, fuse=False)
        return source.config, source.tokenizer
    from transformers import AutoTokenizer

    if not args.tokenizer:
        raise UsageError("--llm needs --tokenizer (a folder or hub id), e.g. Qwen/Qwen2-0.5B-Instruct")
    config = fastvlm_config(args.llm, image_size=args.image_size or RELEASED_IMAGE_SIZE)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if len(tokenizer) > config.text.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens, more than the LLM's {config.text.vocab_size}")
    return config, tokenizer
