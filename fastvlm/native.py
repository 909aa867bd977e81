"""Our own CPU kernels (``fastvlm/csrc``), compiled on this machine the first time they are needed.

One library with six ops under ``torch.ops.fastvlm_native``:

- ``int8_packed_mm``, the int8 weight-only GEMV behind :class:`fastvlm.linears.Int8WeightOnlyLinear`
  (``csrc/int8_gemv.cpp``; why ATen's kernel is not enough is written there), C++ with AVX-512
  VNNI, AVX-512F and AVX2 code paths chosen at run time (:func:`int8_kernel`);
- ``float16_mm``, the bf16/fp16 GEMV behind :class:`fastvlm.linears.GemvLinear` for a few rows
  (``csrc/float16_gemv.cpp``), AVX-512F and AVX2 paths (:func:`float16_kernel`);
- ``decode_layers``, every decoder layer of a one-token step in one call, the same ATen calls
  as :class:`fastvlm.decoding.CachedDecoder`'s Python loop without the interpreter between them
  (``csrc/decode_layers.cpp``; :func:`decode_layers_kernel`);
- ``decode_attention``, the attention of a decode step's one new position over the cached keys
  and values, which both of those step paths call (``csrc/decode_attention.cpp``;
  :func:`decode_attention_kernel`): ATen's ``scaled_dot_product_attention`` takes 15-60 us a
  call at a few hundred cached positions, about twice ours, for a few microseconds of work;
- ``depthwise_conv2d``, the fused vision tower's depthwise convolutions on channels-last fp32
  maps, with a channel multiplier of 1 or 2 read in place (``csrc/depthwise_conv.cpp``;
  :func:`depthwise_conv_kernel`), AVX-512F and AVX2 paths;
- ``screen_candidates``, the rows of the LM head that can win a greedy step, from its int8
  screen's output in two reads of it instead of about 20 ATen ops (``csrc/screen_candidates.cpp``;
  :func:`screen_candidates_kernel`), the same rows as :class:`fastvlm.greedy_head.GreedyHead`'s
  Python path; AVX-512F, AVX2 and x86-64 baseline paths.

It is built with ``torch.utils.cpp_extension`` (gcc or clang with OpenMP, and ninja) into a
cache folder keyed by the sources, torch and Python versions, so a machine compiles it once
(about 30 s on 2 cores) and later processes load it in milliseconds.

Nothing depends on it being there: on a machine without a compiler, on macOS or Windows, or
with ``FASTVLM_NATIVE_KERNELS=0``, the accessors return ``None`` (with one warning saying why,
when a build was tried and failed), the int8 layers run on ATen's kernel, one-row bf16 steps
on ``torch.mv``, decode steps take the Python loop, the tower's depthwise convolutions take
oneDNN's and the greedy head's candidates come from ATen ops, as before. A CPU without AVX2
gets ``decode_layers`` and ``screen_candidates`` but not the other kernels (``decode_attention``
then runs ATen's attention).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CACHE_ENV",
    "DISABLE_ENV",
    "SDPA_SHARES_KV_HEADS",
    "autograd_records",
    "bypassed_forward",
    "decode_attention",
    "decode_attention_kernel",
    "decode_layers_kernel",
    "depthwise_conv_kernel",
    "eager_on_cpu",
    "float16_kernel",
    "global_hooks_registered",
    "int8_kernel",
    "int8_kernel_isa",
    "kernel_cache_dir",
    "screen_candidates_kernel",
]

DISABLE_ENV = "FASTVLM_NATIVE_KERNELS"  # "0" turns our kernels off (the ATen kernels run instead)
CACHE_ENV = "FASTVLM_KERNEL_CACHE"  # where compiled kernels live
CACHE_DIR_ENV = "FASTVLM_CACHE_DIR"  # fastvlm's cache folder (the precision choices live there too)
CSRC = Path(__file__).parent / "csrc"
SOURCES = (  # compiled into one library
    CSRC / "int8_gemv.cpp",
    CSRC / "float16_gemv.cpp",
    CSRC / "decode_layers.cpp",
    CSRC / "decode_attention.cpp",
    CSRC / "depthwise_conv.cpp",
    CSRC / "screen_candidates.cpp",
)
HEADERS = (CSRC / "cpu_isa.h", CSRC / "int8_gemv.h", CSRC / "float16_gemv.h", CSRC / "decode_attention.h")
OP_NAMESPACE = "fastvlm_native"
STALE_LOCK_S = 600  # a build lock older than this was left by a process that died while compiling
# scaled_dot_product_attention takes enable_gqa from torch 2.5; before, the decode steps (Python's and
# decode_layers.cpp's alike) repeat the shared key/value heads
SDPA_SHARES_KV_HEADS = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


def kernel_cache_dir() -> Path:
    """Where compiled kernels are kept: ``$FASTVLM_KERNEL_CACHE``, else ``kernels/`` in ``$FASTVLM_CACHE_DIR``
    (default ``~/.cache/fastvlm``)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    folder = os.environ.get(CACHE_DIR_ENV)
    return (Path(folder) if folder else Path.home() / ".cache" / "fastvlm") / "kernels"


def _unsupported_reason() -> str | None:
    """Why this machine cannot build the kernel, or None when it can try."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return f"{DISABLE_ENV}=0"
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernel is written for x86-64 Linux, not {sys.platform} on {platform.machine()}"
    return None


@functools.cache
def _library() -> Any | None:
    """``torch.ops.fastvlm_native`` once the library is built and loaded here, else None (see the module docstring)."""
    if _unsupported_reason() is not None:
        return None
    digest = hashlib.sha256(torch.__version__.encode() + sys.version.encode())
    for path in SOURCES + HEADERS:
        digest.update(path.read_bytes())
    name = f"fastvlm_native_{digest.hexdigest()[:16]}"
    build_dir = kernel_cache_dir() / name
    try:
        from torch.utils import cpp_extension

        build_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_lock(build_dir / "lock")
        if not any(build_dir.glob("*.so")):
            print(f"fastvlm: compiling the CPU kernels into {build_dir} (once per machine)", file=sys.stderr)
        cpp_extension.load(
            name=name,
            sources=[str(path) for path in SOURCES],
            extra_cflags=["-O3", "-fopenmp", f"-DFASTVLM_SDPA_GQA={int(SDPA_SHARES_KV_HEADS)}"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except Exception as err:  # no compiler (CalledProcessError), no ninja (RuntimeError), a failed build, ...
        lines = str(err).strip().splitlines() or [type(err).__name__]
        first_line = next((line for line in lines if "error:" in line), lines[0])[:300]  # the compiler's own error
        warnings.warn(
            f"fastvlm's CPU kernels could not be built ({first_line}); int8 and bf16 layers use ATen's slower "
            f"kernels and decode steps run layer by layer in Python. Needs gcc (or clang) with OpenMP and "
            f"`pip install ninja`; set {DISABLE_ENV}=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return getattr(torch.ops, OP_NAMESPACE)


@functools.cache
def int8_kernel() -> Any | None:
    """The compiled int8 GEMV op (``torch.ops.fastvlm_native.int8_packed_mm``), or None where it cannot run.

    Builds the library on first use (see the module docstring); a failed build warns once and
    returns None, and so does a CPU with neither AVX-512F nor AVX2 + FMA + F16C (the levels of csrc/cpu_isa.h).
    """
    return _kernel_where_supported("int8_packed_mm", "int8_gemv_isa")


def _kernel_where_supported(op: str, isa_query: str) -> Any | None:
    """``torch.ops.fastvlm_native.<op>``, or None without the library or where ``<isa_query>()`` says "none"
    (a CPU with neither AVX-512F nor AVX2 + FMA + F16C, the levels of csrc/cpu_isa.h)."""
    ops = _library()
    if ops is None or getattr(ops, isa_query)() == "none":
        return None
    return getattr(ops, op)


@functools.cache
def float16_kernel() -> Any | None:
    """The compiled bf16/fp16-weight GEMV op (``torch.ops.fastvlm_native.float16_mm``), or None where it cannot run."""
    return _kernel_where_supported("float16_mm", "float16_gemv_isa")


@functools.cache
def decode_layers_kernel() -> Any | None:
    """The compiled op running every decoder layer of a step (``torch.ops.fastvlm_native.decode_layers``), or None."""
    ops = _library()
    return None if ops is None else ops.decode_layers


@functools.cache
def decode_attention_kernel() -> Any | None:
    """The compiled attention of one new position over a key/value cache
    (``torch.ops.fastvlm_native.decode_attention``), or None without the library. It runs
    ATen's ``scaled_dot_product_attention`` itself for what its kernel does not take."""
    ops = _library()
    return None if ops is None else ops.decode_attention


def decode_attention(
    query: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, scale: float, *, kernel: bool = True
) -> Tensor:
    """A decode step's attention: softmax(q k^T scale) v for the new query [B, heads, 1, D] over the
    cached ``keys``, ``values`` [B, kv_heads, L, D], each key/value head shared by heads / kv_heads
    query heads; ``mask`` [B, 1, 1, L] bool (True: attend) or None.

    Through the compiled op (:func:`decode_attention_kernel`) where the library is built and the call
    is eager on the CPU with nothing for autograd to record; the op itself sends what its kernel does
    not take, and everything when ``kernel`` is False, to ATen's ``scaled_dot_product_attention``,
    so both decode step paths get the same numbers from it. Elsewhere ATen's attention runs here.
    """
    op = decode_attention_kernel()
    if op is not None and eager_on_cpu(query) and not autograd_records(query, keys, values):
        return op(query, keys, values, mask, scale, kernel)
    if keys.shape[1] == query.shape[1]:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)
    if SDPA_SHARES_KV_HEADS:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    groups = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)


@functools.cache
def depthwise_conv_kernel() -> Any | None:
    """The compiled depthwise conv op (``torch.ops.fastvlm_native.depthwise_conv2d``), or None where it cannot run."""
    return _kernel_where_supported("depthwise_conv2d", "depthwise_conv_isa")


@functools.cache
def screen_candidates_kernel() -> Any | None:
    """The compiled op picking the greedy head's candidate rows (``torch.ops.fastvlm_native.screen_candidates``),
    or None. It has an x86-64 baseline path besides its AVX-512F and AVX2 ones, so it runs wherever the library
    loads."""
    ops = _library()
    return None if ops is None else ops.screen_candidates


def autograd_records(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records a call on ``tensors`` (None: an absent bias). Our ops have no
    backward, so such calls keep ATen's."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def global_hooks_registered() -> bool:
    """Whether forward hooks are registered for every module: an op of ours run in a module's
    place would skip them."""
    return bool(nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)


def bypassed_forward(module: nn.Module) -> str | None:
    """What an op of ours run in place of calling ``module`` would skip, said after the module
    ("has forward hooks"); None: nothing. Its own forward hooks, or a forward replaced on the
    instance (accelerate's offloading hook among them)."""
    if module._forward_hooks or module._forward_pre_hooks:
        return "has forward hooks"
    if "forward" in vars(module) or hasattr(module, "_hf_hook"):
        return f"has a {type(module).__name__} whose forward is replaced"
    return None


def eager_on_cpu(x: torch.Tensor) -> bool:
    """Whether ``x`` is on CPU and not being traced, compiled or exported: where our ops may run.

    A traced graph must not bake in a shape-dependent branch, and exporters do not know our ops.
    """
    return (
        x.device.type == "cpu"
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
    )


def _remove_stale_lock(lock: Path) -> None:
    """Delete a build lock left by a process killed while compiling (torch would wait on it forever).

    A build takes well under a minute, so a lock older than :data:`STALE_LOCK_S` has no live owner.
    """
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
    except FileNotFoundError:
        pass


def int8_kernel_isa() -> str | None:
    """The int8 kernel's instruction set here (``"vnni"``, ``"avx512"``, ``"avx2"``); None where it does not run."""
    if int8_kernel() is None:
        return None
    return str(getattr(torch.ops, OP_NAMESPACE).int8_gemv_isa())
