"""The ``fastvlm`` command line.

Subcommands:
  predict --model M --image F --prompt P   answer a question about an image (streams; --json for details)
  chat --model M [--image F]               an interactive conversation about an image
  convert SRC DST --format F               rewrite a FastVLM checkpoint folder (fastvlm, apple or hf format)
  info PATH                                layout, form, architecture and size of a tower checkpoint
  convert-tower SRC DST --layout L         rewrite a tower checkpoint in another layout (optionally re-parameterised)
  init OUT --like CKPT | --llm SIZE        a randomly initialised FastVLM checkpoint (to train from scratch)
  data synth --out DIR --num N             synthetic image-question-answer data (LLaVA format)
  data check FILE [--image-root DIR]       read a LLaVA-format data file and report bad records
  data score --model M FILE                exact-match accuracy of greedy answers (synthetic sets)
  train --model M --data F --output-dir D  train / fine-tune (stage presets; DDP/FSDP under torchrun)
  eval --model M --tasks all --data DIR    score a model on the paper's benchmarks from local data
  eval-rescore --out DIR                   score an eval run's saved predictions again
  serve --model M [--port 8000]            OpenAI-compatible server: chat completions, page at /, /metrics
  bench [--quick]                          the paper's efficiency study: encoders, resolutions, LLMs, TTFT, plots
  bench-ttft                               TTFT of a FastVLM-sized model by resolution (also benchmarks/ttft.py)
  bench-train                              training throughput of a FastVLM-sized model (samples/s; also benchmarks/)
  bench-eval                               evaluation throughput by batch size (also benchmarks/eval_throughput.py)
  bench-encoder                            FastViTHD latency, unfused vs fused (also benchmarks/encoder_latency.py)
  bench-gpu [--smoke]                      0.5B/1.5B/7B on a GPU vs transformers: encoder, TTFT, decode, memory
  bench-serve --model M | --url U          load test (1/4/16/64 clients) and soak of an OpenAI-compatible server
  bench-limits                             encoder, prefill, decode against this machine's matmul rate, bandwidth
  bench-vs-transformers                    ours vs transformers' FastVLM on the same weights (needs timm: .venv-hf)
  export onnx MODEL OUT                    ONNX graphs for onnxruntime / Transformers.js (predict --backend onnx)
  export coreml MODEL OUT                  the vision encoder as a Core ML package
  tune-precision MODEL [--retune]          per-stage precision (fp32/bf16/int8) measured here, cached

One module per command group (:mod:`~fastvlm.cli.model`, :mod:`~fastvlm.cli.data`,
:mod:`~fastvlm.cli.train`, :mod:`~fastvlm.cli.eval`, :mod:`~fastvlm.cli.serve`,
:mod:`~fastvlm.cli.bench`, :mod:`~fastvlm.cli.export`, :mod:`~fastvlm.cli.precision`), each with
``register(subparsers)`` that adds its commands with their flags next to their handlers;
flags several commands share live in :mod:`~fastvlm.cli.common`.

Errors: a :class:`~fastvlm.errors.FastVLMError` (a bad path, checkpoint, image, prompt or
flag) prints one line, ``fastvlm <command>: error: <message>``, and exits with status 2;
``fastvlm --debug ...`` prints its traceback as well. Any other exception is a bug and
propagates with its traceback. Ctrl-C exits with status 130.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from fastvlm.allocator import keep_freed_memory_unless_disabled
from fastvlm.cli import bench, data, export, model, precision, serve, train
from fastvlm.cli import eval as evaluation
from fastvlm.errors import FastVLMError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C

COMMAND_GROUPS = (model, data, train, evaluation, serve, bench, export, precision)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastvlm", description="FastVLM: fast vision-language inference.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.register(subparsers)
    return parser


def run() -> int:
    """The ``fastvlm`` program: :func:`main` in a process that keeps freed memory (:mod:`fastvlm.allocator`)."""
    keep_freed_memory_unless_disabled()
    return main()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except FastVLMError as err:
        if args.debug:
            traceback.print_exc()
        print(f"fastvlm {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
