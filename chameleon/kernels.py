"""Fused Triton kernels for one-token decode steps at batch 1 (experimental, opt-in).

A decode step at batch 1 is bound by reading the weights once. torch.compile's step runs ~14
kernels a layer (cuBLAS GEMVs with split-K reductions, separate norm, RoPE and SiLU kernels), and
the small ones and the gaps between them cost ~1 ms of a 7B step's ~4.6 ms on an H200
(benchmarks/perf/RESULTS.md). Here a layer is five kernels:

  1. q/k/v GEMV with the attention RMSNorm computed in its prologue;
  2. per-head q/k LayerNorm, RoPE, the new slot's k/v written to the cache, attention over the
     slots written so far (not the whole preallocated cache), in one program per kv head or,
     where timing prefers it, in parts of the slots merged by a small second kernel;
  3. wo GEMV adding the residual in its epilogue;
  4. w1/w3 GEMV with the FFN RMSNorm in its prologue and SiLU(w1 x) * w3 x in its epilogue;
  5. w2 GEMV adding the residual.

Every GEMV program reads whole rows (no split-K), so epilogues are elementwise. Values are rounded
to the activations' dtype where the reference (`model.fused_block`) rounds, so results match it
up to the order of floating-point sums. Block sizes (and cuBLAS for the products; parts for
attention) are chosen per shape by timing a few candidates on first use (`_tuned`). Text steps
skip the logits of the image codes (`skipped_range`).

Without CUDA the kernels run in Triton's interpreter where the environment chooses it
(TRITON_INTERPRET=1 before triton is imported, as the tests do): ~1000x slower than the usual
step, but it lets tests check them on any machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from chameleon.errors import InputError
from chameleon.model import KVCache, rms_norm

# Triton reads the variable as it defines its own kernels (tl.zeros...), so only before its import.
# Chosen by the environment (as tests/conftest.py does), the interpreter also runs models on the
# CPU; set here only so that the kernels can be defined, it does not (~1000x slower than the usual
# step: `unsupported` says so).
INTERPRETER_CHOSEN = os.environ.get("TRITON_INTERPRET") == "1"
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

try:
    import triton
    import triton.language as tl
except ImportError:  # checked by `unsupported`
    triton = None


def unsupported(transformer, cache: KVCache) -> str | None:
    """Why the fused decode step cannot serve this model and cache, or None if it can."""
    args = transformer.args
    device = transformer.output.weight.device
    if triton is None:
        return "triton is not installed"
    if device.type == "cpu" and not INTERPRETER_CHOSEN:
        return ("no GPU: on the CPU the kernels run in Triton's interpreter, ~1000x slower than the usual step "
                "(TRITON_INTERPRET=1 in the environment runs them there anyway, as the tests do)")
    if device.type == "cuda" and INTERPRETED:
        return "TRITON_INTERPRET=1: Triton's interpreter copies tensors through the host, which CUDA graph capture refuses"
    if device.type not in ("cuda", "cpu"):
        return f"the model is on {device.type}, not CUDA"
    if cache.batch_size != 1:
        return f"batch of {cache.batch_size} cache rows (batch 1 only)"
    if args.swin_norm:
        return "swin_norm (34B) normalises whole branch outputs, which a GEMV epilogue cannot"
    if args.head_dim & (args.head_dim - 1):
        return f"head_dim {args.head_dim} is not a power of 2"
    if transformer.output.weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"weights in {transformer.output.weight.dtype}"
    if any(m.fused is None or not all(f.current() for f in m.fused) for b in transformer.layers for m in (b.attention, b.feed_forward)):
        return "weights not fused (call model.transformer.fuse_())"
    return None


if triton is not None:

    @triton.jit
    def _gemv_kernel(w_ptr, x_ptr, g_ptr, res_ptr, out_ptr, N, K, stride_wn, stride_wk, eps, skip_at, skip_len,
                     NORM: tl.constexpr, RESIDUAL: tl.constexpr, SWIGLU: tl.constexpr, EVEN: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_PAD: tl.constexpr):
        """out[n] = W[n] . x for BLOCK_N rows a program. NORM: x is RMS-normalised (times g) first;
        SWIGLU: rows n and N + n of W are the gate and up rows, out[n] = silu(gate) * up;
        RESIDUAL: out[n] += res[n]. K_PAD: K rounded up to a power of 2 (NORM reads all of x at once).
        Rows skip_at .. skip_at + skip_len - 1 are not computed (out keeps them); N counts the others."""
        act = x_ptr.dtype.element_ty
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows = tl.where(rows >= skip_at, rows + skip_len, rows)
        if NORM:  # every program sums x^2 itself (x is small and in L2: no extra kernel), in one load
            every = tl.arange(0, K_PAD)
            xs = tl.load(x_ptr + every, mask=every < K, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(xs * xs, axis=0) / K + eps)
        # Products accumulate elementwise and are summed across lanes once, after the loop: a sum
        # per iteration would put a cross-lane reduction (and a barrier) between the weight loads.
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            offs = rows[:, None] * stride_wn + cols[None, :] * stride_wk
            if EVEN:  # no masks: the masked form needs up to ~1.8x the registers (226 vs 125 for sm_90)
                xv = tl.load(x_ptr + cols).to(tl.float32)
                if NORM:
                    xv = ((xv * rstd).to(act).to(tl.float32) * tl.load(g_ptr + cols).to(tl.float32)).to(act).to(tl.float32)
                w = tl.load(w_ptr + offs, eviction_policy="evict_first")
                if SWIGLU:
                    w_up = tl.load(w_ptr + N * stride_wn + offs, eviction_policy="evict_first")
            else:
                col_ok = cols < K
                xv = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
                if NORM:
                    g = tl.load(g_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
                    xv = ((xv * rstd).to(act).to(tl.float32) * g).to(act).to(tl.float32)
                ok = row_ok[:, None] & col_ok[None, :]
                w = tl.load(w_ptr + offs, mask=ok, other=0.0, eviction_policy="evict_first")
                if SWIGLU:
                    w_up = tl.load(w_ptr + N * stride_wn + offs, mask=ok, other=0.0, eviction_policy="evict_first")
            acc += w.to(tl.float32) * xv[None, :]
            if SWIGLU:
                acc_up += w_up.to(tl.float32) * xv[None, :]
        out = tl.sum(acc, axis=1).to(act).to(tl.float32)  # the reference's product is in the activations' dtype
        if SWIGLU:
            silu = (out * tl.sigmoid(out)).to(act).to(tl.float32)
            out = (silu * tl.sum(acc_up, axis=1).to(act).to(tl.float32)).to(act).to(tl.float32)
        if RESIDUAL:
            out = (tl.load(res_ptr + rows, mask=row_ok, other=0.0).to(tl.float32) + out).to(act).to(tl.float32)
        tl.store(out_ptr + rows, out, mask=row_ok)

    @triton.jit
    def _head_norm_rope(src, heads, head_ok, w_ptr, b_ptr, d, cos, sin, eps,
                        HD: tl.constexpr, QK_NORM: tl.constexpr):
        """Heads `heads` (G,) of a fused q/k row at `src`: LayerNorm per head (weight and bias of
        that head), then interleaved RoPE: (x[2i], x[2i+1]) rotated by angle i. Each lane also
        loads its pair partner (d ^ 1), so the result stays in the contiguous layout. (G, HD)."""
        act = src.dtype.element_ty
        partner = d ^ 1
        ok = head_ok[:, None]
        x = tl.load(src + heads[:, None] * HD + d[None, :], mask=ok, other=0.0).to(tl.float32)
        xp = tl.load(src + heads[:, None] * HD + partner[None, :], mask=ok, other=0.0).to(tl.float32)
        if QK_NORM:
            mean = tl.sum(x, axis=1) / HD
            var = tl.sum((x - mean[:, None]) * (x - mean[:, None]), axis=1) / HD
            rstd = 1.0 / tl.sqrt(var + eps)
            w = tl.load(w_ptr + heads[:, None] * HD + d[None, :], mask=ok, other=0.0).to(tl.float32)
            wp = tl.load(w_ptr + heads[:, None] * HD + partner[None, :], mask=ok, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + heads[:, None] * HD + d[None, :], mask=ok, other=0.0).to(tl.float32)
            bp = tl.load(b_ptr + heads[:, None] * HD + partner[None, :], mask=ok, other=0.0).to(tl.float32)
            # layer_norm rounds its output; addcmul(bias, ., weight) rounds once more
            x = (((x - mean[:, None]) * rstd[:, None]).to(act).to(tl.float32) * w + b).to(act).to(tl.float32)
            xp = (((xp - mean[:, None]) * rstd[:, None]).to(act).to(tl.float32) * wp + bp).to(act).to(tl.float32)
        even = (d % 2 == 0)[None, :]
        return tl.where(even, x * cos[None, :] - xp * sin[None, :], xp * sin[None, :] + x * cos[None, :]).to(act)

    @triton.jit
    def _attention_kernel(qkv_ptr, norm_w_ptr, norm_b_ptr, rope_ptr, pos_ptr, slot_ptr, k_ptr, v_ptr, valid_ptr, out_ptr, part_ptr,
                          stride_qkv, stride_cb, stride_ch, stride_cs, stride_valid, stride_out, chunk, eps, sm_scale,
                          H: tl.constexpr, KV: tl.constexpr, HD: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                          QK_NORM: tl.constexpr, BLOCK_S: tl.constexpr, SPLIT: tl.constexpr):
        """One query token per row: program (b, kv head, part) normalises and rotates its k and
        its G q heads and attends over the slots part * chunk .. (part + 1) * chunk - 1 that are
        before `slot` and that row b marks valid; the part holding `slot` also attends to the new
        token (from registers) and writes its k and v into the cache. One part (SPLIT false,
        chunk >= the cache length): the output. Several (flash-decoding: more programs for long
        contexts): each writes its unnormalised sum, max and denominator to `part_ptr` rows of
        HD + 2 floats, and `_combine_kernel` merges them."""
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        part = tl.program_id(2)
        act = qkv_ptr.dtype.element_ty
        slot = tl.load(slot_ptr)
        pos = tl.load(pos_ptr + b)
        start = part * chunk
        owner = (slot >= start) & (slot < start + chunk)
        d = tl.arange(0, HD)
        cos = tl.load(rope_ptr + pos * HD + (d // 2) * 2)  # table (positions, HD/2, [cos, sin])
        sin = tl.load(rope_ptr + pos * HD + (d // 2) * 2 + 1)
        row = qkv_ptr + b * stride_qkv
        one = tl.arange(0, 1)
        k_new = _head_norm_rope(row, H + kvh + one, one == 0, norm_w_ptr, norm_b_ptr, d, cos, sin, eps, HD, QK_NORM)
        v_new = tl.load(row + (H + KV + kvh) * HD + d)
        cache = b * stride_cb + kvh * stride_ch
        lanes = start + 0 * d  # (as a vector: the interpreter takes no scalar-and-vector mask)
        mine = (slot >= lanes) & (slot < lanes + chunk)
        tl.store(k_ptr + cache + slot * stride_cs + d, tl.reshape(k_new, [HD]), mask=mine)
        tl.store(v_ptr + cache + slot * stride_cs + d, v_new, mask=mine)
        g = tl.arange(0, G_PAD)
        q = _head_norm_rope(row, kvh * G + g, g < G, norm_w_ptr, norm_b_ptr, d, cos, sin, eps, HD, QK_NORM).to(tl.float32)
        # The new slot first (always visible), from registers: then m is finite from the start. A
        # part without it starts from a very negative finite m (-inf - -inf would give NaN).
        m = tl.where(owner, tl.sum(q * k_new.to(tl.float32), axis=1) * sm_scale, -1e30)  # (G_PAD,)
        l_sum = tl.where(owner, tl.full([G_PAD], 1.0, dtype=tl.float32), 0.0)
        acc = tl.where(owner, tl.zeros([G_PAD, HD], dtype=tl.float32) + v_new.to(tl.float32)[None, :], 0.0)
        end = tl.minimum(start + chunk, slot)
        for s0 in range(start, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            before = s < end
            seen = before & (tl.load(valid_ptr + b * stride_valid + s, mask=before, other=0) != 0)
            keys = tl.load(k_ptr + cache + s[:, None] * stride_cs + d[None, :], mask=before[:, None], other=0.0).to(tl.float32)
            values = tl.load(v_ptr + cache + s[:, None] * stride_cs + d[None, :], mask=before[:, None], other=0.0).to(tl.float32)
            scores = tl.sum(q[:, None, :] * keys[None, :, :], axis=2) * sm_scale  # (G_PAD, BLOCK_S)
            scores = tl.where(seen[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * values[None, :, :], axis=1)
            m = m_new
        heads = kvh * G + g
        if SPLIT:
            rows = ((b * H + heads) * tl.num_programs(2) + part) * (HD + 2)
            tl.store(part_ptr + rows[:, None] + d[None, :], acc, mask=(g < G)[:, None])
            tl.store(part_ptr + rows + HD, m, mask=g < G)
            tl.store(part_ptr + rows + HD + 1, l_sum, mask=g < G)
        else:
            tl.store(out_ptr + b * stride_out + heads[:, None] * HD + d[None, :], (acc / l_sum[:, None]).to(act), mask=(g < G)[:, None])

    @triton.jit
    def _combine_kernel(part_ptr, out_ptr, stride_out, parts, H: tl.constexpr, HD: tl.constexpr, PARTS_PAD: tl.constexpr):
        """Program (b, head): the attention output from its `parts` partial results."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        i = tl.arange(0, PARTS_PAD)
        ok = i < parts
        d = tl.arange(0, HD)
        rows = ((b * H + h) * parts + i) * (HD + 2)
        m = tl.load(part_ptr + rows + HD, mask=ok, other=-1e30)
        l_sum = tl.load(part_ptr + rows + HD + 1, mask=ok, other=0.0)
        acc = tl.load(part_ptr + rows[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        w = tl.exp(m - tl.max(m, axis=0))  # (the part holding the new slot has a finite max)
        out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l_sum, axis=0)
        tl.store(out_ptr + b * stride_out + h * HD + d, out.to(out_ptr.dtype.element_ty))


# Candidates timed on first use of each shape: (BLOCK_N, BLOCK_K, num_warps) per GEMV, and
# (BLOCK_S, num_warps) for attention. Interpreted: few, large programs (its cost is per program).
# Larger tiles keep more loads in flight per thread (Triton does not software-pipeline loads that
# feed no tl.dot); fully unrolled K loops spilled registers for w2 (K = 11,008).
# CUBLAS: the product in torch (cuBLAS), norm and epilogue as separate kernels, as the reference
# runs them; timed with the others, so that a matrix where cuBLAS is faster keeps it.
CUBLAS = ("cublas",)
GEMV_CONFIGS = [(2, 1024, 4), (4, 512, 4), (4, 1024, 4), (4, 2048, 8), (8, 256, 4), (8, 512, 4), (8, 1024, 4), (8, 1024, 8), (16, 512, 8),
                CUBLAS]
# Attention: (BLOCK_S, num_warps, slots per program or None: one program per kv head and row).
# (128, 8) spills registers at head_dim 128. Parts of 64 to 256 slots use more of the GPU's
# multiprocessors (32 kv heads at batch 1 leave most idle), for one more (small) kernel.
ATTENTION_CONFIGS = [(16, 4, None), (32, 4, None), (64, 4, None), (64, 8, None), (32, 4, 64), (64, 4, 64), (64, 4, 128), (64, 8, 256)]
MAX_PARTS = 64  # slots per program grow past this many parts (long contexts)
INTERPRETED_CONFIG = {"gemv": (512, 64, 4), "attention": (64, 4, None)}
_chosen: dict[tuple, tuple] = {}  # (kernel, its flags and shapes, dtypes, device) -> config


SMALL_CONFIG = {"gemv": (8, 256, 4), "attention": (32, 4, None)}
TUNED_FROM = 1 << 20  # elements (a matrix's, or the keys' of one layer): smaller work is not timed


CONFIGS_ENV = "CHAMELEON_KERNEL_CONFIGS"  # a JSON file of timed choices: read before timing, added to after


def _tuned(key: tuple, launch, candidates: list[tuple], size: int) -> tuple:
    """The fastest of `candidates` for `key` (its first item names the kernel, its last the
    device), timed once per process with `launch(config)`; for work of fewer than TUNED_FROM
    elements (`size`), a fixed choice (timing costs a compilation per candidate, and saves nothing
    there). Timed launches repeat the same work: no kernel here reads what it writes (the
    attention kernel rewrites one cache slot with the same values).

    Timings vary, so two processes may choose differently, and blocks sum in different orders:
    with CHAMELEON_KERNEL_CONFIGS=FILE a choice recorded there for this GPU is taken untimed, and
    a new one is recorded, so that runs sharing the file run the same kernels."""
    if INTERPRETED:
        return INTERPRETED_CONFIG[key[0]]
    if size < TUNED_FROM:
        return SMALL_CONFIG[key[0]]
    config = _chosen.get(key)
    if config is None:
        path, gpu, name = os.environ.get(CONFIGS_ENV), _device_name(key[-1]), " ".join(map(str, key[:-1]))
        config = _recorded(path, gpu, name, candidates) if path else None
        if config is None:
            config = _fastest(launch, candidates)
            if path:
                config = _record(path, gpu, name, config, candidates)
        _chosen[key] = config
    return config


def _fastest(launch, candidates: list[tuple]) -> tuple:
    from triton.testing import do_bench  # (flushes L2 between launches, as a decode step would)

    times = {}
    for c in candidates:
        try:
            times[c] = do_bench(lambda c=c: launch(c), warmup=5, rep=20)
        except triton.runtime.errors.OutOfResources:  # (too many registers or too much shared memory)
            continue
    return min(times, key=times.get)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _read_records(path: str) -> dict:
    """CHAMELEON_KERNEL_CONFIGS's file: {GPU name: {kernel key: config}}, {} while it does not exist."""
    try:
        table = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise InputError(f"{CONFIGS_ENV}={path}: cannot read it ({err.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{CONFIGS_ENV}={path}: not JSON ({err}); expected the file chameleon's kernels write there") from None
    if not (isinstance(table, dict) and all(isinstance(v, dict) for v in table.values())):
        raise InputError(f"{CONFIGS_ENV}={path}: expected an object {{GPU name: {{kernel: config}}}}, as chameleon's kernels write it")
    return table


def _as_config(entry, candidates: list[tuple]) -> tuple | None:
    """A file's entry (a JSON list) as the candidate it names, or None."""
    config = tuple(entry) if isinstance(entry, list) else None
    return config if config in candidates else None


def _recorded(path: str, gpu: str, name: str, candidates: list[tuple]) -> tuple | None:
    entry = _read_records(path).get(gpu, {}).get(name)
    config = _as_config(entry, candidates)
    if entry is not None and config is None:  # (a file from another version of this module: timed anew, and replaced)
        warnings.warn(f"{CONFIGS_ENV}={path}: {gpu!r} / {name!r}: {entry!r} is not among this version's candidates; timing them again")
    return config


def _record(path: str, gpu: str, name: str, config: tuple, candidates: list[tuple]) -> tuple:
    """Adds a choice to the file, read again first (other processes may have added theirs) and
    replaced whole, so that a reader never sees half of it; returns the choice the file holds. One
    that another process recorded while this one timed (torchrun's processes start together) is
    kept, so that they run the same kernels."""
    with _directory_locked(path):
        table = _read_records(path)
        earlier = _as_config(table.get(gpu, {}).get(name), candidates)
        if earlier is not None:
            return earlier
        table.setdefault(gpu, {})[name] = list(config)
        temporary = Path(f"{path}.{os.getpid()}.tmp")
        try:
            temporary.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
            os.replace(temporary, path)
        except OSError as err:
            temporary.unlink(missing_ok=True)  # (a disk filled while writing it: no partial copy left beside the file)
            raise InputError(f"{CONFIGS_ENV}={path}: cannot write it ({err.strerror})") from None
    return config


@contextlib.contextmanager
def _directory_locked(path: str):
    """An exclusive lock on the file's directory while one process reads, merges and replaces the
    file, so that two processes adding choices at once keep both. The directory, not the file, is
    locked: the file is replaced by another inode at each write, and a lock file would be left
    behind. Without fcntl (Windows) there is no lock; a choice lost there is timed again later."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        descriptor = os.open(Path(path).parent, os.O_RDONLY)
    except OSError as err:
        raise InputError(f"{CONFIGS_ENV}={path}: cannot write it ({err.strerror})") from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)  # (released when closed)
        except OSError:  # a file system without locks: unlocked, as without fcntl
            pass
        yield
    finally:
        os.close(descriptor)


def chosen_configs() -> dict[str, tuple]:
    """The configurations `_tuned` chose so far, for reports."""
    return {" ".join(map(str, key)): config for key, config in _chosen.items()}


def _cublas_gemv(w, x, out, norm, eps, residual, swiglu, skip) -> None:
    """`gemv` as the reference computes it (model.fused_block), kernel by kernel."""
    if norm is not None:
        x = rms_norm(x, norm, eps)
    if skip is not None:  # (no residual or swiglu with it)
        for start, stop in ((0, skip[0]), (skip[1], w.shape[0])):
            out[start:stop] = torch.mv(w[start:stop], x)
        return
    y = torch.mv(w, x)
    if swiglu:
        gate, up = y.chunk(2)
        y = F.silu(gate) * up
    out.copy_(y if residual is None else residual + y)


def gemv(w: torch.Tensor, x: torch.Tensor, out: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0,
         residual: torch.Tensor | None = None, swiglu: bool = False, skip: tuple[int, int] | None = None,
         config: tuple | None = None) -> torch.Tensor:
    """out = W x (x: (K,), W: (N, K), or (2N, K) gate rows then up rows for `swiglu`), with x
    RMS-normalised by `norm` first and `residual` added after, where given. `skip`: rows (start,
    stop) of W left out (out keeps its values there; not with residual or swiglu). `config`: one
    of GEMV_CONFIGS (default: the fastest, see `_tuned`)."""
    n, k = w.shape[0] // (2 if swiglu else 1), w.shape[1]
    skip_at, skip_len = (skip[0], skip[1] - skip[0]) if skip is not None else (n, 0)
    assert skip is None or (residual is None and not swiglu and 0 <= skip_at <= skip[1] <= n)
    n -= skip_len

    def launch(config):
        if config == CUBLAS:
            return _cublas_gemv(w, x, out, norm, eps, residual, swiglu, skip)
        block_n, block_k, warps = config
        even = n % block_n == 0 and k % block_k == 0
        _gemv_kernel[(triton.cdiv(n, block_n),)](
            w, x, x if norm is None else norm, x if residual is None else residual, out, n, k, w.stride(0), w.stride(1), eps, skip_at, skip_len,
            NORM=norm is not None, RESIDUAL=residual is not None, SWIGLU=swiglu, EVEN=even,
            BLOCK_N=block_n, BLOCK_K=block_k, K_PAD=triton.next_power_of_2(k) if norm is not None else 1, num_warps=warps)

    flags = "+".join(name for name, on in (("norm", norm is not None), ("residual", residual is not None), ("swiglu", swiglu)) if on)
    launch(config or _tuned(("gemv", flags or "plain", n, k, w.stride(), w.dtype, out.dtype, w.device), launch, GEMV_CONFIGS, w.numel()))
    return out


def decode_attention(qkv, qk_norm, rope, positions, slot, cache_k, cache_v, valid, out, args, config: tuple | None = None) -> torch.Tensor:
    """Attention of one new token per row (see `_attention_kernel`); qkv (B, (H + 2 KV) * hd).
    `config`: one of ATTENTION_CONFIGS (default: the fastest, see `_tuned`)."""
    heads, kv_heads, hd = args.n_heads, args.kv_heads, args.head_dim
    group = heads // kv_heads
    g_pad = triton.next_power_of_2(group)
    weight, bias, eps = qk_norm if qk_norm is not None else (qkv, qkv, 0.0)

    rows, slots = qkv.shape[0], cache_k.shape[2]

    def launch(config):
        block_s, warps, chunk = config
        chunk = slots if chunk is None else max(chunk, -(-slots // MAX_PARTS))
        chunk = -(-chunk // block_s) * block_s  # whole blocks a part
        parts = -(-slots // chunk)
        part = torch.empty(rows * heads * parts * (hd + 2), dtype=torch.float32, device=qkv.device) if parts > 1 else out
        _attention_kernel[(rows, kv_heads, parts)](
            qkv, weight, bias, rope, positions, slot, cache_k, cache_v, valid, out, part,
            qkv.stride(0), cache_k.stride(0), cache_k.stride(1), cache_k.stride(2), valid.stride(0), out.stride(0), chunk, eps, hd ** -0.5,
            H=heads, KV=kv_heads, HD=hd, G=group, G_PAD=g_pad, QK_NORM=qk_norm is not None, BLOCK_S=block_s, SPLIT=parts > 1,
            num_warps=warps)
        if parts > 1:
            _combine_kernel[(rows, heads)](part, out, out.stride(0), parts, H=heads, HD=hd, PARTS_PAD=triton.next_power_of_2(parts))

    # (per cache length: the work grows with the slots written, but a graph replays one choice)
    launch(config or _tuned(("attention", heads, kv_heads, hd, slots, qkv.dtype, qkv.device), launch, ATTENTION_CONFIGS,
                            rows * kv_heads * slots * hd))
    return out


class FusedDecoder:
    """Batch-1 decode steps on the kernels above, for one model's current weights; its buffers
    are reused by every step (CUDA graphs replay them at fixed addresses). `skip`: a range of
    vocabulary ids (start, stop) whose logits are never computed, -inf (text steps skip the image
    codes: 8,192 rows of the output matrix, 64 MB a token at 7B in bf16)."""

    def __init__(self, transformer, skip: tuple[int, int] | None = None):
        self.transformer, self.args = transformer, transformer.args
        self.weights = [
            (b.attention_norm.weight, b.attention.fused[0].tensor,
             (b.attention.fused[1].tensor, b.attention.fused[2].tensor, b.attention.q_norm.eps) if b.attention.qk_normalization else None,
             b.attention.wo.weight, b.ffn_norm.weight, b.feed_forward.fused[0].tensor, b.feed_forward.w2.weight)
            for b in transformer.layers
        ]
        self.key = self.weights_key(transformer)
        args, w = self.args, transformer.output.weight
        qkv_width = (args.n_heads + 2 * args.kv_heads) * args.head_dim

        def empty(n, dtype=w.dtype):
            return torch.empty(n, dtype=dtype, device=w.device)

        self.x, self.h, self.qkv = empty(args.dim), empty(args.dim), empty(qkv_width)
        self.attn, self.ffn = empty(args.n_heads * args.head_dim), empty(args.ffn_hidden_dim)
        self.skip = skip
        self.logits = torch.full((args.vocab_size,), float("-inf"), device=w.device)

    @staticmethod
    def weights_key(transformer) -> tuple:
        return tuple((t.data_ptr(), t.shape, t.dtype) for t in (*transformer.parameters(), *(f.tensor for f in transformer.fused_tensors())))

    def step_logits(self, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Float32 logits (1, vocab) for one token (tokens (1, 1), its RoPE position (1, 1)) written
        at cache slot `slot` (1,), which the caller has marked valid."""
        t, args = self.transformer, self.args
        eps = args.norm_eps
        rope = t.rope_freqs(self.x.device)
        torch.index_select(t.tok_embeddings.weight, 0, tokens.view(1), out=self.x.view(1, -1))
        for i, (attention_norm, qkv, qk_norm, wo, ffn_norm, w13, w2) in enumerate(self.weights):
            gemv(qkv, self.x, self.qkv, norm=attention_norm, eps=eps)
            decode_attention(self.qkv.view(1, -1), qk_norm, rope, positions, slot, cache.k[i], cache.v[i], cache.valid,
                             self.attn.view(1, -1), args)
            gemv(wo, self.attn, self.h, residual=self.x)
            gemv(w13, self.h, self.ffn, norm=ffn_norm, eps=eps, swiglu=True)
            gemv(w2, self.ffn, self.x, residual=self.h)
        gemv(t.output.weight, self.x, self.logits, norm=t.norm.weight, eps=eps, skip=self.skip)
        return self.logits.view(1, -1)

    def greedy_step(self, cache: KVCache, state) -> None:
        """The compiled greedy step's work (compiled_decode._compiled_greedy_step) on these kernels."""
        cache.valid.index_fill_(1, state.slot, True)
        state.advance(self.step_logits(state.tokens, state.positions, state.slot, cache))


def fused_decoder(transformer, skip: tuple[int, int] | None = None) -> FusedDecoder:
    """The model's decoder for this `skip`, kept on it while its weights are the tensors it was
    made for."""
    decoders = transformer.__dict__.setdefault("_fused_decoders", {})
    decoder, key = decoders.get(skip), FusedDecoder.weights_key(transformer)
    if decoder is not None and decoder.key != key:
        decoders.clear()  # (each holds buffers, and the old weights' graphs through its step)
    elif decoder is not None and not (decoder.x.is_inference() and not torch.is_inference_mode_enabled()):  # (writable now)
        return decoder
    decoder = decoders[skip] = FusedDecoder(transformer, skip)
    return decoder


def skipped_range(vocab_spans: list[tuple[int, int]], needed: tuple[int, ...] | None) -> tuple[int, int] | None:
    """The longest run of vocabulary spans (Transformer.vocab_spans) outside `needed` (span
    indices; None: all), as one id range for `FusedDecoder`'s skip, or None."""
    runs = []
    for i, (a, b) in enumerate(vocab_spans):
        if needed is not None and i not in needed:
            if runs and runs[-1][1] == a:  # (spans are contiguous: only a needed one breaks a run)
                runs[-1][1] = b
            else:
                runs.append([a, b])
    return tuple(max(runs, key=lambda r: r[1] - r[0])) if runs else None
