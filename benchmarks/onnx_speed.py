"""onnxruntime (CPU) vs PyTorch in one process: the vision encoder at 1024 px, and decode tokens/s.

    python benchmarks/onnx_speed.py                        # FastVLM-0.5B-sized, random weights
    python benchmarks/onnx_speed.py --layers 6 --repeats 3 # a shallower decoder (quicker to export)
    python benchmarks/onnx_speed.py --skip-decode          # the vision encoder only

The model is ``fastvlm_config("0.5b")`` (the real FastViTHD tower and Qwen2-0.5B decoder)
with random weights, fused for inference as ``FastVLM.from_pretrained`` leaves it. The
graphs are exported by :mod:`fastvlm.export.onnx` into a temporary folder (only the ones
measured). Vision: median latency of one 1024 px image through the tower + projector,
PyTorch (fused tower, oneDNN kernels) and onnxruntime interleaved. Decode: greedy
tokens/s after a text prompt of ``--prompt-tokens``, PyTorch's ``generate_tokens`` and
:class:`fastvlm.export.runner.OnnxFastVLM` on the same ids (stop tokens off). Ratios are
onnxruntime / PyTorch: for latency below 1 means onnxruntime is faster, for tokens/s above 1.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from fastvlm.export.onnx import export_decoder, export_embed_tokens, export_vision_encoder, head_dim
from fastvlm.export.runner import OnnxFastVLM, graph_path
from fastvlm.generation import Timings, generate_tokens
from fastvlm.measure import machine_description, machine_line, median_latency_ms
from fastvlm.model import FastVLM
from fastvlm.presets import fastvlm_config, resize_text_config


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--layers", type=int, help="decoder depth (default: Qwen2-0.5B's 24)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, help="torch and onnxruntime threads (default: their own choice)")
    p.add_argument("--skip-decode", action="store_true")
    return p.parse_args()


def build_model(args: argparse.Namespace) -> FastVLM:
    config = fastvlm_config("0.5b", image_size=args.image_size)
    if args.layers:
        config.text = resize_text_config(config.text, num_hidden_layers=args.layers)
    model = FastVLM.from_config(config)
    model.vision_tower.fuse()
    return model.eval()


def onnx_runner(model: FastVLM, folder: Path, threads: int | None) -> OnnxFastVLM:
    """An :class:`OnnxFastVLM` over the graphs in ``folder`` (no tokenizer: ids in, ids out)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    sessions = {
        graph: ort.InferenceSession(str(graph_path(folder, graph)), options, providers=["CPUExecutionProvider"])
        for graph in ("vision_encoder", "embed_tokens", "decoder_model_merged")
        if graph_path(folder, graph).is_file()
    }
    text = model.config.text
    config: dict[str, Any] = {
        "image_size": model.config.image_size,
        "image_token_index": -1,  # no image positions: text-only prompts
        "tokens_per_image": model.config.num_image_tokens(),
        "num_hidden_layers": text.num_hidden_layers,
        "max_position_embeddings": text.max_position_embeddings,
        "head_dim": head_dim(model),
    }
    return OnnxFastVLM(folder, sessions, None, config, {})  # type: ignore[arg-type]  # no tokenizer needed


def vision(model: FastVLM, folder: Path, args: argparse.Namespace) -> dict[str, float]:
    import onnxruntime as ort

    export_vision_encoder(model, graph_path(folder, "vision_encoder"))
    options = ort.SessionOptions()
    if args.threads:
        options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(
        str(graph_path(folder, "vision_encoder")), options, providers=["CPUExecutionProvider"]
    )
    pixels = torch.rand(1, 3, args.image_size, args.image_size)
    feed = {"pixel_values": pixels.numpy()}
    with torch.inference_mode():
        reference = model.encode_images(pixels)
        ours = torch.from_numpy(session.run(None, feed)[0])
        diff = ((ours - reference).abs().max() / reference.abs().max().clamp(min=1)).item()
        times = median_latency_ms(
            {
                "torch": lambda: model.encode_images(pixels),
                "onnxruntime": lambda: session.run(None, feed),
            },
            torch.device("cpu"),
            repeats=args.repeats,
        )
    return {**times, "max_relative_diff": diff}


def decode(model: FastVLM, folder: Path, args: argparse.Namespace) -> dict[str, float]:
    export_embed_tokens(model, graph_path(folder, "embed_tokens"))
    export_decoder(model, graph_path(folder, "decoder_model_merged"))
    runner = onnx_runner(model, folder, args.threads)
    runner.stop_ids = set()
    ids = torch.randint(10, 1000, (1, args.prompt_tokens))
    rates: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
    tokens: dict[str, list[int]] = {}
    for _ in range(2):  # the first round warms both up; the second is reported
        steps = list(generate_tokens(model, ids, max_new_tokens=args.new_tokens))
        torch_tokens = [int(token[0]) for token, _ in steps]
        torch_timings = steps[-1][1]
        onnx_timings = Timings()
        onnx_tokens = [step.token for step in runner.steps(ids[0].tolist(), None, args.new_tokens, onnx_timings)]
        rates["torch"].append(torch_timings.decode_tokens_per_s)
        rates["onnxruntime"].append(onnx_timings.decode_tokens_per_s)
        tokens = {"torch": torch_tokens, "onnxruntime": onnx_tokens}
    return {
        "torch": rates["torch"][-1],
        "onnxruntime": rates["onnxruntime"][-1],
        "same_tokens": float(tokens["torch"] == tokens["onnxruntime"]),
    }


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args)
    text = model.config.text
    print(f"{machine_line(machine_description())}; decoder {text.num_hidden_layers} layers, {args.image_size} px")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "onnx").mkdir()
        v = vision(model, folder, args)
        print(
            f"vision encoder {args.image_size} px: torch (fused) {v['torch']:.0f} ms, onnxruntime "
            f"{v['onnxruntime']:.0f} ms, ratio onnxruntime/torch {v['onnxruntime'] / v['torch']:.2f} "
            f"(max relative diff {v['max_relative_diff']:.1e})"
        )
        (folder / "onnx" / "vision_encoder.onnx").unlink()
        if args.skip_decode:
            return
        d = decode(model, folder, args)
        print(
            f"decode ({args.prompt_tokens}-token prompt, {args.new_tokens} new): torch {d['torch']:.1f} tokens/s, "
            f"onnxruntime {d['onnxruntime']:.1f} tokens/s, ratio onnxruntime/torch "
            f"{d['onnxruntime'] / d['torch']:.2f}; same greedy tokens: {bool(d['same_tokens'])}"
        )


if __name__ == "__main__":
    main()
