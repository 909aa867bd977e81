"""What each quantized ONNX variant costs and buys: file size, onnxruntime CPU latency, and its
next-token distributions against the fp32 graphs (plus the PyTorch int8/int4 rows of fastvlm.quantization).

Quality is measured teacher-forced: the fp32 graphs answer a fixed, seeded set of prompts and
images greedily, and every variant then reads the same prompt + fp32 continuation in one pass,
so all variants see identical contexts. Per continuation position: does the variant's top-1
token equal fp32's (agreement), and KL(p_fp32 || p_variant) in nats (mean over positions).
Latency runs in one process for all variants: the vision encoder on one image at the model's
resolution, and one cached decode step (a new token after a prompt-sized past), medians of N.

The three graphs are driven directly with onnxruntime, by the input and output names the
exporter gives them (those Transformers.js reads): ``vision_encoder`` ``pixel_values`` →
``image_features``; ``embed_tokens`` ``input_ids`` → ``inputs_embeds``;
``decoder_model_merged`` ``inputs_embeds``, ``attention_mask``, ``position_ids``,
``past_key_values.{i}.key|value`` → ``logits``, ``present.{i}.key|value``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastvlm.export.quantize import GRAPHS, graph_bytes, variant_path
from fastvlm.processing import IMAGE_TOKEN_INDEX

QUESTIONS = (
    "What is in the image?",
    "Describe the picture in one sentence.",
    "How many objects can you see?",
    "What colour is the largest shape?",
    "Is there any text in the image? Read it.",
    "Where is the brightest part of the image?",
    "What would you call this scene?",
    "Answer with one word: is it day or night?",
)


@dataclass
class Sample:
    """One prompt: token ids with one ``IMAGE_TOKEN_INDEX`` placeholder, and its image."""

    ids: list[int]
    pixel_values: np.ndarray  # (1, 3, S, S) float32
    continuation: list[int] = field(default_factory=list)  # fp32's greedy answer


class OnnxGraphs:
    """The three sessions of one variant of an exported folder."""

    def __init__(self, folder: Path, variant: str, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.variant = variant
        self.sessions = {
            graph: ort.InferenceSession(
                str(variant_path(folder, graph, variant)), options, providers=["CPUExecutionProvider"]
            )
            for graph in GRAPHS
        }
        past = [i for i in self.sessions["decoder_model_merged"].get_inputs() if i.name.startswith("past_key")]
        self.past_names = [i.name for i in past]
        self.kv_shape = tuple(past[0].shape[1::2])  # (kv_heads, head_dim), numbers per the exporter

    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        (features,) = self.sessions["vision_encoder"].run(["image_features"], {"pixel_values": pixel_values})
        return features  # (1, tokens, hidden)

    def embed(self, ids: Sequence[int], pixel_values: np.ndarray) -> np.ndarray:
        """Prompt embeddings with the image features in place of the placeholder: (1, T, hidden)."""
        ids_array = np.array([[0 if t == IMAGE_TOKEN_INDEX else t for t in ids]], dtype=np.int64)
        (embeds,) = self.sessions["embed_tokens"].run(["inputs_embeds"], {"input_ids": ids_array})
        at = list(ids).index(IMAGE_TOKEN_INDEX)
        features = self.image_features(pixel_values)
        return np.concatenate([embeds[:, :at], features, embeds[:, at + 1 :]], axis=1)

    def empty_past(self) -> dict[str, np.ndarray]:
        heads, head_dim = self.kv_shape
        return {name: np.zeros((1, heads, 0, head_dim), dtype=np.float32) for name in self.past_names}

    def step(self, embeds: np.ndarray, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits (1, T, vocab) for ``embeds`` after ``past``, and the grown cache."""
        past_length = next(iter(past.values())).shape[2]
        total = past_length + embeds.shape[1]
        feeds = {
            "inputs_embeds": embeds,
            "attention_mask": np.ones((1, total), dtype=np.int64),
            "position_ids": np.arange(past_length, total, dtype=np.int64)[None],
            **past,
        }
        session = self.sessions["decoder_model_merged"]
        names = [o.name for o in session.get_outputs()]
        outputs = dict(zip(names, session.run(names, feeds), strict=True))
        present = {name: outputs[name.replace("past_key_values", "present")] for name in self.past_names}
        return outputs["logits"], present

    def token_embedding(self, token: int) -> np.ndarray:
        (embeds,) = self.sessions["embed_tokens"].run(
            ["inputs_embeds"], {"input_ids": np.array([[token]], dtype=np.int64)}
        )
        return embeds

    def greedy(self, sample: Sample, steps: int, stop: Sequence[int] = ()) -> list[int]:
        logits, past = self.step(self.embed(sample.ids, sample.pixel_values), self.empty_past())
        tokens: list[int] = []
        for _ in range(steps):
            token = int(logits[0, -1].argmax())
            tokens.append(token)
            if token in stop:
                break
            logits, past = self.step(self.token_embedding(token), past)
        return tokens

    def teacher_forced(self, sample: Sample) -> np.ndarray:
        """Next-token logits at each continuation position: (len(continuation), vocab)."""
        ids = sample.ids + sample.continuation[:-1]
        logits, _ = self.step(self.embed(ids, sample.pixel_values), self.empty_past())
        return logits[0, -len(sample.continuation) :]


def make_samples(tokenizer: object, image_size: int, count: int, seed: int = 0) -> list[Sample]:
    """``count`` prompts from QUESTIONS with seeded random images (uniform pixels in [0, 1])."""
    from fastvlm.processing import build_prompt, tokenize_prompt

    rng = np.random.default_rng(seed)
    return [
        Sample(
            ids=tokenize_prompt(tokenizer, build_prompt(QUESTIONS[i % len(QUESTIONS)])),  # type: ignore[arg-type]
            pixel_values=rng.random((1, 3, image_size, image_size), dtype=np.float32),
        )
        for i in range(count)
    ]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def agreement_and_kl(reference: Sequence[np.ndarray], actual: Sequence[np.ndarray]) -> tuple[float, float]:
    """Top-1 agreement and mean KL(reference || actual) over all positions of all samples."""
    ref = np.concatenate(list(reference))
    act = np.concatenate(list(actual))
    log_p, log_q = log_softmax(ref), log_softmax(act)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    return float((ref.argmax(-1) == act.argmax(-1)).mean()), float(kl.mean())


def median_ms(run: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def onnx_latency(graphs: OnnxGraphs, sample: Sample, repeats: int) -> tuple[float, float]:
    """Median ms of the vision encoder on one image, and of one cached decode step after the prompt."""
    vision = median_ms(lambda: graphs.image_features(sample.pixel_values), repeats)
    _, past = graphs.step(graphs.embed(sample.ids, sample.pixel_values), graphs.empty_past())
    token = graphs.token_embedding(int(sample.ids[-1]))
    decode = median_ms(lambda: graphs.step(token, past), repeats)
    return vision, decode


def onnx_folder_bytes(folder: Path, variant: str) -> int:
    return sum(graph_bytes(variant_path(folder, graph, variant)) for graph in GRAPHS)


def onnx_exact_match(graphs: OnnxGraphs, folder: Path, data_file: Path, tokenizer: object) -> float:
    """Greedy answers (16 tokens at most, as ``fastvlm data score``) equal to the records' answers."""
    from fastvlm.files import read_json
    from fastvlm.processing import DEFAULT_IMAGE_TOKEN, ImageProcessor, build_prompt, tokenize_prompt
    from fastvlm.train.data import iter_records

    config = read_json(folder / "config.json")
    stop = read_json(folder / "generation_config.json").get("eos_token_id", [])
    stop = [stop] if isinstance(stop, int) else list(stop)
    size = read_json(folder / "preprocessor_config.json")["crop_size"]["height"]
    processor = ImageProcessor(size, config.get("image_aspect_ratio", "pad"))
    hits = []
    for record in iter_records(data_file, strict=True):
        question = record.turns[0][1].replace(DEFAULT_IMAGE_TOKEN, "").strip()
        sample = Sample(
            ids=tokenize_prompt(tokenizer, build_prompt(question)),  # type: ignore[arg-type]
            pixel_values=processor(record.image)[None].numpy(),  # type: ignore[arg-type]
        )
        tokens = [t for t in graphs.greedy(sample, 16, stop) if t not in stop]
        answer = tokenizer.decode(tokens, skip_special_tokens=True)  # type: ignore[attr-defined]
        hits.append(answer.strip() == record.turns[1][1].strip())
    return sum(hits) / max(len(hits), 1)


# ----------------------------------------------------------------------------- PyTorch rows


class TorchModel:
    """The PyTorch model (fp32, or int8/int4 through fastvlm.quantization) behind the same measurements."""

    def __init__(self, model_path: Path, quantization: str | None) -> None:
        import torch

        from fastvlm.model import FastVLM

        self.torch = torch
        self.model = FastVLM.from_pretrained(model_path, quantization=quantization).eval()
        self.variant = f"torch {quantization}" if quantization else "torch fp32"

    def total_bytes(self) -> int:
        from fastvlm.quantization import tensor_bytes

        tensors = {id(t): t for t in [*self.model.parameters(), *self.model.buffers()]}
        return sum(tensor_bytes(t) for t in tensors.values())

    def teacher_forced(self, sample: Sample) -> np.ndarray:
        torch = self.torch
        ids = torch.tensor([sample.ids + sample.continuation[:-1]])
        with torch.inference_mode():
            logits = self.model(ids, pixel_values=torch.from_numpy(sample.pixel_values)).logits
        return logits[0, -len(sample.continuation) :].float().numpy()

    def latency(self, sample: Sample, repeats: int) -> tuple[float, float]:
        """As :func:`onnx_latency`; the cache grows by one token per timed step (negligible)."""
        torch = self.torch
        pixels = torch.from_numpy(sample.pixel_values)
        lm = self.model.language_model
        with torch.inference_mode():
            vision = median_ms(lambda: self.model.encode_images(pixels), repeats)
            inputs = self.model.prepare_inputs(torch.tensor([sample.ids]), pixel_values=pixels)
            past = lm(inputs_embeds=inputs.inputs_embeds, use_cache=True).past_key_values
            token = torch.tensor([[sample.ids[-1]]])
            decode = median_ms(lambda: lm(input_ids=token, past_key_values=past, use_cache=True), repeats)
        return vision, decode


# ----------------------------------------------------------------------------- the table


@dataclass
class Row:
    variant: str
    runtime: str
    bytes: int
    vision_ms: float
    decode_ms: float
    top1_agreement: float
    kl: float
    exact_match: float | None = None


def measure(
    folder: Path,
    variants: Sequence[str],
    samples: list[Sample],
    *,
    steps: int,
    repeats: int,
    stop: Sequence[int] = (),
    data: tuple[Path, object] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[list[Row], list[np.ndarray]]:
    """fp32 first (it sets the continuations), then each variant, in this one process.

    Returns the rows and fp32's teacher-forced logits (the reference of the torch rows).
    ``data`` (a JSONL file in the training format and the tokenizer) adds exact match.
    """
    reference = OnnxGraphs(folder, "fp32")
    for sample in samples:
        sample.continuation = reference.greedy(sample, steps, stop) or [0]
    ref_logits = [reference.teacher_forced(s) for s in samples]
    rows = []
    for variant in ["fp32", *variants]:
        graphs = reference if variant == "fp32" else OnnxGraphs(folder, variant)
        vision, decode = onnx_latency(graphs, samples[0], repeats)
        top1, kl = agreement_and_kl(ref_logits, [graphs.teacher_forced(s) for s in samples])
        rows.append(Row(variant, "onnxruntime", onnx_folder_bytes(folder, variant), vision, decode, top1, kl))
        if data is not None:
            rows[-1].exact_match = onnx_exact_match(graphs, folder, *data)
        log(format_row(rows[-1]))
    return rows, ref_logits


def measure_torch(
    model_path: Path,
    quantizations: Sequence[str | None],
    samples: list[Sample],
    reference: list[np.ndarray],
    *,
    repeats: int,
    data: Path | None = None,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """The PyTorch rows, against the same fp32 ONNX distributions and continuations."""
    rows = []
    for quantization in quantizations:
        model = TorchModel(model_path, quantization)
        vision, decode = model.latency(samples[0], repeats)
        top1, kl = agreement_and_kl(reference, [model.teacher_forced(s) for s in samples])
        rows.append(Row(model.variant, "torch", model.total_bytes(), vision, decode, top1, kl))
        if data is not None:
            from fastvlm.train.synth import exact_match

            rows[-1].exact_match = exact_match(model.model, data, progress=False)["accuracy"]
        log(format_row(rows[-1]))
        del model
    return rows


HEADER = (
    "| variant | runtime | size (MB) | vision encoder (ms) | decode (ms/token) | top-1 agreement | mean KL (nats) |"
)


def format_row(row: Row) -> str:
    line = (
        f"| {row.variant} | {row.runtime} | {row.bytes / 1e6:,.1f} | {row.vision_ms:,.1f} "
        f"| {row.decode_ms:,.1f} | {row.top1_agreement:.3f} | {row.kl:.4f} |"
    )
    return line if row.exact_match is None else f"{line} {row.exact_match:.1%} |"


def markdown_table(rows: Sequence[Row]) -> str:
    scored = any(row.exact_match is not None for row in rows)
    header = HEADER + (" exact match |" if scored else "")
    rule = "|---|---|" + "---:|" * (header.count("|") - 3)
    return "\n".join([header, rule, *(format_row(row) for row in rows)])
