"""vLLM's server or ``fastvlm serve``? The same load test against each, one after the other, one table.

    python benchmarks/vllm_vs_fastvlm.py --make-model /tmp/m05 --clients 1,4,16,64 --max-tokens 32
    python benchmarks/vllm_vs_fastvlm.py --model DIR --serve-arg=--dtype=bf16 --vllm-arg=--enforce-eager

Run it in the environment that has vLLM (.venv-vllm: it has this package too). For each
engine in ``--engines`` (default: fastvlm, then vllm) ``fastvlm bench-serve --model DIR
--engine E --ignore-eos`` starts that server on a free 127.0.0.1 port, sends the same
seeded requests (same images, questions and ``max_tokens``; ``ignore_eos``, so every
answer has exactly ``max_tokens`` tokens on both), writes ``OUT/E/serve_load.{json,md}``
and stops the server; then ``OUT/vllm_vs_fastvlm.{md,json}`` put the engines side by side.

``--serve-arg`` flags go to ``fastvlm serve`` for both engines (``--dtype``,
``--max-batch-size``: mapped onto vLLM's); ``--vllm-arg`` flags go to vLLM's server only
(after ``--``). Every other flag is bench-serve's (``--clients``, ``--requests-per-client``,
``--time-limit``, ``--image-size``, ``--max-tokens``...), the same for both engines.

``--make-model DIR`` first writes the random-weight FastVLM-0.5B of benchmarks/serve_load.py
(512 px) in transformers' format, which both servers read, unless DIR already holds a model.
Not the authors' format: its padded byte tokenizer fills all 151,936 embedding rows, which
leaves vLLM's plugin no id for the image placeholder; the transformers format adds one.
"""

import argparse
import sys
import tempfile
from pathlib import Path

from serve_load import make_model

from fastvlm.bench.serve_compare import (
    COMPARISON_NAME,
    comparison_markdown,
    comparison_payload,
    read_run,
)
from fastvlm.bench.serve_load import write_report
from fastvlm.cli import main

ENGINES = ("fastvlm", "vllm")


def make_hf_model(folder: Path) -> None:
    """The random FastVLM-0.5B of serve_load.py, saved in transformers' format (with an <image> token)."""
    if (folder / "config.json").exists():
        print(f"using the model already in {folder}")
        return
    with tempfile.TemporaryDirectory() as ours:
        make_model(Path(ours) / "model")
        status = main(["convert", str(Path(ours) / "model"), str(folder), "--format", "hf"])
    if status:
        sys.exit(status)


def parse() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=True)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", type=Path, help="a checkpoint folder in the authors' or transformers' format")
    target.add_argument("--make-model", type=Path, metavar="DIR", help="write the random 0.5B model there first")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated, in the order they run")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG", help="to fastvlm serve, both")
    parser.add_argument("--vllm-arg", action="append", default=[], metavar="ARG", help="to vLLM's server only")
    parser.add_argument("--out", type=Path, default=Path("results") / COMPARISON_NAME)
    return parser.parse_known_args()


def run_engine(engine: str, model: Path, args: argparse.Namespace, bench_args: list[str]) -> Path:
    """bench-serve against ``engine``; the path of its serve_load.json."""
    out = args.out / engine
    command = ["bench-serve", "--model", str(model), "--engine", engine, "--ignore-eos", "--out", str(out)]
    command += [f"--serve-arg={arg}" for arg in args.serve_arg]
    command += [f"--vllm-arg={arg}" for arg in args.vllm_arg] if engine == "vllm" else []
    print(f"\n=== {engine}: fastvlm {' '.join(command + bench_args)}", flush=True)
    status = main(command + bench_args)
    if status:
        sys.exit(status)
    return out / "serve_load.json"


def run() -> None:
    args, bench_args = parse()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown or not engines:
        sys.exit(f"--engines takes {' and '.join(ENGINES)}, got {args.engines!r}")
    model = args.model or args.make_model
    if args.make_model:
        make_hf_model(args.make_model)
    runs = {engine: read_run(run_engine(engine, model, args, bench_args)) for engine in engines}
    markdown = comparison_markdown(runs)
    files = write_report(COMPARISON_NAME, args.out, comparison_payload(runs), markdown)
    print("\n" + markdown)
    print("wrote " + ", ".join(str(f) for f in files))


if __name__ == "__main__":
    run()
