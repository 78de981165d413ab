"""State-dict conversion between this stack's layout, Meta's (sharded) layout and Hugging Face's.

This stack keeps Meta's parameter names and Meta's interleaved RoPE layout, with q/k-norm stored
per head. HF rotates halves (`rotate_half`), so its q/k projection rows and its q/k-norm
parameters are permuted within each head: Meta's pair (2i, 2i+1) sits at HF's (i, i + hd/2).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

from chameleon.config import ModelArgs
from chameleon.errors import InputError
from chameleon.model import rope_inv_freq

Tensors = Mapping[str, torch.Tensor]  # a dict, or LazyTensors


class LazyTensors(Mapping):
    """Tensors made when read and not kept: a merged, permuted or cast copy of a checkpoint's
    weights, made one tensor at a time by whoever reads it (the streaming safetensors writer,
    `chameleon.load`'s assignment), so that converting a large checkpoint never holds a second full
    copy. `specs` gives each tensor's shape and dtype (as meta tensors) without making it. Not for
    `load_state_dict`, which copies it into a dict: every tensor made at once. `make_chunk`, where
    given, makes one chunk of a tensor (see `chunk`) from what it needs alone: one Meta shard's slice."""

    def __init__(self, specs: dict[str, torch.Tensor], make: Callable[[str], torch.Tensor],
                 make_chunk: Callable[[str, int, int, int], torch.Tensor] | None = None):
        self.specs, self._make, self.make_chunk = specs, make, make_chunk

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.specs:
            raise KeyError(name)
        return self._make(name)

    def __contains__(self, name: object) -> bool:  # (Mapping's would make the tensor)
        return name in self.specs

    def __iter__(self):
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)


def chunk(sd: Tensors, name: str, chunks: int, dim: int, index: int) -> torch.Tensor:
    """`torch.chunk(sd[name], chunks, dim)[index]` alone in its storage (torch.save of a view writes
    its whole storage): a dict's copied; a LazyTensors' made from the slices it covers alone, where
    it can (merged Meta shards: shard s of as many is that file's tensor as it is)."""
    if isinstance(sd, LazyTensors) and sd.make_chunk:
        return sd.make_chunk(name, chunks, dim, index)
    return _cut(sd[name], chunks, dim, index)


def _cut(t: torch.Tensor, chunks: int, dim: int, index: int) -> torch.Tensor:
    return torch.chunk(t, chunks, dim)[index].clone()


def standalone(t: torch.Tensor) -> torch.Tensor:
    """`t` where torch.save writes it alone and as a contiguous tensor (its storage is exactly it,
    e.g. a memory-mapped shard's), else a contiguous copy."""
    return t if t.is_contiguous() and t.untyped_storage().nbytes() == t.nbytes else t.clone(memory_format=torch.contiguous_format)


def specs(sd: Tensors) -> Mapping[str, torch.Tensor]:
    """Each tensor's shape, dtype and nbytes, without making those of a LazyTensors (whose tensors
    may take a read and a merge each): for a dict, its tensors themselves."""
    return sd.specs if isinstance(sd, LazyTensors) else sd


def _spec(shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def cast(sd: Tensors, dtype: torch.dtype) -> LazyTensors:
    """`sd` in another dtype, each tensor cast when read."""
    return LazyTensors({k: _spec(v.shape, dtype) for k, v in specs(sd).items()}, lambda k: sd[k].to(dtype),
                       lambda k, *where: chunk(sd, k, *where).to(dtype))  # (a chunk cast: not the whole tensor)


# Per layer: our/Meta name -> HF name.
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.q_norm.bias": "self_attn.q_norm.bias",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "attention.k_norm.bias": "self_attn.k_norm.bias",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
HF_VQ_PREFIX = "model.vqmodel."


def interleaved_to_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Permute the rows of each head from Meta's (pairs) to HF's (halves) order. w: (heads*hd, ...)."""
    rest = w.shape[1:]
    hd = w.shape[0] // heads
    return w.reshape(heads, hd // 2, 2, *rest).transpose(1, 2).reshape(heads * hd, *rest)


def halves_to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    rest = w.shape[1:]
    hd = w.shape[0] // heads
    return w.reshape(heads, 2, hd // 2, *rest).transpose(1, 2).reshape(heads * hd, *rest)


def _permute_norm(w: torch.Tensor, fn) -> torch.Tensor:
    heads, hd = w.shape
    return fn(w.reshape(heads * hd), heads).reshape(heads, hd)


def _heads_of(suffix: str, args: ModelArgs) -> int:
    return args.n_heads if ".wq." in suffix or ".q_norm." in suffix else args.kv_heads


def _relayout(suffix: str, w: torch.Tensor, args: ModelArgs, fn) -> torch.Tensor:
    """Apply a RoPE-layout permutation to the tensors it concerns: q/k rows and q/k-norms.
    A tensor of the wrong shape is left as is, for the shape check to name."""
    heads = _heads_of(suffix, args)
    if suffix in ("attention.wq.weight", "attention.wk.weight") and w.shape[:1] == (heads * args.head_dim,):
        return fn(w, heads)
    if suffix.startswith(("attention.q_norm", "attention.k_norm")) and w.shape == (heads, args.head_dim):
        return _permute_norm(w, fn)
    return w


def _hf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    _, idx, suffix = name.split(".", 2)
    return f"model.layers.{idx}.{_LAYER_NAMES[suffix]}"


def to_hf(sd: Tensors, args: ModelArgs) -> LazyTensors:
    """HF's names and RoPE layout, each tensor permuted when read (the permutations keep shapes)."""
    ours = {_hf_name(name): name for name in sd}

    def make(hf_name: str) -> torch.Tensor:
        name = ours[hf_name]
        w = sd[name]
        return w if name in _TOP_NAMES else _relayout(name.split(".", 2)[2], w, args, interleaved_to_halves)

    return LazyTensors({hf: specs(sd)[name] for hf, name in ours.items()}, make)


def from_hf(sd: Tensors, args: ModelArgs, source: str) -> LazyTensors:
    """Our names (checked at once) and Meta's RoPE layout, each q/k tensor permuted when read: the
    permuted copies (a 7B's q/k rows: ~2 GB) are never all held at once; a Meta shard's chunk
    permutes that shard's rows alone."""
    inverse_top = {v: k for k, v in _TOP_NAMES.items()}
    inverse_layer = {v: k for k, v in _LAYER_NAMES.items()}
    hf_names: dict[str, str] = {}  # our name -> HF's
    for name in sd:
        if name in inverse_top:
            hf_names[inverse_top[name]] = name
            continue
        parts = name.split(".", 3)
        if len(parts) != 4 or parts[:2] != ["model", "layers"] or parts[3] not in inverse_layer:
            raise InputError(f"{source}: unexpected weight {name!r} for a Chameleon decoder")
        hf_names[f"layers.{parts[2]}.{inverse_layer[parts[3]]}"] = name

    def make(name: str) -> torch.Tensor:
        w = sd[hf_names[name]]
        return w if name in _TOP_NAMES else _relayout(name.split(".", 2)[2], w, args, halves_to_interleaved)

    def make_chunk(name: str, chunks: int, dim: int, index: int) -> torch.Tensor:
        """A chunk of a tensor (see `chunk`): q/k rows cut on head boundaries (Meta shards' are)
        permuted alone, the permutation being within each head: not the whole matrix per shard."""
        w, hd = sd[hf_names[name]], args.head_dim
        suffix = name.split(".", 2)[-1]
        if suffix in ("attention.wq.weight", "attention.wk.weight") and w.shape[:1] == (_heads_of(suffix, args) * hd,) and dim == 0:
            parts = torch.chunk(w, chunks, dim)
            if parts[0].shape[0] % hd == 0:  # (chunk i starts at i * the first's length: on a head boundary)
                return standalone(halves_to_interleaved(parts[index], parts[index].shape[0] // hd))
        return standalone(torch.chunk(make(name), chunks, dim)[index])

    given = specs(sd)
    return LazyTensors({name: _spec(given[hf].shape, given[hf].dtype) for name, hf in hf_names.items()}, make, make_chunk)


# --- Meta shards ------------------------------------------------------------------------------
# How each parameter is split across model-parallel shards (None: replicated).
def _split_dim(name: str) -> int | None:
    if name == "tok_embeddings.weight" or name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1
    if name == "output.weight" or name.endswith(("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight", "feed_forward.w3.weight")):
        return 0
    return None


def from_meta_shards(shards: list[Tensors], args: ModelArgs, source: str) -> Tensors:
    """Meta's consolidated.NN.pth shards merged, each shard's q/k-norm expanded to its heads. With
    several shards, each tensor is merged when read (a LazyTensors): the merged weights are never
    all held beside the shards (a 34B's 4 shards would need ~68 GB more)."""
    n = len(shards)
    if n != args.model_parallel_size and n != 1:
        raise InputError(f"{source}: found {n} checkpoint shards but params.json says model_parallel_size={args.model_parallel_size}")
    names: dict[str, str] = {}  # our name -> Meta's
    for name in shards[0]:
        if name != "rope.freqs":
            names[name.replace("q_normalization", "q_norm").replace("k_normalization", "k_norm")] = name

    def heads_of(norm: str) -> int:
        return args.n_heads if "q_normalization" in norm else args.kv_heads

    def merged(ours: str) -> torch.Tensor:
        name = names[ours]
        parts = [s[name] for s in shards]
        if name != ours:  # a q/k-norm: one per shard, repeated for each of its heads
            heads = heads_of(name)
            per_shard = heads // args.model_parallel_size
            norms = parts if n > 1 else parts * args.model_parallel_size
            return torch.stack([norms[i // per_shard] for i in range(heads)])
        dim = _split_dim(name)
        if dim is None:
            # Replicated (RMSNorm weights): shards normally agree; average only where they do not.
            same = all(torch.equal(parts[0], p) for p in parts[1:])
            return parts[0] if same else torch.stack(parts).float().mean(0).to(parts[0].dtype)
        return torch.cat(parts, dim=dim) if n > 1 else parts[0]

    def spec(ours: str) -> torch.Tensor:
        name = names[ours]
        first = shards[0][name]
        if name != ours:
            return _spec((heads_of(name), *first.shape), first.dtype)
        dim = _split_dim(name)
        shape = list(first.shape)
        if dim is not None and dim < len(shape):
            shape[dim] *= n
        return _spec(shape, first.dtype)

    def merged_chunk(ours: str, chunks: int, dim: int, index: int) -> torch.Tensor:
        """A chunk of the merged tensor from the shards' slices it covers alone: writing as many
        shards as were read, shard s's slices as they are (read once, not merged once per shard)."""
        name = names[ours]
        if name != ours or dim != _split_dim(name):  # (replicated, or a q/k-norm: cut from the merged)
            return _cut(merged(ours), chunks, dim, index)
        width = specs(shards[0])[name].shape[dim]
        step = -(-width * n // chunks)  # torch.chunk's
        start, stop = index * step, min((index + 1) * step, width * n)
        pieces = []
        for i, shard in enumerate(shards):
            lo, hi = max(start, i * width), min(stop, (i + 1) * width)  # what shard i holds of the chunk
            if lo < hi:
                pieces.append(shard[name].narrow(dim, lo - i * width, hi - lo))
        return standalone(pieces[0]) if len(pieces) == 1 else torch.cat(pieces, dim=dim)

    lazy = LazyTensors({ours: spec(ours) for ours in names}, merged, merged_chunk)
    # One file needs no merging: its tensors (memory-mapped) as they are, but the norms expanded.
    return {k: lazy[k] for k in lazy} if n == 1 else lazy


def check_meta_shards(args: ModelArgs, num_shards: int) -> None:
    """Whether a model of this shape can be saved as `num_shards` Meta files (from its config alone).
    Errors name the Python API's `shards=N`; the CLI reads them as `--shards N` (`commands.shards_flag`)."""
    mp = args.model_parallel_size
    if num_shards not in (1, mp):
        raise InputError(f"shards={num_shards}: a Meta checkpoint has 1 file or model_parallel_size={mp} files")
    if num_shards > 1:  # Meta's model-parallel layout gives each shard an equal slice of these
        for what, size in (("vocab_size", args.vocab_size), ("dim", args.dim), ("the FFN width", args.ffn_hidden_dim)):
            if size % num_shards:
                raise InputError(f"shards={num_shards}: {what} ({size}) does not split into {num_shards} equal shards; save with shards=1, or keep the HF format")


def to_meta_shards(sd: Tensors, args: ModelArgs, num_shards: int) -> Iterator[Tensors]:
    """Split into Meta shards, checked at once, each a LazyTensors whose tensors (copies of their
    slices: torch.save of a view writes the whole tensor) are made when read, so that a streaming
    writer (`write_pth`) holds one tensor at a time, not a shard's. Merged Meta
    shards cut into as many give each source shard's slices as they are (`chunk`): read once, not
    merged once per shard; an HF source's q/k rows are permuted per shard, not whole once per shard.
    Each shard keeps one q/k-norm, so heads within a shard must share it."""
    check_meta_shards(args, num_shards)
    mp = args.model_parallel_size
    norms: dict[str, torch.Tensor] = {}  # name -> each model-parallel shard's norm, (mp, head_dim)
    for name in sd:
        if name.endswith((".q_norm.weight", ".q_norm.bias", ".k_norm.weight", ".k_norm.bias")):
            w = sd[name]
            per_shard = w.shape[0] // mp
            groups = w.reshape(mp, per_shard, -1)
            if not torch.equal(groups, groups[:, :1].expand_as(groups)):
                raise InputError(
                    f"weight {name}: heads within a model-parallel shard have different q/k-norm parameters; "
                    "Meta's format stores one per shard, so this model can only be saved in HF format"
                )
            # A single file of a model-parallel model keeps shard 0's norm: lossless only if all agree.
            if num_shards == 1 and mp > 1 and not torch.equal(groups[:, 0], groups[:1, 0].expand_as(groups[:, 0])):
                raise InputError(f"weight {name}: shards have different q/k-norms; save with shards={mp}, or keep the HF format")
            norms[name] = groups[:, 0]
    freqs = rope_inv_freq(args)

    def shard(s: int) -> LazyTensors:
        spec: dict[str, torch.Tensor] = {}
        make: dict[str, Callable[[], torch.Tensor]] = {}  # (a LazyTensors' tensor is made when written, only its slice kept)
        for name, w in specs(sd).items():
            dim = _split_dim(name)
            if name in norms:
                meta_name = name.replace("q_norm", "q_normalization").replace("k_norm", "k_normalization")
                spec[meta_name], make[meta_name] = norms[name][s], lambda n=name: norms[n][s].clone()
            elif dim is None or num_shards == 1:
                spec[name], make[name] = w, lambda n=name: sd[n]
            else:
                spec[name], make[name] = torch.chunk(_spec(w.shape, w.dtype), num_shards, dim)[s], lambda n=name, d=dim: chunk(sd, n, num_shards, d, s)
        spec["rope.freqs"], make["rope.freqs"] = freqs, lambda: freqs  # Meta's loader expects this (unused) buffer
        return LazyTensors(spec, lambda name: make[name]())

    return (shard(s) for s in range(num_shards))
