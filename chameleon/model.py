"""The Chameleon decoder: Llama-2 with per-head QK-norm, optional swin-norm, GQA, and a static KV cache.

Weights live in Meta's layout (interleaved RoPE pairs). Unlike Meta's checkpoints, the q/k-norm
parameters are stored per head, shape (heads, head_dim): that represents both Meta's one norm per
model-parallel shard and HF's per-head norms without loss.
"""

from __future__ import annotations

import functools
import operator
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from chameleon.config import ModelArgs
from chameleon.errors import InputError


@functools.cache
def _cpu_has_bf16_kernels() -> bool:
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _packing_active(w: torch.Tensor) -> bool:
    """oneDNN-packed bf16 weights pay off for CPU inference; never under autograd or compilation."""
    return (
        w.dtype == torch.bfloat16
        and w.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and _cpu_has_bf16_kernels()
    )


SMALLEST_PACKED = 1 << 14  # elements; below, a oneDNN call's fixed cost exceeds what packing saves


def packed_weight(w: torch.Tensor, packed: dict | None, key) -> torch.Tensor:
    """w, or for bf16 on CPU a oneDNN-packed copy of it kept in `packed[key]` (None: never pack).

    PyTorch's plain bf16 matrix-vector product on CPU reorders the weight on every call; with packed
    copies a 100M-parameter bf16 decode step is about 1.6x faster. A copy is rebuilt whenever w
    changes (another tensor, or an in-place update, which bumps the version counter). The cost: a
    second copy of the weight. Each entry holds its source tensor, so that the memory of a replaced
    weight cannot be reused by a new one at the same address (which would match the stamp).
    """
    if packed is None or not _packing_active(w) or w.numel() < SMALLEST_PACKED:
        return w
    stamp = (w.data_ptr(), 0 if w.is_inference() else w._version, w.shape)  # inference tensors have no version
    entry = packed.get(key)
    if entry is None or entry[0] != stamp:
        packed.pop(key, None)  # a stale copy's memory counts as free for its replacement
        if _room_to_pack(w.numel() * w.element_size()):
            entry = packed[key] = (stamp, torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1), w)
            _use_huge_pages(entry[1])
        else:  # remembered: asked again only once this weight changes
            entry = packed[key] = (stamp, None, w)
    return w if entry[1] is None else entry[1]


PACKING_HEADROOM = 1 << 30  # bytes of memory left free after a packed copy


# cgroup memory files: (mount, limit, usage, reclaimable page cache in memory.stat), v2 then v1
_CGROUP_FILES = {"v2": ("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
                 "v1": ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}


def _available_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable from /proc/meminfo, or less where a
    cgroup limit (a container's, a job scheduler's) on its cgroup or an ancestor leaves less,
    counting usage without the page cache the kernel can reclaim. None where Linux does not tell."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            version = "v2" if controllers == "" else "v1" if "memory" in controllers.split(",") else None
            if version is not None:
                found += _cgroup_headroom(*_CGROUP_FILES[version], path)
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _cgroup_headroom(mount: str, limit_file: str, usage_file: str, cache_key: str, path: str) -> list[int]:
    """limit - (usage - reclaimable cache) for the cgroup at `path` and each ancestor with a limit."""
    root = Path(mount)
    group = root / path.lstrip("/")
    out = []
    for level in (group, *group.parents):
        if not level.is_relative_to(root):
            break
        try:
            limit = int((level / limit_file).read_text().strip())
        except (OSError, ValueError):  # no such file here, or "max"
            continue
        if limit >= 1 << 60:  # cgroup v1 writes "no limit" as a huge number
            continue
        stat = dict(line.split() for line in (level / "memory.stat").read_text().splitlines())
        out.append(limit - (int((level / usage_file).read_text()) - int(stat.get(cache_key, 0))))
    return out


def _room_to_pack(nbytes: int) -> bool:
    """Whether a packed copy of nbytes fits with PACKING_HEADROOM to spare. Packing doubles the
    weights' memory (14 GB more for a 7B bf16 model), which must not end in the OOM killer: where
    memory runs short the remaining matrices stay unpacked (slower, same values), with a warning."""
    free = _available_memory()
    if free is None or free - nbytes >= PACKING_HEADROOM:
        return True
    warnings.warn(
        f"only {free / 2**30:.1f} GiB of memory available: bf16 weights that are not packed yet stay unpacked "
        "(decoding about half as fast; chameleon.load(..., pack_bf16=False) skips packing without this warning)"
    )
    return False


HUGE_PAGES = True  # set False to keep packed weights on the allocator's pages (see `_use_huge_pages`)
HUGE_PAGE = 2 << 20
MADV_COLLAPSE = 25  # Linux 6.1+


@functools.cache
def _madvise():
    """libc's madvise, where Linux and this torch (which exposes a packed tensor's address) allow."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux") or not all(hasattr(torch.ops.mkldnn, op) for op in ("data_ptr", "_nbytes")):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def _use_huge_pages(packed: torch.Tensor) -> None:
    """Back a packed weight with 2 MB pages (best effort; Linux 6.1+, whatever the THP setting).

    A decode step streams every weight once; with 4 KB pages that is a TLB miss every 4 KB.
    Collapsing the 2 MB pages around each packed copy below 32 MB (their neighbours' memory
    included, so up to 4 MB more becomes resident) and inside each larger one made a 100M bf16
    CPU decode step ~8% faster, for ~5% more resident memory. The collapse is synchronous: it runs
    when a copy is (re)packed. PyTorch does the like for its own large allocations under
    THP_MEM_ALLOC_ENABLE=1, if set before it first allocates. Off: `HUGE_PAGES = False`."""
    madvise = _madvise() if HUGE_PAGES else None
    if madvise is None:
        return
    start, size = torch.ops.mkldnn.data_ptr(packed), torch.ops.mkldnn._nbytes(packed)
    if size >= 16 * HUGE_PAGE:  # a large matrix: the 2 MB pages inside it cover nearly all of it
        first, end = -(-start // HUGE_PAGE) * HUGE_PAGE, (start + size) // HUGE_PAGE * HUGE_PAGE
    else:  # the pages around it, its neighbours' memory included (at most 4 MB more)
        first, end = start // HUGE_PAGE * HUGE_PAGE, -(-(start + size) // HUGE_PAGE) * HUGE_PAGE
    if end > first:
        madvise(first, end - first, MADV_COLLAPSE)  # an error (old kernel, no THP) leaves 4 KB pages


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T, for a weight from `packed_weight`. (oneDNN could add the residual inside the
    product, `_linear_pointwise.binary`; that measured ~2% slower per step than a separate add.)"""
    if not torch.compiler.is_compiling() and w.is_mkldnn:  # (packing is off in compiled graphs)
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return F.linear(x, w)


def linear(x: torch.Tensor, w: torch.Tensor, packed: dict | None, key) -> torch.Tensor:
    """x @ w.T through a packed copy of w where that pays (see `packed_weight`)."""
    return matmul(x, packed_weight(w, packed, key))


class Fused:
    """One tensor behind several parameters stacked along dim 0 (q/k/v weights, w1/w3, q/k-norms).

    The parameters become row-slice views of it, so state dicts, optimisers and load_state_dict see
    the usual names and every in-place update reaches the fused tensor; inference then runs one
    matrix product (or one norm) where there were two or three. Once a parameter is replaced
    (`.to()`, `load_state_dict(assign=True)`) the fused tensor is stale and `current()` says so.
    """

    def __init__(self, owners: list[tuple[nn.Module, str]], input_major: bool = False):
        parts = [getattr(module, name) for module, name in owners]
        dense = torch.cat([p.detach() for p in parts])
        if input_major:
            dense = dense.t().contiguous().t()
        start = 0
        for (module, name), p in zip(owners, parts):
            setattr(module, name, nn.Parameter(dense[start : start + len(p)], requires_grad=p.requires_grad))
            start += len(p)
        self.owners = owners
        self.tensor = dense
        self.ptrs = [getattr(module, name).data_ptr() for module, name in owners]
        self.checked = False  # current() as last checked outside a compiled graph

    def current(self) -> bool:
        return all(getattr(module, name).data_ptr() == p for (module, name), p in zip(self.owners, self.ptrs))


def fused_current(fused: list[Fused]) -> bool:
    """Whether inference may use these fused tensors (see `Transformer.inference_weights`)."""
    if torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling():
        return all(f.checked for f in fused)
    return all(f.current() for f in fused)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalised in fp32 for bf16 stability and rounded before the weight is applied, like Meta's
    and HF's implementations."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _cpu_eager(x: torch.Tensor) -> bool:
    """Eager CPU inference runs kernel by kernel, and a decode step is bound by its many small
    kernels; compiled graphs fuse them anyway, so they (and GPUs) keep the plain forms."""
    return not torch.compiler.is_compiling() and x.is_cpu


def rms_norm_inference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm` for the fused inference path, with a weight from `inference_norm_weight`.

    On CPU, eager: the layer norm of [x, -x] has mean 0 and variance mean(x^2), so its first half
    is the RMS norm of x. It is one fused kernel, computing in fp32 and applying the weight before
    it rounds (PyTorch's CPU rms_norm is 5 kernels, plus 2 conversions and the weight's product),
    and a decoded token makes 2 per layer. It rounds once where `rms_norm` rounds twice, so bf16
    outputs may differ by one unit in the last place, closer to exact arithmetic.
    """
    if not _cpu_eager(x):
        return rms_norm(x, weight, eps)
    d = x.shape[-1]
    return F.layer_norm(torch.cat([x, x.neg()], dim=-1), (2 * d,), weight, eps=eps).narrow(-1, 0, d)


def inference_norm_weight(weight: torch.Tensor) -> torch.Tensor:
    """The RMSNorm weight as `rms_norm_inference` takes it: doubled for the layer norm of [x, -x]."""
    return torch.cat([weight, weight]) if _cpu_eager(weight) else weight


class HeadNorm(nn.Module):
    """LayerNorm over each head's features, with a separate weight and bias per head."""

    def __init__(self, heads: int, head_dim: int, eps: float = 1e-5):  # Meta's and HF's: the default
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., heads, head_dim)
        return torch.addcmul(self.bias, F.layer_norm(x, (x.shape[-1],), eps=self.eps), self.weight)


def rope_inv_freq(args: ModelArgs, device=None) -> torch.Tensor:
    """theta_j = rope_theta^(-2j/head_dim), (head_dim/2,); also Meta's `rope.freqs` buffer."""
    hd = args.head_dim
    return 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float, device=device) / hd))


def rope_tables(args: ModelArgs, device=None) -> torch.Tensor:
    """cos and sin of pos * theta_j, float32 (max_seq_len, head_dim/2, 2)."""
    inv_freq = rope_inv_freq(args, device)
    angles = torch.arange(args.max_seq_len, dtype=torch.float, device=device)[:, None] * inv_freq[None, :]
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by the angles of `freqs`. x: (B, T, H, hd); freqs:
    (B, T, hd/2, 2), cos and sin. Real arithmetic, which torch.compile fuses with the q/k-norms (it
    cannot fuse complex products: each became an eager kernel). On CPU, eager, one complex product
    instead: the same bits in 3 kernels, ~4x faster than the real form's 9."""
    if not _cpu_eager(x):
        pairs = x.float().unflatten(-1, (-1, 2))
        re, im = pairs[..., 0], pairs[..., 1]
        cos, sin = freqs[:, :, None, :, 0], freqs[:, :, None, :, 1]
        return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2).type_as(x)
    rotated = torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * torch.view_as_complex(freqs)[:, :, None]
    return torch.view_as_real(rotated).flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Preallocated keys/values, one (batch, kv_heads, max_seq_len, head_dim) tensor per layer.

    Separate tensors per layer (not one stacked tensor) let a compiled step write its new slot in
    place: a write into a slice of one big input makes torch.compile copy the whole cache per layer.
    `valid[b, s]` says whether row b may attend to slot s. Left padding, and the guidance rows of
    interleaved generation that skip text tokens, are written into slots that stay invalid.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_seq_len: int, dtype: torch.dtype, device=None):
        super().__init__()
        shape = (batch_size, args.kv_heads, max_seq_len, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.register_buffer("valid", torch.zeros(batch_size, max_seq_len, dtype=torch.bool, device=device), persistent=False)

    @classmethod
    def from_tensors(cls, k: list[torch.Tensor], v: list[torch.Tensor], valid: torch.Tensor) -> "KVCache":
        """A cache over given tensors (e.g. views of larger buffers), shaped as `__init__` makes them."""
        cache = cls.__new__(cls)
        nn.Module.__init__(cache)
        cache.k, cache.v = list(k), list(v)
        cache.register_buffer("valid", valid, persistent=False)
        return cache

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.valid.shape[1]

    def tensors(self) -> list[torch.Tensor]:
        return [*self.k, *self.v, self.valid]

    def layout(self) -> str:
        """Layers, kv heads and head size: what a cache shares with the model that fills it."""
        return describe_layout(len(self.k), *self.k[0].shape[1::2]) if self.k else "no layers"

    def copy_rows_from(self, src: "KVCache", src_row: int = 0, length: int | None = None) -> None:
        """Broadcast one row of `src` (e.g. a prefilled shared prefix) into every row of this cache."""
        if not isinstance(src, KVCache):
            raise InputError(f"src: expected a KVCache, got {type(src).__name__}")
        if src.layout() != self.layout():  # (a cache of fewer layers would fill only some)
            raise InputError(f"src: a cache of another model: {src.layout()}; this cache has {self.layout()}")
        row = _as_index(src_row)
        if not (row is not None and 0 <= row < src.batch_size):
            raise InputError(f"src_row: expected 0..{src.batch_size - 1} (the source has {src.batch_size} row(s)), got {src_row!r}")
        most = min(src.max_seq_len, self.max_seq_len)
        n = most if length is None else _as_index(length)
        if not (n is not None and 0 <= n <= most):
            raise InputError(f"length: expected 0..{most} (slots in both caches), got {length!r}")
        for dst, source in zip(self.k + self.v, src.k + src.v):
            dst[:, :, :n] = source[row : row + 1, :, :n]
        self.valid[:, :n] = src.valid[row, :n]
        self.valid[:, n:] = False


def _as_index(value) -> int | None:
    """An integer, Python's, numpy's or a one-element integer tensor's (e.g. a length taken from
    an array), as an int; None for anything else (floats, bools)."""
    try:
        return None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        return None


def describe_layout(n_layers: int, kv_heads: int, head_dim: int) -> str:
    return f"{n_layers} layers of {kv_heads} kv heads x {head_dim}"


def attend(q, k, v, mask, layer: int, cache: KVCache | None, input_pos, kv_len: int | None, dropout_p: float = 0.0):
    """Write k/v (B, kv_heads, T, hd) into the cache, then attend with q (B, heads, T, hd)."""
    if cache is not None:
        cache_k, cache_v = cache.k[layer], cache.v[layer]
        if isinstance(input_pos, int):  # eager: write a slice
            cache_k.narrow(2, input_pos, q.shape[2]).copy_(k)
            cache_v.narrow(2, input_pos, q.shape[2]).copy_(v)
        else:  # a tensor of slots keeps compiled shapes static
            cache_k[:, :, input_pos] = k
            cache_v[:, :, input_pos] = v
        k, v = cache_k, cache_v
        if kv_len is not None:
            k, v = k.narrow(2, 0, kv_len), v.narrow(2, 0, kv_len)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout_p, enable_gqa=k.shape[1] != q.shape[1]
    )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.qk_normalization = args.qk_normalization
        if args.qk_normalization:
            self.q_norm = HeadNorm(args.n_heads, args.head_dim)
            self.k_norm = HeadNorm(args.kv_heads, args.head_dim)
        self.dropout = args.dropout
        # Set by Transformer.fuse_(): q/k/v weights, q/k-norm weights and biases.
        self.fused: list[Fused] | None = None

    def fuse_(self, input_major: bool) -> None:
        self.fused = [Fused([(self.wq, "weight"), (self.wk, "weight"), (self.wv, "weight")], input_major=input_major)]
        if self.qk_normalization:
            self.fused += [Fused([(self.q_norm, p), (self.k_norm, p)]) for p in ("weight", "bias")]

    def forward(self, x, freqs, mask, layer: int, cache: KVCache | None, input_pos, kv_len: int | None):
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.kv_heads, self.head_dim)
        if self.qk_normalization:  # before RoPE, as in Meta's and HF's code
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        p = self.dropout if self.training else 0.0
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        out = attend(q, k, v, mask, layer, cache, input_pos, kv_len, p)
        out = self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))
        return F.dropout(out, p, True) if p else out


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = nn.Linear(args.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)
        self.dropout = args.dropout
        self.fused: list[Fused] | None = None  # w1/w3, set by Transformer.fuse_()

    def fuse_(self, input_major: bool) -> None:
        self.fused = [Fused([(self.w1, "weight"), (self.w3, "weight")], input_major=input_major)]

    def forward(self, x):
        out = self.w2(F.silu(self.w1(x)) * self.w3(x))
        return F.dropout(out, self.dropout, True) if self.dropout and self.training else out


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.swin_norm = args.swin_norm

    def forward(self, x, freqs, mask, layer, cache, input_pos, kv_len):
        if self.swin_norm:  # 34B: normalise the branch outputs instead of the inputs
            h = x + self.attention_norm(self.attention(x, freqs, mask, layer, cache, input_pos, kv_len))
            return h + self.ffn_norm(self.feed_forward(h))
        h = x + self.attention(self.attention_norm(x), freqs, mask, layer, cache, input_pos, kv_len)
        return h + self.feed_forward(self.ffn_norm(h))


class BlockWeights(NamedTuple):
    """One block's tensors for the fused inference path: fused q/k/v, w1/w3 and q/k-norms, the
    matrices as `packed_weight` gives them, the norms' as `inference_norm_weight` does."""

    attention_norm: torch.Tensor
    qkv: torch.Tensor
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None  # weight, bias (heads + kv_heads, head_dim), eps
    wo: torch.Tensor
    ffn_norm: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor


class InferenceWeights(NamedTuple):
    """What `Transformer.inference_weights` gathers: every block's tensors and the final norm's."""

    blocks: list[BlockWeights]
    norm: torch.Tensor


def fused_block(args: ModelArgs, w: BlockWeights, x, freqs, mask, layer: int, cache: KVCache | None, input_pos, kv_len):
    """`TransformerBlock.forward` for inference, on fused tensors: one product for q/k/v and one for
    w1/w3, q and k normalised and rotated as one tensor, and plain functions rather than modules
    (a CPU decode step spends a good part of its time on Python overhead)."""

    def attention(x):
        bsz, seqlen, _ = x.shape
        heads, kv_heads, hd = args.n_heads, args.kv_heads, args.head_dim
        qkv = matmul(x, w.qkv)
        # q and k are adjacent in the fused output: normalise and rotate them as one tensor.
        qk, v = qkv.split([(heads + kv_heads) * hd, kv_heads * hd], dim=-1)
        qk, v = qk.view(bsz, seqlen, heads + kv_heads, hd), v.view(bsz, seqlen, kv_heads, hd)
        if w.qk_norm is not None:
            weight, bias, eps = w.qk_norm
            qk = torch.addcmul(bias, F.layer_norm(qk, (hd,), eps=eps), weight)
        q, k = apply_rope(qk, freqs).split([heads, kv_heads], dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        out = attend(q, k, v, mask, layer, cache, input_pos, kv_len)
        return matmul(out.transpose(1, 2).reshape(bsz, seqlen, -1), w.wo)

    def feed_forward(x):
        gate, up = matmul(x, w.w13).chunk(2, dim=-1)
        return matmul(F.silu(gate) * up, w.w2)

    eps = args.norm_eps
    if args.swin_norm:
        h = x + rms_norm_inference(attention(x), w.attention_norm, eps)
        return h + rms_norm_inference(feed_forward(h), w.ffn_norm, eps)
    h = x + attention(rms_norm_inference(x, w.attention_norm, eps))
    return h + feed_forward(rms_norm_inference(h, w.ffn_norm, eps))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # Not a buffer: `.to(bf16)` must not touch the float32 rotation tables.
        self._rope: dict[torch.device, torch.Tensor] = {}
        self.vocab_spans = [(0, args.vocab_size)]
        self.packed: dict | None = None  # oneDNN-packed bf16 weights, see optimize_for_cpu_()

    def _apply(self, fn, recurse=True):
        # .to(), .cuda(), .float() and the like replace the parameters: the packed copies (and the
        # tensors each keeps alive) would only hold memory. bf16 CPU inference packs again.
        if self.packed:
            self.packed.clear()
        # The fused Triton decoders (chameleon/kernels.py) hold the weights they were made for, and
        # the greedy graphs captured around them (compiled_decode._GreedyGraphs) hold the decoders;
        # graphs keyed to the old weights would be captured anew anyway.
        self.__dict__.pop("_fused_decoders", None)
        self._greedy_graphs = None
        return super()._apply(fn, recurse)

    def rope_freqs(self, device: torch.device) -> torch.Tensor:
        if device not in self._rope:
            self._rope[device] = rope_tables(self.args, device=device)
        return self._rope[device]

    def fuse_(self, input_major: bool = False) -> None:
        """Fuse q/k/v, w1/w3 and the q/k-norms into one tensor each (see `Fused`): fewer, larger
        matrix products. Same values, same state dict; `load` does it on every device."""
        for block in self.layers:
            block.attention.fuse_(input_major)
            block.feed_forward.fuse_(input_major)
        self._warned_stale = False  # fused afresh: a later replacement warns again

    def fused_tensors(self) -> list[Fused]:
        return [f for b in self.layers for m in (b.attention, b.feed_forward) for f in (m.fused or [])]

    def check_fused(self) -> None:
        """Before running a compiled graph: record whether each fused tensor is still current."""
        for f in self.fused_tensors():
            f.checked = f.current()

    def inference_weights(self) -> InferenceWeights | None:
        """The tensors of the fused inference path (`fused_block`), or None where that path does
        not apply: autograd on (it must reach the separate parameters), dropout active, blocks not
        fused, or fused tensors stale since a parameter was replaced. A compiled graph cannot check
        staleness itself (it cannot trace data pointers): its caller checks first and records the
        answer in each `Fused.checked` (see `check_fused`)."""
        if self.training and self.args.dropout:
            return None
        if any(m.fused is None for b in self.layers for m in (b.attention, b.feed_forward)):
            return None
        if not fused_current(self.fused_tensors()):
            # Under autograd or in a graph this says nothing about staleness; otherwise it is stale.
            if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
                self._fusion_lost()
            return None
        blocks = []
        for i, b in enumerate(self.layers):
            attn, ffn = b.attention, b.feed_forward
            blocks.append(
                BlockWeights(
                    attention_norm=inference_norm_weight(b.attention_norm.weight),
                    qkv=packed_weight(attn.fused[0].tensor, self.packed, ("qkv", i)),
                    qk_norm=(attn.fused[1].tensor, attn.fused[2].tensor, attn.q_norm.eps) if attn.qk_normalization else None,
                    wo=packed_weight(attn.wo.weight, self.packed, ("wo", i)),
                    ffn_norm=inference_norm_weight(b.ffn_norm.weight),
                    w13=packed_weight(ffn.fused[0].tensor, self.packed, ("w13", i)),
                    w2=packed_weight(ffn.w2.weight, self.packed, ("w2", i)),
                )
            )
        return InferenceWeights(blocks, inference_norm_weight(self.norm.weight))

    def _fusion_lost(self) -> None:
        """Replaced weights: drop the blocks' packed copies (each keeps its replaced source alive)
        and say once that the fast path is off, and how to restore it on this device."""
        if self.packed:
            for key in [k for k in self.packed if k[0] != "output"]:
                del self.packed[key]
        if not getattr(self, "_warned_stale", False):
            self._warned_stale = True
            again = "optimize_for_cpu_()" if self.output.weight.device.type == "cpu" else "fuse_()"
            warnings.warn(
                "a parameter was replaced (by .to() or load_state_dict(assign=True), for instance), so inference "
                f"runs the separate, unfused modules (slower); call model.transformer.{again} to fuse them again"
            )

    def optimize_for_cpu_(self, pack_bf16: bool = True) -> None:
        """Lay the weights out for fast CPU inference; same values, same state dict.

        q/k/v, w1/w3 and the q/k-norms become one fused tensor each (see `Fused`), and
        every matrix is stored input-major (a transposed view of a contiguous copy): the one-token
        matrix-vector products of decoding read that layout measurably faster. bf16 weights are
        also packed for oneDNN on first use (see `packed_weight`) unless `pack_bf16` is False, which
        saves the packed copy's memory (as much again as the weights) at about half the decode speed.
        """
        self.fuse_(input_major=True)
        self.packed = {} if pack_bf16 else None
        for module in (*(b.attention.wo for b in self.layers), *(b.feed_forward.w2 for b in self.layers), self.output):
            w = module.weight
            if w.is_contiguous():
                module.weight = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=w.requires_grad)

    def set_vocab_spans(self, boundaries: list[int]) -> None:
        """Split the output layer's rows at these ids (e.g. around the image codes).

        Generation then computes logits only for the spans that can hold the next token: text
        steps skip the 8,192 image-code rows, image steps compute only those.
        """
        cuts = sorted({0, self.args.vocab_size, *(b for b in boundaries if 0 < b < self.args.vocab_size)})
        self.vocab_spans = list(zip(cuts[:-1], cuts[1:]))

    def head(self, h: torch.Tensor, spans: tuple[int, ...] | None = None) -> torch.Tensor:
        """Float32 logits over the vocabulary; with `spans` (indices into `vocab_spans`) only those
        rows are computed and every other logit is -inf."""
        w = self.output.weight
        if spans is None:
            if self.packed is None or not _packing_active(w):
                return self.output(h).float()
            spans = range(len(self.vocab_spans))  # packed blocks, concatenated: the full logits
            return torch.cat([self._span_logits(h, i) for i in spans], dim=-1).float()
        out = torch.full((*h.shape[:-1], self.args.vocab_size), float("-inf"), device=h.device)
        for i in spans:
            start, stop = self.vocab_spans[i]
            out[..., start:stop] = self._span_logits(h, i)
        return out

    def _span_logits(self, h: torch.Tensor, i: int) -> torch.Tensor:
        start, stop = self.vocab_spans[i]
        return linear(h, self.output.weight[start:stop], self.packed, ("output", i))

    def new_cache(self, batch_size: int, max_seq_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        max_seq_len = max_seq_len or self.args.max_seq_len
        dtype = dtype or self.output.weight.dtype
        return KVCache(self.args, batch_size, max_seq_len, dtype, self.output.weight.device)

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        input_pos: torch.Tensor | int | None = None,
        positions: torch.Tensor | None = None,
        kv_len: int | None = None,
        last_only: bool = False,
        spans: tuple[int, ...] | None = None,
        weights: InferenceWeights | None = None,
    ) -> torch.Tensor:
        """Logits for `tokens` (B, T), float32 (only the `spans` of the vocabulary if given; see `head`).

        Without a cache: plain causal attention. With a cache: K/V are written at slots `input_pos`
        (an int start or a (T,) tensor); each token attends to earlier slots its row marks valid
        (the caller sets `cache.valid` for the new slots first). `positions` (B, T) are the RoPE
        positions, by default the slots. `kv_len` bounds the slots read: eager callers pass the
        filled length, a compiled decode step reads the whole cache to keep shapes static.
        `weights`: `inference_weights()` computed once by a caller that runs many steps on
        unchanged weights; by default each call gathers them.
        """
        bsz, seqlen = tokens.shape
        device = tokens.device
        if input_pos is None:
            input_pos = 0
        slots = torch.arange(input_pos, input_pos + seqlen, device=device) if isinstance(input_pos, int) else input_pos
        if positions is None:
            positions = slots[None, :].expand(bsz, seqlen)
        mask = None
        if cache is not None:
            # (B, 1, T, K). A query always sees its own slot so that no softmax row is empty
            # (an empty row gives NaN, which would poison the cache through V).
            if seqlen == 1 and isinstance(input_pos, int) and kv_len == input_pos + 1:
                # An eager decode step reads the slots up to its own: no causal term needed.
                allowed = cache.valid[:, None, :kv_len].clone()
                allowed[..., input_pos] = True
            else:
                n_keys = kv_len if kv_len is not None else cache.max_seq_len
                keys = torch.arange(n_keys, device=device)[None, None, :]
                q = slots[None, :, None]
                allowed = ((keys <= q) & cache.valid[:, None, :n_keys]) | (keys == q)
            # Additive, in the activations' dtype: SDPA would convert a boolean mask in every layer.
            zero = torch.zeros((), dtype=self.output.weight.dtype, device=device)
            mask = torch.where(allowed, zero, float("-inf"))[:, None]
        freqs = self.rope_freqs(device)[positions]
        h = self.tok_embeddings(tokens)
        if weights is None:
            weights = self.inference_weights()
        elif torch.is_grad_enabled():
            raise ValueError("weights= serves inference only: with autograd on, gradients must reach the parameters")
        if weights is None:  # the modules: training, or weights not fused
            for i, layer in enumerate(self.layers):
                h = layer(h, freqs, mask, i, cache, input_pos, kv_len)
            return self.head(self.norm(h[:, -1:] if last_only else h), spans)
        for i, w in enumerate(weights.blocks):
            h = fused_block(self.args, w, h, freqs, mask, i, cache, input_pos, kv_len)
        return self.head(rms_norm_inference(h[:, -1:] if last_only else h, weights.norm, self.args.norm_eps), spans)
