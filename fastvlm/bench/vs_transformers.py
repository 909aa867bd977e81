"""Ours against transformers' ``FastVlmForConditionalGeneration``: the same weights, one process.

One checkpoint in transformers' ``fast_vlm`` format (a random FastVLM-sized model written
with our ``save_pretrained(format="hf")``, or one given) is loaded by both: ours with
``FastVLM.from_pretrained`` and the tower fused in the run's dtype, theirs with their
``from_pretrained`` in the same dtype. So the weights are identical, and in bf16 both
round the same fp32 tensors.

Each measurement alternates between the two models call by call (and which goes first
alternates by round), so that a neighbour's load on a shared machine falls on both
alike. A round times, for each model at batch 1 from pixels already in memory (image
preprocessing excluded): the encoder (tower + projector), the prefill of the whole prompt
with the visual tokens given, TTFT (encoder + prefill + the first greedy token, through
each one's generation API) and a greedy generation of ``new_tokens`` tokens. Decode
tokens/s is (``new_tokens`` - 1) over the time from the generation's first token to its
last, as each API hands them out (our generator's yields; transformers' streamer calls),
the same clock for both. Theirs is measured through
:func:`fastvlm.bench.gpu_transformers.latency_calls`, the calls of ``fastvlm bench-gpu``.

Each round's generation starts from its own seeded image and prompt, and the greedy
tokens of both models are compared there: the agreement column counts the identical
sequences and gives, for the others, the index of the first differing new token.

transformers' FastVLM tower is a timm model; where timm or the class is missing (our main
environment), :func:`transformers_fastvlm` says how to build the side environment.
"""

from __future__ import annotations

import gc
import importlib.metadata
import importlib.util
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from fastvlm.bench.gpu_common import DTYPE_NAMES, model_config, random_pixels
from fastvlm.bench.ttft import prompt_ids
from fastvlm.decoding import prefill
from fastvlm.errors import CheckpointError, ConfigError
from fastvlm.files import read_json
from fastvlm.generation import generate_tokens
from fastvlm.measure import machine_description, machine_line, synchronize
from fastvlm.model import FastVLM

OURS, THEIRS = "fastvlm", "transformers"
KINDS = ("encoder", "prefill", "ttft")  # timed on one input each round
GENERATION = ("generate", "decode")  # each round's generation, on its own input: all of it, its decode steps
REPORT_JSON = "vs_transformers.json"
REPORT_MD = "vs_transformers.md"
ENV_HINT = "run `bash benchmarks/transformers_env.sh` and use `.venv-hf/bin/fastvlm bench-vs-transformers`"
# issue 15's targets: (TTFT ratio, decode ratio) per dtype, both models in that dtype
TARGETS = {"float32": (1.4, 1.2), "bfloat16": (2.0, 1.2)}
TOWER_ARCHITECTURE = "fastvit_mci3"  # the timm model transformers' FastVLM tower builds


@dataclass(frozen=True)
class CompareSettings:
    """What one run measures (defaults: the issue's side-by-side at 1024 px)."""

    size: str = "0.5b"  # the random model's decoder size (or "tiny" for tests); unused with a --model
    resolutions: tuple[int, ...] = (1024,)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    text_tokens: int = 32  # around the image marker
    new_tokens: int = 32  # per generation: the decode measurement and the greedy comparison
    repeats: int = 5  # timed rounds; each generation has its own seeded image and prompt
    warmup: int = 1  # untimed rounds first
    device: str = "cpu"
    full_head: bool = False  # our greedy steps read the whole head instead of its int8 screen (fastvlm.greedy_head)

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.warmup < 0 or self.text_tokens < 2 or self.new_tokens < 2:
            raise ConfigError(
                "repeats must be at least 1, warmup at least 0, text_tokens and new_tokens at least 2 "
                "(one prefill token and one decode step)"
            )
        unknown = [d for d in self.dtypes if d not in DTYPE_NAMES]
        if unknown or not self.dtypes:
            raise ConfigError(f"dtypes must be among {sorted(DTYPE_NAMES)}, got {list(self.dtypes)}")


@dataclass
class SideTimes:
    """One model's medians over the timed rounds."""

    encoder_ms: float
    prefill_ms: float
    ttft_ms: float
    generate_ms: float  # new_tokens greedy tokens from pixels
    decode_tokens_per_s: float  # new_tokens - 1 over the time from the first token to the last


@dataclass
class CompareRow:
    """Both models at one dtype and resolution."""

    dtype: str
    resolution: int
    visual_tokens: int
    prompt_tokens: int  # ours and theirs: text + visual tokens in the prefill
    new_tokens: int
    rounds: int
    ours: SideTimes
    theirs: SideTimes
    ttft_ratio: float  # theirs / ours, of the medians: how many times shorter ours is
    ttft_ratio_range: tuple[float, float]  # the lowest and highest ratio within one round
    decode_ratio: float  # ours / theirs tokens/s
    decode_ratio_range: tuple[float, float]
    first_divergence: list[int | None]  # per round's prompt: first differing new token (None: identical)


@dataclass
class CompareReport:
    meta: dict
    settings: dict
    rows: list[CompareRow] = field(default_factory=list)
    elapsed_s: float = 0.0


# ------------------------------------------------------------------------------ transformers' side


def transformers_fastvlm() -> Any:
    """transformers' ``FastVlmForConditionalGeneration``, or a one-line ConfigError saying how to get it."""
    if importlib.util.find_spec("timm") is None:
        raise ConfigError(f"transformers' FastVLM needs timm, which is not installed here; {ENV_HINT}")
    try:
        from transformers import FastVlmForConditionalGeneration
    except ImportError as err:
        reason = " ".join(str(err).split())
        message = f"transformers' FastVlmForConditionalGeneration is unavailable ({reason}); {ENV_HINT}"
        raise ConfigError(message) from None
    import timm

    if not timm.is_model(TOWER_ARCHITECTURE):
        raise ConfigError(f"timm {timm.__version__} has no {TOWER_ARCHITECTURE} (needs 1.0.20 or newer); {ENV_HINT}")
    return FastVlmForConditionalGeneration


def load_theirs(folder: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """Their model from ``folder`` in ``dtype``, never stopping early (random weights emit any id)."""
    model = transformers_fastvlm().from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def load_ours(folder: Path, dtype: torch.dtype, device: torch.device, *, full_head: bool = False) -> FastVLM:
    """Our model from ``folder``: the whole model in ``dtype``, the tower fused in it (our bf16 path).

    Its greedy steps take the int8-screened head where it runs (:mod:`fastvlm.greedy_head`), as
    ``generate`` does; ``full_head`` makes them read the whole head.
    """
    model = FastVLM.from_pretrained(folder, device=device, dtype=dtype, fuse=False)
    model.vision_tower.fuse(dtype=dtype)
    model.screen_greedy_head = not full_head
    return model


def write_random_checkpoint(folder: Path, size: str, resolution: int) -> Path:
    """A random FastVLM-``size`` at ``resolution`` px in transformers' format (the last id as ``<image>``)."""
    config = model_config(size, resolution)
    config = replace(config, image_token_id=config.text.vocab_size - 1)
    FastVLM.from_config(config).save_pretrained(folder, format="hf")
    return folder


def check_checkpoint(folder: Path) -> None:
    """transformers reads only its own format: refuse another before loading anything."""
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{folder} has no config.json")
    model_type = read_json(config).get("model_type")
    if model_type != "fast_vlm":
        raise CheckpointError(
            f"{folder} is not in transformers' fast_vlm format (model_type {model_type!r}); write one with "
            f"`fastvlm convert {folder} DST --format hf`"
        )


# ------------------------------------------------------------------------------ the interleaved rounds


def _ours_calls(model: FastVLM, ids: torch.Tensor, pixels: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Our :data:`KINDS` calls at one input (the prefill's inputs prepared once, here)."""
    with torch.inference_mode():
        inputs = model.prepare_inputs(ids, image_features=model.encode_images(pixels))

    def first_token() -> object:
        return next(generate_tokens(model, ids, pixel_values=pixels, max_new_tokens=1))

    return {
        "encoder": lambda: model.encode_images(pixels),
        "prefill": lambda: prefill(model, inputs),
        "ttft": first_token,
    }


class TokenClock:
    """When each token was handed out: our generator's yields, or a transformers streamer's ``put`` calls."""

    def __init__(self, skip_first: bool = False) -> None:
        self.times: list[float] = []
        self._skip = skip_first  # transformers first puts the prompt

    def put(self, value: object) -> None:
        if self._skip:
            self._skip = False
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        """transformers' streamer protocol: the generation is over."""

    def decode_ms(self) -> float:
        """The time from the first token to the last: the decode steps."""
        return (self.times[-1] - self.times[0]) * 1e3


def _ours_tokens(model: FastVLM, ids: torch.Tensor, pixels: torch.Tensor, n: int, clock: TokenClock) -> list[int]:
    tokens = []
    for token, _ in generate_tokens(model, ids, pixel_values=pixels, max_new_tokens=n):
        clock.put(token)
        tokens.append(int(token[0]))
    return tokens


def _theirs_tokens(model: Any, ids: torch.Tensor, pixels: torch.Tensor, n: int, clock: TokenClock) -> list[int]:
    from fastvlm.bench.gpu_transformers import generate_ids

    return generate_ids(model, ids, pixels, n, streamer=clock)[0, ids.shape[1] :].tolist()


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3, result


def measure_pair(ours: FastVLM, theirs: Any, dtype: str, resolution: int, settings: CompareSettings) -> CompareRow:
    """Both models at ``resolution``, interleaved call by call (see the module docstring)."""
    from fastvlm.bench.gpu_transformers import expand_image_marker, latency_calls

    device, n = torch.device(settings.device), settings.new_tokens
    vocab, visual = ours.config.text.vocab_size, ours.config.num_image_tokens(resolution)

    def inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = prompt_ids(settings.text_tokens, vocab, seed=seed).to(device)
        return ids, expand_image_marker(ids, theirs.config, visual), random_pixels(1, resolution, device, seed=seed)

    ids, their_ids, pixels = inputs(0)
    calls = {OURS: _ours_calls(ours, ids, pixels), THEIRS: latency_calls(theirs, their_ids, pixels)}
    # model, its generation, which of inputs()'s prompts it takes, whether its streamer first gets the prompt
    generate = {OURS: (ours, _ours_tokens, 0, False), THEIRS: (theirs, _theirs_tokens, 1, True)}
    times: dict[str, dict[str, list[float]]] = {impl: {k: [] for k in (*KINDS, *GENERATION)} for impl in calls}
    tokens: dict[str, list[list[int]]] = {impl: [] for impl in calls}
    for round_ in range(settings.warmup + settings.repeats):
        order = (OURS, THEIRS) if round_ % 2 == 0 else (THEIRS, OURS)
        timed = round_ >= settings.warmup
        sample = inputs(1 + round_)
        with torch.inference_mode():
            for kind in KINDS:
                for impl in order:
                    ms, _ = _timed(calls[impl][kind], device)
                    if timed:
                        times[impl][kind].append(ms)
            for impl in order:
                model, fn, which, skip = generate[impl]
                clock = TokenClock(skip_first=skip)
                ms, out = _timed(lambda: fn(model, sample[which], sample[2], n, clock), device)  # noqa: B023
                if timed:
                    times[impl]["generate"].append(ms)
                    times[impl]["decode"].append(clock.decode_ms())
                    tokens[impl].append(out)
    return assemble_row(
        dtype=dtype,
        resolution=resolution,
        visual_tokens=visual,
        prompt_tokens=their_ids.shape[1],
        new_tokens=n,
        times=times,
        tokens=tokens,
    )


# ------------------------------------------------------------------------------ rows and report


def _side(times: dict[str, list[float]], new_tokens: int) -> tuple[SideTimes, list[float]]:
    """Medians of one model's rounds, and each round's decode tokens/s."""
    rates = [(new_tokens - 1) / max(ms / 1e3, 1e-9) for ms in times["decode"]]
    side = SideTimes(
        encoder_ms=statistics.median(times["encoder"]),
        prefill_ms=statistics.median(times["prefill"]),
        ttft_ms=statistics.median(times["ttft"]),
        generate_ms=statistics.median(times["generate"]),
        decode_tokens_per_s=statistics.median(rates),
    )
    return side, rates


def first_divergence(ours: list[int], theirs: list[int]) -> int | None:
    """Index of the first new token where the sequences differ (a shorter one differs where it ends)."""
    for i, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if a != b:
            return i
    return None if len(ours) == len(theirs) else min(len(ours), len(theirs))


def assemble_row(
    *,
    dtype: str,
    resolution: int,
    visual_tokens: int,
    prompt_tokens: int,
    new_tokens: int,
    times: dict[str, dict[str, list[float]]],
    tokens: dict[str, list[list[int]]],
) -> CompareRow:
    """One table row from the rounds' times (ms, per model and kind) and greedy tokens (per model, per round)."""
    rounds = {len(v) for side in times.values() for v in side.values()} | {len(v) for v in tokens.values()}
    if len(rounds) != 1 or 0 in rounds:
        raise ValueError(f"every model and measurement needs the same, non-zero number of rounds; got {rounds}")
    ours, our_rates = _side(times[OURS], new_tokens)
    theirs, their_rates = _side(times[THEIRS], new_tokens)
    ttft_per_round = [t / o for o, t in zip(times[OURS]["ttft"], times[THEIRS]["ttft"], strict=True)]
    decode_per_round = [o / t for o, t in zip(our_rates, their_rates, strict=True)]
    return CompareRow(
        dtype=dtype,
        resolution=resolution,
        visual_tokens=visual_tokens,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        rounds=rounds.pop(),
        ours=ours,
        theirs=theirs,
        ttft_ratio=theirs.ttft_ms / ours.ttft_ms,
        ttft_ratio_range=(min(ttft_per_round), max(ttft_per_round)),
        decode_ratio=ours.decode_tokens_per_s / theirs.decode_tokens_per_s,
        decode_ratio_range=(min(decode_per_round), max(decode_per_round)),
        first_divergence=[first_divergence(o, t) for o, t in zip(tokens[OURS], tokens[THEIRS], strict=True)],
    )


def agreement(row: CompareRow) -> str:
    """'5/5' when every round's greedy tokens match, else with the first differing indices."""
    diverged = [d for d in row.first_divergence if d is not None]
    text = f"{len(row.first_divergence) - len(diverged)}/{len(row.first_divergence)}"
    return text + (f" (first difference at token {', '.join(map(str, diverged))})" if diverged else "")


def _ratio(value: float, spread: tuple[float, float]) -> str:
    return f"{value:.2f}x ({spread[0]:.2f}-{spread[1]:.2f})"


def target_lines(rows: list[CompareRow]) -> list[str]:
    """Each row against issue 15's targets for its dtype."""
    lines = []
    for row in rows:
        if row.dtype not in TARGETS:
            continue
        ttft, decode = TARGETS[row.dtype]
        met = lambda value, goal: "met" if value >= goal else "not met"
        lines.append(
            f"- {row.dtype}, {row.resolution} px: TTFT {row.ttft_ratio:.2f}x shorter (target {ttft}x: "
            f"{met(row.ttft_ratio, ttft)}), decode {row.decode_ratio:.2f}x (target {decode}x: "
            f"{met(row.decode_ratio, decode)})"
        )
    return lines


def format_report(report: CompareReport) -> str:
    """The markdown report: the side-by-side table, the targets, encoder and prefill, the versions."""
    meta, rows = report.meta, report.rows
    n_rounds = rows[0].rounds if rows else 0
    header = (
        "| dtype | px | ours TTFT ms | theirs TTFT ms | TTFT ratio | ours decode tok/s | theirs decode tok/s "
        "| decode ratio | greedy tokens identical |"
    )
    lines = [
        "# FastVLM (ours) vs transformers' FastVlmForConditionalGeneration, side by side",
        "",
        f"{meta['model']}; the same weights loaded by both, one process, calls interleaved; batch 1; "
        f"medians of {n_rounds} rounds after {meta['warmup']} warm-up; pixels given (no preprocessing).",
        f"{machine_line(meta)}; transformers {meta['transformers']}, timm {meta['timm']}.",
        "Our greedy decode steps read "
        + (
            "the whole LM head (--full-head)."
            if report.settings.get("full_head")
            else "an int8 copy of the LM head and the few rows that can win (fastvlm.greedy_head: the head's own "
            "argmax; where it cannot run, the whole head)."
        ),
        "",
        header,
        "|" + "---|" * 9,
    ]
    for r in rows:
        lines.append(
            f"| {r.dtype} | {r.resolution} | {r.ours.ttft_ms:,.0f} | {r.theirs.ttft_ms:,.0f} "
            f"| {_ratio(r.ttft_ratio, r.ttft_ratio_range)} | {r.ours.decode_tokens_per_s:.1f} "
            f"| {r.theirs.decode_tokens_per_s:.1f} | {_ratio(r.decode_ratio, r.decode_ratio_range)} | {agreement(r)} |"
        )
    lines += [
        "",
        "Both models run in the row's dtype (bf16: ours is the whole model in bf16 with the tower fused in bf16; "
        "theirs loaded with dtype=bfloat16). TTFT: encoder + prefill + first greedy token. Ratios: theirs TTFT "
        "over ours, ours tokens/s over theirs, from the medians; in brackets the lowest and highest within one "
        f"round. Greedy tokens: rounds whose {rows[0].new_tokens if rows else 0} new tokens are identical "
        "(each round its own seeded image and prompt), and the index of the first difference (0 = first token).",
        "",
        "Targets (issue 15):",
        *target_lines(rows),
        "",
        "| dtype | px | visual tokens | prompt tokens | ours encoder ms | theirs encoder ms | ours prefill ms "
        "| theirs prefill ms |",
        "|" + "---|" * 8,
    ]
    for r in rows:
        lines.append(
            f"| {r.dtype} | {r.resolution} | {r.visual_tokens} | {r.prompt_tokens} | {r.ours.encoder_ms:,.0f} "
            f"| {r.theirs.encoder_ms:,.0f} | {r.ours.prefill_ms:,.0f} | {r.theirs.prefill_ms:,.0f} |"
        )
    lines += ["", f"Run time {report.elapsed_s:.0f} s."]
    return "\n".join(lines) + "\n"


def write_report(report: CompareReport, out_dir: Path) -> list[Path]:
    """``vs_transformers.json`` and ``vs_transformers.md`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {REPORT_JSON: json.dumps(asdict(report), indent=2) + "\n", REPORT_MD: format_report(report)}
    for name, text in files.items():
        (out_dir / name).write_text(text)
    return [out_dir / name for name in files]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_comparison(
    settings: CompareSettings,
    model: Path | None = None,
    *,
    out_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> CompareReport:
    """Every dtype and resolution of ``settings`` on ``model`` (a fast_vlm checkpoint) or a random one.

    With ``out_dir``, the report there is rewritten after each row: on a busy machine a
    long run that is stopped keeps the rows it finished.
    """
    transformers_fastvlm()  # fail before writing a checkpoint
    if model is not None:
        check_checkpoint(model)
    start = time.perf_counter()
    description = str(model) if model else f"random FastVLM-{settings.size.upper()} weights"
    meta = machine_description() | {
        "transformers": _version("transformers"),
        "timm": _version("timm"),
        "model": description,
        "warmup": settings.warmup,
    }
    report = CompareReport(meta=meta, settings=asdict(settings))
    device = torch.device(settings.device)
    with tempfile.TemporaryDirectory(prefix="fastvlm-vs-hf-") as scratch:
        if model is None:
            log(f"writing {description} in transformers' format ...")
            model = write_random_checkpoint(Path(scratch) / "model", settings.size, settings.resolutions[0])
        for name in settings.dtypes:
            dtype = DTYPE_NAMES[name]
            ours = load_ours(model, dtype, device, full_head=settings.full_head)
            theirs = load_theirs(model, dtype, device)
            for resolution in settings.resolutions:
                log(f"[{time.perf_counter() - start:6.1f} s] {name} {resolution} px ...")
                row = measure_pair(ours, theirs, name, resolution, settings)
                report.rows.append(row)
                report.elapsed_s = time.perf_counter() - start
                if out_dir is not None:
                    write_report(report, out_dir)
                log(f"  TTFT {row.ttft_ratio:.2f}x shorter, decode {row.decode_ratio:.2f}x, greedy {agreement(row)}")
            del ours, theirs
            gc.collect()
    report.elapsed_s = time.perf_counter() - start
    return report
