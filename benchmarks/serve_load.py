"""Load test and soak of ``fastvlm serve``: 1/4/16/64 streaming clients, then 1,000 mixed requests.

    python benchmarks/serve_load.py --make-model results/serve/model_0.5b_512          # the issue's run
    python benchmarks/serve_load.py --model DIR --clients 1,4,16 --requests-per-client 2
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --server-pid PID --soak 1000

Per level: requests/s, output tokens/s and its ratio to one client, p50/p99 TTFT (time to
the first streamed text) and end-to-end latency, errors. The soak checks that no valid
request is lost, every invalid one gets a 4xx JSON error, and the server's memory stays
flat. Same as ``fastvlm bench-serve``; results go to results/serve/ by default.

``--make-model DIR`` first writes a FastVLM-0.5B-sized model with random weights there
(FastViTHD at 512 px, Qwen2-0.5B, inference-form tower) unless DIR already holds one, and
serves it. Its tokenizer is the offline byte tokenizer padded to Qwen2's 151,936 ids, so
every token the random weights pick decodes to text (``<v123>``) and is streamed: with a
small tokenizer most ids would decode to nothing and TTFT could not be seen.
"""

import argparse
import sys
import tempfile
from pathlib import Path

from fastvlm.cli import main

LLM = "0.5b"
IMAGE_SIZE = 512


def make_model(folder: Path, *, image_token: bool = False) -> None:
    """A random FastVLM-0.5B at 512 px in ``folder`` (kept if it is already there).

    ``image_token`` keeps the tokenizer's last id for ``<image>``: graphs and engines that take
    images as an in-vocabulary id (ONNX, vLLM) need one, and the padded tokenizer otherwise
    fills every embedding row.
    """
    from fastvlm.bench.tokenizer import padded_byte_tokenizer
    from fastvlm.presets import fastvlm_config

    if (folder / "config.json").exists():
        print(f"using the model already in {folder}")
        return
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        vocab_size = fastvlm_config(LLM).text.vocab_size
        tokenizer = padded_byte_tokenizer(vocab_size - 1 if image_token else vocab_size)
        if image_token:
            tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
        tokenizer.save_pretrained(tokenizer_dir)
        init = ["init", "--llm", LLM, "--tokenizer", tokenizer_dir, "--image-size", str(IMAGE_SIZE)]
        status = main([*init, "--tower-form", "inference", str(folder)])
    if status:
        sys.exit(status)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--make-model", type=Path)
    known, rest = parser.parse_known_args()
    if known.make_model:
        make_model(known.make_model)
        rest = ["--model", str(known.make_model), *rest]
    sys.exit(main(["bench-serve", *rest]))
