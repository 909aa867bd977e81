"""Per-stage precision chosen by measurement: ``FastVLM.from_pretrained(path, dtype="auto")``.

Whether bf16 or int8 pays depends on the machine, not on its CPU flags: on one AVX-512 BF16
Xeon this project's bf16 encoder was slower than fp32, on a Zen 4 machine 3x faster. So each
stage's precision is chosen by timing the candidates on this machine, on the model being
loaded, within a quality bound, and the choice is cached per machine.

Stages and candidates (:mod:`~fastvlm.precision.candidates`):

* ``encoder`` (vision tower + projector, run once per image): ``fp32`` | ``bf16``.
* ``decoder`` (the Qwen2 decoder, whose weights serve both prefill and decode): ``fp32`` |
  ``bf16`` | ``int8`` (weight-only: :func:`fastvlm.quantization.quantize_decoder`) | ``int8-head``
  (int8 with an int8 copy of a tied head) | ``bf16+int8``. Prefill and
  decode share the weights, so one choice minimises ``prefill ms + 64 x decode ms/token``
  (``ANSWER_TOKENS``); both parts are measured and reported (:mod:`~fastvlm.precision.timing`).

Quality bound (:mod:`~fastvlm.precision.quality`), checked on the model itself: on a seeded
probe of random images and prompts extended by fp32's greedy answer, a candidate's
next-token top-1 agreement with fp32 must be at least 99%; the agreement, the max |logit
difference| and whether its own greedy answer matches are recorded. An encoder candidate
feeds the fp32 decoder, a decoder candidate is fed by the fp32 encoder, and when both stages
leave fp32 the pair is probed too (failing, the stage saving less time goes back to fp32).
A candidate failing the bound is never chosen however fast; fp32 is the reference and always
admissible, and a lower precision must beat it by 5% (``MIN_SPEEDUP``) to be chosen.

Cache (:mod:`~fastvlm.precision.cache`): ``$FASTVLM_CACHE_DIR/precision.json`` (default
``~/.cache/fastvlm/precision.json``), keyed by machine and model, holding the measurements
and the choice. ``fastvlm tune-precision MODEL [--retune]`` prints the table.
"""

from fastvlm.precision.cache import default_cache_path, machine_key
from fastvlm.precision.candidates import REFERENCE, STAGES, Candidate, default_candidates, stage_copy
from fastvlm.precision.quality import MIN_AGREEMENT
from fastvlm.precision.tune import (
    PrecisionChoice,
    StageResult,
    apply_precision,
    auto_precision,
    measure_precision,
    tune_precision,
)

__all__ = [
    "MIN_AGREEMENT",
    "REFERENCE",
    "STAGES",
    "Candidate",
    "PrecisionChoice",
    "StageResult",
    "apply_precision",
    "auto_precision",
    "default_cache_path",
    "default_candidates",
    "machine_key",
    "measure_precision",
    "stage_copy",
    "tune_precision",
]
