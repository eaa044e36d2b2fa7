"""Every Triton kernel family compiles for sm_90 (no GPU needed: triton's NVIDIA backend compiles to cubin),
with the hot configurations spill-free. Runs in a subprocess with the interpreter off."""

import os

import pytest

# ------------------------------------------------------------------ GPU compile check, no GPU needed
# The interpreter does not run Triton's compiler front end, which rejects things the interpreter
# accepts (for example a name bound to different types in the two branches of a runtime `if`). This
# compiles every kernel family ahead of time for Hopper (sm_90) in a subprocess with the interpreter
# off, through ptxas, using the NVIDIA backend bundled with the triton wheel, and checks with
# cuobjdump that the hot configurations do not spill registers.

_COMPILE_SCRIPT = r'''
import os, re, subprocess, tempfile
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from grit_kernels.triton import fold, gram, inverse, precondition

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

def build(fn, types, constexprs, num_warps=4, spill_free=False, vectorised=False):
    signature = {name: ("constexpr" if name in constexprs else types[name]) for name in fn.arg_names}
    src = triton.compiler.ASTSource(fn, signature, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert kernel.asm["cubin"], fn.__name__
    if vectorised:  # the mask-free, aligned variant must use vector loads
        assert re.search(r"ld\.global(\.\w+)*\.v[248]", kernel.asm["ptx"]), f"{fn.__name__} {constexprs}: scalar loads only"
    if spill_free and os.path.exists(CUOBJDUMP):  # hot configurations must not spill registers
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        stack = re.search(r"STACK:(\d+)", usage)  # spilled registers live on the stack frame
        assert stack is not None and int(stack.group(1)) == 0, f"{fn.__name__} {constexprs} spills: {usage}"

i32, f32 = "i32", "fp32"
for dt, br, single in [("*fp32", 16, True), ("*bf16", 16, True), ("*fp16", 64, False)]:
    build(gram._gram_kernel, dict(x_ptr=dt, out_ptr="*fp32", n_rows=i32, r=i32, rows_per_program=i32, stride_xm=i32,
          stride_xk=i32, stride_om=i32, stride_on=i32, weight=f32, n_col_tiles=i32),
          dict(BLOCK_M=128, BLOCK_R=br, SINGLE_TILE=single, UPCAST=dt == "*fp32", IEEE=dt == "*fp32"),
          num_warps=8 if br == 64 else 4, spill_free=True)
for dt in ("*fp32", "*bf16"):  # grouped Gram, rank tiles of r in {8, 16, 32, 64}
    for rp in (16, 32, 64):
        build(gram._grams_kernel, dict(table="*i64", dtype_ref=dt, out_ref="*fp32", weight=f32, n_programs=i32),
              dict(BLOCK_M=gram.ROWS_PER_STEP, RP=rp, UPCAST=dt == "*fp32", IEEE=dt == "*fp32"),
              num_warps=8 if rp == gram.MAX_TILE_R else 4, spill_free=True)
build(fold._ema_fold_kernel, dict(factor_ptr="*fp32", stat_ptr="*fp32", weight_ptr="*fp32", init_ptr="*u8", R=i32,
      sf0=i32, sf1=i32, sf2=i32, ss0=i32, ss1=i32, ss2=i32, stride_w=i32, stride_init=i32, decay=f32,
      one_minus_decay=f32), dict(CHUNK=4096, N_CHUNKS=2), spill_free=True)
for rp, has in [(16, True), (32, False), (64, True), (64, False)]:  # RP = 64: L and L^-1 in global scratch
    build(inverse._inverse_kernel, dict(mats_ptr="*fp32", out_ptr="*fp32", status_ptr="*i32", ranks_ptr="*i32",
          prev_ptr="*fp32", prev_valid_ptr="*u8", scratch_ptr="*fp32", R=i32, sm0=i32, sm1=i32, sm2=i32, so0=i32, so1=i32, so2=i32,
          sp0=i32, sp1=i32, sp2=i32, stride_rank=i32, stride_pv=i32, damping=f32, eps_abs=f32, retry_factor=f32),
          dict(RP=rp, HAS_RANKS=has, HAS_PREV=has, SCRATCH=rp >= 64), num_warps=inverse._num_warps(rp), spill_free=True)
pre_types = dict(ptr_table="*i64", meta_table="*i64", tile_table="*i64", inv_d_ptr="*fp32", inv_h_ptr="*fp32",
                 partial_ptr="*fp32", sd0=i32, sd1=i32, sd2=i32, sh0=i32, sh1=i32, sh2=i32)
for (rp, size), (block, warps) in sorted(precondition.CONFIGS.items()):  # every (rank tile, dtype) in use
    for even in (False, True):
        build(precondition._precondition_kernel, dict(pre_types, dtype_ref="*fp32" if size == 4 else "*bf16"),
              dict(RP=rp, BLOCK=block, CONTIG=True, EVEN=even, ALIGNED=even, COMPUTE_DOT=True),
              num_warps=warps, spill_free=True, vectorised=even)
block, warps = precondition.config(64, 2)
build(precondition._precondition_kernel, dict(pre_types, dtype_ref="*fp16"),
      dict(RP=64, BLOCK=block, CONTIG=False, EVEN=False, ALIGNED=False, COMPUTE_DOT=False), num_warps=warps, spill_free=True)
block, warps = precondition.config(128, 2)  # RP = 128 compiles but spills (documented in precondition.py)
build(precondition._precondition_kernel, dict(pre_types, dtype_ref="*bf16"),
      dict(RP=128, BLOCK=block, CONTIG=True, EVEN=False, ALIGNED=False, COMPUTE_DOT=True), num_warps=warps)
print("compiled")
'''


def _nvidia_backend_available():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _nvidia_backend_available(), reason="triton wheel without the NVIDIA backend")
def test_kernels_compile_for_sm90():
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
