"""Compile chameleon/kernels.py's kernels for a Hopper GPU (sm_90: H100, H200) without one, as
Triton's JIT would specialise them for a 7B model in bf16, and print one JSON line per variant with
its registers, spilled bytes and weight loads. Run as a script (tests/test_kernels.py does): the
kernels must be defined with TRITON_INTERPRET=0, which a process can choose only before importing
triton. Uses the ptxas and cuobjdump that triton's wheel bundles."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # (triton 3.9 warns when unset)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from chameleon import kernels  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
DIM, HIDDEN, HEADS, HEAD_DIM, VOCAB = 4096, 11008, 32, 128, 65536  # the 7B shape


def compile_for_hopper(fn, args: dict, warps: int):
    """args: name -> a type ("*bf16", "i32", ...) or ("constexpr", value). As the JIT does at run
    time, pointers and integers get 16-divisibility (aligned tensors, shapes that are multiples of
    16) and a stride of 1 becomes a constant."""
    names = list(args)
    signature = {n: t if isinstance(t, str) else "constexpr" for n, t in args.items()}
    constexprs = {(names.index(n),): t[1] for n, t in args.items() if not isinstance(t, str)}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in args.items() if isinstance(t, str) and (t.startswith("*") or t == "i32")}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs), target=HOPPER, options={"num_warps": warps})


def resources(compiled) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs, stack, local = (int(v) for v in re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out).groups())
    ptx = compiled.asm["ptx"]
    return {"registers": regs, "spilled_bytes": stack + local,
            "weight_loads": sorted(set(re.findall(r"ld\.global\.L1::evict_first\S*", ptx)))}


def gemv_variants():
    for label, (norm, residual, swiglu, n, k, out) in {
        "qkv": (True, False, False, 3 * DIM, DIM, "*bf16"), "wo": (False, True, False, DIM, DIM, "*bf16"),
        "w13": (True, False, True, HIDDEN, DIM, "*bf16"), "w2": (False, True, False, DIM, HIDDEN, "*bf16"),
        "output": (True, False, False, VOCAB, DIM, "*fp32"),
    }.items():
        for block_n, block_k, warps in (c for c in kernels.GEMV_CONFIGS if c != kernels.CUBLAS):
            args = {"w_ptr": "*bf16", "x_ptr": "*bf16", "g_ptr": "*bf16", "res_ptr": "*bf16", "out_ptr": out, "N": "i32", "K": "i32",
                    "stride_wn": "i32", "stride_wk": ("constexpr", 1), "eps": "fp32", "skip_at": "i32", "skip_len": "i32",
                    "NORM": ("constexpr", norm), "RESIDUAL": ("constexpr", residual), "SWIGLU": ("constexpr", swiglu),
                    "EVEN": ("constexpr", n % block_n == 0 and k % block_k == 0), "BLOCK_N": ("constexpr", block_n),
                    "BLOCK_K": ("constexpr", block_k), "K_PAD": ("constexpr", triton.next_power_of_2(k) if norm else 1)}
            yield f"gemv {label} {(block_n, block_k, warps)}", kernels._gemv_kernel, args, warps


def attention_variants():
    for block_s, warps, chunk in kernels.ATTENTION_CONFIGS:
        args = {name: "*bf16" for name in ("qkv_ptr", "norm_w_ptr", "norm_b_ptr")}
        args |= {"rope_ptr": "*fp32", "pos_ptr": "*i64", "slot_ptr": "*i64", "k_ptr": "*bf16", "v_ptr": "*bf16", "valid_ptr": "*i1",
                 "out_ptr": "*bf16", "part_ptr": "*fp32" if chunk else "*bf16"}
        args |= {name: "i32" for name in ("stride_qkv", "stride_cb", "stride_ch", "stride_cs", "stride_valid", "stride_out", "chunk")}
        args |= {"eps": "fp32", "sm_scale": "fp32", "H": ("constexpr", HEADS), "KV": ("constexpr", HEADS), "HD": ("constexpr", HEAD_DIM),
                 "G": ("constexpr", 1), "G_PAD": ("constexpr", 1), "QK_NORM": ("constexpr", True), "BLOCK_S": ("constexpr", block_s),
                 "SPLIT": ("constexpr", chunk is not None)}
        yield f"attention {(block_s, warps, chunk)}", kernels._attention_kernel, args, warps
    for parts_pad in (4, 64):
        args = {"part_ptr": "*fp32", "out_ptr": "*bf16", "stride_out": "i32", "parts": "i32",
                "H": ("constexpr", HEADS), "HD": ("constexpr", HEAD_DIM), "PARTS_PAD": ("constexpr", parts_pad)}
        yield f"combine {parts_pad} parts", kernels._combine_kernel, args, 4


if __name__ == "__main__":
    for name, fn, args, warps in [*gemv_variants(), *attention_variants()]:
        print(json.dumps({"variant": name, **resources(compile_for_hopper(fn, args, warps))}), flush=True)
