"""The Triton kernels without a GPU (skipped when triton is not installed):

- the correctness checks of tests/gpu/test_kernels_triton.py and tests/gpu/test_fp8_gpu.py on tiny sizes
  under the Triton interpreter;
- every kernel compiled for Hopper (sm_90) through its real launcher, which catches what the interpreter
  lets through (globals that are not constexpr, type errors, unsupported constructs).

TRITON_INTERPRET=1 must be set before a kernel is decorated, and other tests of this session may have
imported the kernels already, so all run in subprocesses (at the same time, to stay quick).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]

# Interpreter gaps of triton 3.6, patched in the child only (compiled kernels never meet them):
# numpy >= 2.4 refuses int() of a one-element array, which the interpreter does for loop bounds
# (triton-lang/triton#9171, fixed upstream by squeezing); its tl.dot multiplies bfloat16 operands as the
# uint16 words that store them, so they are widened to float32 first (exact: bf16 is a float32 prefix);
# and it narrows float32 to bfloat16 by truncation and to float8 without the carry of a rounding, where a
# GPU rounds to nearest, so those casts go through torch (the bfloat16 tolerance stays looser than a GPU's).
INTERPRET = """
import json

import numpy as np
import triton.language as tl
import triton.runtime.interpreter as interp

_patch = interp._patch_lang_tensor


def _patched(tensor, scope):
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


interp._patch_lang_tensor = _patched
_dot = interp.InterpreterBuilder.create_dot


def _widen(h):
    if h.dtype != tl.bfloat16:
        return h
    return interp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)


def _dot_bf16(self, a, b, d, *args):
    return _dot(self, _widen(a), _widen(b), d, *args)


interp.InterpreterBuilder.create_dot = _dot_bf16

# Its float32 -> e4m3 narrowing drops the carry of a rounding that crosses a power of two (124.5 becomes 64,
# not 128), so casts to and from float8 go through torch, which rounds as a GPU does.
import torch

_fp_to_fp = interp.InterpreterBuilder.create_fp_to_fp
_FP8 = {tl.float8e4nv: torch.float8_e4m3fn}


def _as_float32(h):
    if h.dtype == tl.bfloat16:
        return (h.data.astype(np.uint32) << 16).view(np.float32)
    return h.data.astype(np.float32)


def _fp_to_fp_torch(self, src, dst_type, rounding_mode):
    s, d = src.dtype.scalar, dst_type.scalar
    if d in _FP8 and s in (tl.float32, tl.bfloat16, tl.float16):
        data = torch.from_numpy(_as_float32(src)).to(_FP8[d]).view(torch.uint8).numpy()
        return interp.TensorHandle(data, d)
    if s in _FP8 and d == tl.float32:
        data = torch.from_numpy(src.data.copy()).view(_FP8[s]).float().numpy()
        return interp.TensorHandle(data, d)
    return _fp_to_fp(self, src, dst_type, rounding_mode)


interp.InterpreterBuilder.create_fp_to_fp = _fp_to_fp_torch
_cast = interp.InterpreterBuilder.cast_impl


# float32 -> bfloat16 rounded to nearest, as a GPU does: the FP8 kernels take their scale from such a
# rounded row, and a truncated one would pick another scale than the reference.
def _cast_rounding(self, src, dst_type):
    if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
        data = torch.from_numpy(src.data.astype(np.float32)).to(torch.bfloat16).view(torch.int16).numpy()
        return interp.TensorHandle(data.view(np.uint16), tl.bfloat16)
    return _cast(self, src, dst_type)


interp.InterpreterBuilder.cast_impl = _cast_rounding

"""
# The FP8 checks run in a child of their own, beside the others, so each stays within its time limit.
INTERPRET_16BIT = INTERPRET + """
from tests.gpu.test_kernels_triton import run_checks

print(json.dumps(run_checks("cpu", tiny=True, bf16_tolerance=3e-2)))
"""
INTERPRET_FP8 = INTERPRET + """
from tests.gpu.test_fp8_gpu import run_fp8_checks

print(json.dumps(run_fp8_checks("cpu", tiny=True)))
"""

# Each launch is bound and specialized exactly as on a GPU (alignment, divisibility, constexprs), then
# compiled for sm_90 instead of launched; the launchers run on CPU tensors, so outputs are meaningless.
COMPILE = """
import json

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)
compiled = []


def _compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
    binder = create_function_from_signature(self.signature, self.params, BACKEND)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = self._pack_args(BACKEND, kwargs, bound, specialization, options)
    compile(ASTSource(self, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    compiled.append(self.__name__ + ("+pdl" if kwargs.get("PDL") and kwargs.get("launch_pdl") else ""))


JITFunction.run = _compile_instead_of_launch

from tokenq_kernels.activation_triton import silu_and_mul_triton
from tokenq_kernels.attention_triton import paged_attention_triton
from tokenq_kernels.fp8 import FP8, QuantizedInput
from tokenq_kernels.fp8_triton import fp8_gemv_triton, quantize_rows_triton, rms_norm_quant_triton, silu_and_mul_quant_triton
from tokenq_kernels.gemv import GemvConfig
from tokenq_kernels.gemv_triton import gemv_triton
from tokenq_kernels.kv_cache_triton import store_kv_triton
from tokenq_kernels.norm_triton import fused_add_rms_norm_triton, rms_norm_triton
from tokenq_kernels.rotary_kv_triton import rotary_store_kv_triton
from tokenq_kernels.rotary_triton import rotary_triton
from tokenq_kernels.sampling import row_keys
from tokenq_kernels.sampling_triton import argmax_triton, gumbel_argmax_triton
from tests.gpu.test_kernels_triton import make_step

ATTENTION = [
    ([1, 1, 1], [40, 17, 300], 8, 4, 128, None),  # decode tiles, split-K by the heuristic
    ([1, 1, 37, 20], [50, 33, 37, 90], 2, 8, 64, 1),  # mixed, prefill tiles
    ([1, 9], [500, 20], 4, 1, 128, 3),  # mixed, split-K forced
    ([1], [3000], 8, 8, 128, None),  # one sequence, one token: launch ints specialized to 1
]
def launch_all():
    for dtype in (torch.bfloat16, torch.float32):
        for q_lens, ctx, hkv, group, d, splits in ATTENTION if dtype == torch.bfloat16 else ATTENTION[:2]:
            k_cache, v_cache, meta = make_step(q_lens, ctx, hkv, d, 16, dtype, "cpu")
            q = torch.randn(sum(q_lens), hkv * group, d, dtype=dtype)
            paged_attention_triton(q, k_cache, v_cache, meta, d**-0.5, num_splits=splits)
        x, w = torch.randn(5, 4096, dtype=dtype), torch.ones(4096, dtype=dtype)
        rms_norm_triton(x, w, 1e-5)
        fused_add_rms_norm_triton(x, x, w, 1e-5)
        silu_and_mul_triton(torch.randn(3, 2 * 1000, dtype=dtype))
        w = torch.randn(4096, 4096, dtype=dtype)
        gemv_triton(torch.randn(1, 4096, dtype=dtype), w, None, GemvConfig(8, 512))  # one row, even tiles
        gemv_triton(torch.randn(3, 4096, dtype=dtype), w, w[0], GemvConfig(16, 256))  # rows, bias, masks
        qkv = torch.randn(7, 48 * 128, dtype=dtype)
        cos_sin = torch.randn(100, 128, dtype=dtype)
        rotary_triton(torch.arange(7), qkv[:, : 32 * 128], qkv[:, 32 * 128 : 40 * 128], cos_sin, 128)
        kv = torch.randn(7, 2, 8, 128, dtype=dtype)
        cache = torch.zeros(2, 4, 16, 8, 128, dtype=dtype)
        store_kv_triton(kv[:, 0], kv[:, 1], cache[0], cache[1], torch.arange(7))
        rotary_store_kv_triton(torch.arange(7), qkv[:, : 32 * 128], qkv[:, 32 * 128 : 40 * 128], qkv[:, 40 * 128 :],
                               cos_sin, 128, cache[0], cache[1], torch.arange(7))
        # FP8: the quantization kernels, the GEMV over FP8 weights, and the KV cache in e4m3.
        x, w = torch.randn(5, 4096, dtype=dtype), torch.ones(4096, dtype=dtype)
        quantize_rows_triton(torch.randn(3, 5000, dtype=dtype))
        rms_norm_quant_triton(x, x, w, 1e-5)
        rms_norm_quant_triton(x, None, w, 1e-5)
        silu_and_mul_quant_triton(torch.randn(3, 2 * 1000, dtype=dtype))
        w8, ws = torch.randn(4096, 4096).to(FP8), torch.ones(4096)
        fp8_gemv_triton(torch.randn(1, 4096, dtype=dtype), w8, ws, None)
        fp8_gemv_triton(QuantizedInput(torch.randn(1, 3001).to(FP8), torch.ones(1, 1), dtype), w8[:1001, :3001], ws,
                        torch.randn(1001, dtype=dtype))
        one = torch.ones(1)
        cache8 = torch.zeros(2, 4, 16, 8, 128, dtype=FP8)
        store_kv_triton(kv[:, 0], kv[:, 1], cache8[0], cache8[1], torch.arange(7), one, one)
        rotary_store_kv_triton(torch.arange(7), qkv[:, : 32 * 128], qkv[:, 32 * 128 : 40 * 128], qkv[:, 40 * 128 :],
                               cos_sin, 128, cache8[0], cache8[1], torch.arange(7), one, one)
        for q_lens, ctx, hkv, group, d, splits in ATTENTION[:3]:
            k_cache, v_cache, meta = make_step(q_lens, ctx, hkv, d, 16, dtype, "cpu")
            q = torch.randn(sum(q_lens), hkv * group, d, dtype=dtype)
            paged_attention_triton(q, k_cache.to(FP8), v_cache.to(FP8), meta, d**-0.5, num_splits=splits, k_scale=one,
                                   v_scale=one)
    keys = row_keys(torch.arange(3), torch.arange(3))
    gumbel_argmax_triton(torch.randn(3, 5000), torch.ones(3), torch.zeros(3, dtype=torch.bool), keys)
    argmax_triton(torch.randn(1, 5000))


launch_all()
# Then each kernel as Hopper runs it, under programmatic dependent launch (tokenq_kernels/pdl.py).
import tokenq_kernels.pdl

tokenq_kernels.pdl.use_pdl = lambda x: True  # what every launch's pdl_options asks
launch_all()
print(json.dumps(sorted(set(compiled))))
"""


def _start(code: str, **env: str) -> subprocess.Popen:
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full_env.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", **env)
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _last_json(proc: subprocess.Popen):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def children():
    with tempfile.TemporaryDirectory() as cache:
        procs = (_start(INTERPRET_16BIT, TRITON_INTERPRET="1"), _start(COMPILE, TRITON_CACHE_DIR=cache),
                 _start(INTERPRET_FP8, TRITON_INTERPRET="1"))
        try:
            yield procs
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()


@pytest.fixture(scope="module")
def interpreted(children) -> dict[str, str | None]:
    return {**_last_json(children[0]), **_last_json(children[2])}


@pytest.fixture(scope="module")
def compiled(children) -> list[str]:
    return _last_json(children[1])


@pytest.mark.parametrize("kernel", ["attention", "store_kv", "rms_norm", "rotary", "rotary_store_kv", "silu_and_mul",
                                    "gemv", "sampling",
                                    "fp8_quantize_rows", "fp8_rms_norm_quant", "fp8_silu_and_mul_quant", "fp8_gemv",
                                    "fp8_store_kv", "fp8_attention"])
def test_kernel_under_interpreter(interpreted: dict[str, str | None], kernel: str) -> None:
    mine = {name: err for name, err in interpreted.items() if name.startswith(kernel)}
    assert mine, f"no checks ran for {kernel}"
    failed = {name: err for name, err in mine.items() if err is not None}
    assert not failed, "\n".join(f"{name}: {err}" for name, err in failed.items())


def test_every_kernel_compiles_for_hopper(compiled: list[str]) -> None:
    kernels = [
        "_gemv_kernel", "_gumbel_argmax_kernel", "_merge_splits_kernel", "_paged_attention_kernel", "_paged_decode_kernel",
        "_rms_norm_kernel",
        "_rotary_kernel", "_rotary_store_kv_kernel", "_silu_and_mul_kernel", "_store_kv_kernel",
        "_fp8_gemv_kernel", "_quantize_rows_kernel", "_rms_norm_quant_kernel", "_silu_and_mul_quant_kernel",
    ]
    assert compiled == sorted(kernels + [name + "+pdl" for name in kernels])
