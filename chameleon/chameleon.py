"""`Chameleon`: the decoder with its text tokenizer and VQGAN, and `load()` for either checkpoint format."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Union

import torch
from PIL import Image
from torch import nn

from chameleon.checkpoint import (Checkpoint, occupied, read_checkpoint, removed_on_failure, resolve_checkpoint_path,
                                  topmost_missing, write_hf, write_meta)
from chameleon.config import ModelArgs, VQGANConfig
from chameleon.errors import InputError, refuse_empty_paths, unicode_problem
from chameleon.generate import is_integer, is_token_id
from chameleon.model import KVCache, Transformer, describe_layout
from chameleon.progress import writing_bar
from chameleon.tokenizer import ChameleonTokenizer
from chameleon.vqgan import VQGAN

Segment = Union[str, Image.Image]
IMAGE_MARKER = "<image>"  # where an image goes in a text prompt (lm-eval's placeholder too)


def interleave(text: str, images: list, source: str = "prompt") -> list[Segment]:
    """Text with `<image>` markers + images -> segments. Without markers, images go first."""
    parts = text.split(IMAGE_MARKER)
    if len(parts) == 1:
        return [*images, text] if text else list(images)
    if len(parts) - 1 != len(images):
        raise InputError(f"{source} has {len(parts) - 1} '{IMAGE_MARKER}' placeholder(s) but {len(images)} image(s)")
    segments: list[Segment] = []
    for i, part in enumerate(parts):
        if part:
            segments.append(part)
        if i < len(images):
            segments.append(images[i])
    return segments


class Chameleon(nn.Module):
    def __init__(self, args: ModelArgs, vq_config: VQGANConfig, tokenizer: ChameleonTokenizer, with_decoder: bool = True):
        super().__init__()
        if tokenizer.vocab_size > args.vocab_size:
            raise InputError(f"{tokenizer.source}: tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is {args.vocab_size}")
        if tokenizer.n_image_codes != vq_config.n_embed:
            raise InputError(f"{tokenizer.source}: tokenizer has {tokenizer.n_image_codes} image tokens but the VQGAN codebook has {vq_config.n_embed} entries")
        self.config = args
        self.transformer = Transformer(args)
        # Image codes, text, and ids the tokenizer does not know: generation computes only the
        # output rows a step can sample from.
        codes = tokenizer.code_to_id
        self.transformer.set_vocab_spans([int(codes.min()), int(codes.max()) + 1, tokenizer.vocab_size])
        self.vqgan = VQGAN(vq_config, with_decoder=with_decoder)
        self.tokenizer = tokenizer
        self._fingerprint: str | None = None
        self.tokenizer_file: Path | None = None

    # --- forward ----------------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        start_pos: int = 0,
        valid: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """(B, T) token ids -> (B, T, vocab) float32 logits (or (B, 1, vocab) with `last_only`).

        With a cache, the tokens fill slots start_pos..start_pos+T-1 of every row and attend to the
        row's valid slots before them. `valid` (B, T) marks slots that later tokens must not see
        (left padding), `positions` (B, T) gives RoPE positions when they differ from the slots.
        """
        self._check_inputs(tokens, cache, start_pos, valid, positions)
        start_pos = int(start_pos)  # (numpy's integers pass the check; the transformer slices with ints)
        if tokens.shape[1] + start_pos > self.config.max_seq_len:
            raise InputError(f"sequence of {tokens.shape[1] + start_pos} tokens is longer than the model's context ({self.config.max_seq_len})")
        kv_len = None
        if cache is not None:
            kv_len = start_pos + tokens.shape[1]
            if kv_len > cache.max_seq_len:
                raise InputError(f"{kv_len} tokens do not fit the KV cache ({cache.max_seq_len} slots)")
            cache.valid[:, start_pos:kv_len] = True if valid is None else valid
        return self.transformer(tokens, cache=cache, input_pos=start_pos, positions=positions, kv_len=kv_len, last_only=last_only)

    def _check_inputs(self, tokens, cache: KVCache | None, start_pos, valid, positions) -> None:
        """Name the argument at fault: torch would fail deep inside (an IndexError in the embedding,
        a reshape of nothing) or, for negative ids and positions, wrap around silently. One host
        sync per call (the id and position ranges), never per decoded token: generation steps
        call the transformer directly."""
        if not isinstance(tokens, torch.Tensor):
            raise InputError(f"tokens: expected a (batch, seq) tensor of token ids, got {type(tokens).__name__}")
        if tokens.dim() != 2 or 0 in tokens.shape:
            raise InputError(f"tokens: expected a (batch, seq) tensor of token ids, got a tensor of shape {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.long, torch.int):  # (what the embedding takes)
            raise InputError(f"tokens: expected integer token ids, got {tokens.dtype}")
        if tokens.device != self.device:
            raise InputError(f"tokens: on {tokens.device}, the model on {self.device}")
        if not (is_integer(start_pos) and start_pos >= 0):
            raise InputError(f"start_pos: expected an integer >= 0, got {start_pos!r}")
        if valid is not None and cache is None:
            raise InputError("valid: marks cache slots; pass a cache with it")
        # valid: bool, or an integer mask (HF's attention_mask: nonzero = valid, as the bool cache takes it)
        for name, given, kind in (("valid", valid, "a bool (or 0/1 integer) mask"), ("positions", positions, "integer RoPE positions")):
            if given is None:
                continue
            if not isinstance(given, torch.Tensor) or given.shape != tokens.shape:
                shape = tuple(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__
                raise InputError(f"{name}: expected shape {tuple(tokens.shape)} (as tokens), got {shape}")
            if given.is_floating_point() or given.is_complex() or (name == "positions" and given.dtype == torch.bool):
                raise InputError(f"{name}: expected {kind}, got {given.dtype}")
            if given.device != self.device:
                raise InputError(f"{name}: on {given.device}, the model on {self.device}")
        if cache is not None:
            self._check_cache(cache, tokens.shape[0])
        ranges = [*torch.aminmax(tokens), *(torch.aminmax(positions) if positions is not None else ())]
        lo, hi, *pos = torch.stack([r.long() for r in ranges]).tolist()
        if lo < 0 or hi >= self.config.vocab_size:
            raise InputError(f"tokens: ids must lie in 0..{self.config.vocab_size - 1}, got {lo}..{hi}")
        if pos and (pos[0] < 0 or pos[1] >= self.config.max_seq_len):
            raise InputError(f"positions: must lie in 0..{self.config.max_seq_len - 1}, got {pos[0]}..{pos[1]}")

    def _check_cache(self, cache: KVCache, rows: int) -> None:
        """A cache of this model's layout, dtype and device, with a row per sequence."""
        if not isinstance(cache, KVCache):
            raise InputError(f"cache: expected a KVCache (model.new_cache), got {type(cache).__name__}")
        args = self.config
        if (want := describe_layout(args.n_layers, args.kv_heads, args.head_dim)) != cache.layout():
            raise InputError(f"cache: made for another model: {cache.layout()}; this model has {want}")
        if cache.k[0].dtype != (dtype := self.transformer.output.weight.dtype):
            raise InputError(f"cache: holds {cache.k[0].dtype}, the model computes in {dtype}")
        if cache.valid.device != self.device:
            raise InputError(f"cache: on {cache.valid.device}, the model on {self.device}")
        if cache.batch_size != rows:
            raise InputError(f"cache: holds {cache.batch_size} row(s) but tokens have {rows}")

    def new_cache(self, batch_size: int, max_seq_len: int | None = None) -> KVCache:
        """A static KV cache of `batch_size` rows and `max_seq_len` slots (default: the model's context)."""
        if not (is_integer(batch_size) and batch_size >= 1):
            raise InputError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        if not (max_seq_len is None or is_integer(max_seq_len) and max_seq_len >= 1):
            raise InputError(f"max_seq_len: expected an integer >= 1 (None: the model's context), got {max_seq_len!r}")
        return self.transformer.new_cache(int(batch_size), None if max_seq_len is None else int(max_seq_len))

    @property
    def device(self) -> torch.device:
        return self.transformer.output.weight.device

    @property
    def image_seq_len(self) -> int:
        return self.vqgan.cfg.image_seq_len

    # --- mixed-modal token streams ----------------------------------------------------------
    def encode_image(self, image: Image.Image) -> list[int]:
        """boi + codes + eoi for one image."""
        codes = self.vqgan.encode_image(image)
        return [self.tokenizer.boi_id, *self.tokenizer.codes_to_ids(codes), self.tokenizer.eoi_id]

    def encode_prompt(self, segments: list[Segment] | str, bos: bool = True, end_turn: bool = False) -> list[int]:
        """`<s>`, then each segment (text, or an image as boi + codes + eoi). `end_turn`: close the
        prompt with the end-of-turn token, as chat-tuned checkpoints expect a user turn to end
        (Meta's chat format; transformers' ChameleonProcessor appends it by default)."""
        if isinstance(segments, (str, Image.Image)):
            segments = [segments]
        elif isinstance(segments, (bytes, bytearray)) or not isinstance(segments, Iterable):  # (bytes: a list of ints)
            raise InputError(f"prompt: expected text, a PIL image or a list of them, got {type(segments).__name__}")
        ids = [self.tokenizer.bos_id] if bos else []
        for i, seg in enumerate(segments):
            if isinstance(seg, str):
                if why := unicode_problem(seg):  # (the tokenizer's own error names nothing)
                    raise InputError(f"prompt segment {i}: not valid text ({why})")
                ids += self.tokenizer.encode_text(seg)
            elif isinstance(seg, Image.Image):
                ids += self.encode_image(seg)
            else:
                raise InputError(f"prompt segment {i}: expected text or a PIL image, got {type(seg).__name__}")
        return ids + [self.tokenizer.eot_id] if end_turn else ids

    def decode_output(self, ids: list[int]) -> list[Segment]:
        """Generated ids -> text and image segments. An image cut short (no room left) is dropped."""
        if hasattr(ids, "tolist") and hasattr(ids, "ndim"):  # a tensor or numpy array of one sequence
            if ids.ndim != 1:
                raise InputError(f"ids: expected a list of token ids, got a tensor of shape {tuple(ids.shape)}")
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)):
            raise InputError(f"ids: expected a list of token ids, got {type(ids).__name__}")
        if (bad := next((t for t in ids if not is_token_id(t, self.config.vocab_size)), None)) is not None:
            raise InputError(f"ids: expected token ids 0..{self.config.vocab_size - 1}, got {bad!r}")
        tok, n = self.tokenizer, self.image_seq_len
        segments: list[Segment] = []
        text: list[int] = []
        i = 0
        while i < len(ids):
            t = ids[i]
            if t == tok.eos_id:
                break
            if t == tok.boi_id:
                if text:
                    segments.append(tok.decode_text(text))
                    text = []
                codes = [c for c in ids[i + 1 : i + 1 + n] if tok.is_image_token(c)]
                if len(codes) == n:
                    segments.append(self.vqgan.decode_image(tok.ids_to_codes(codes)))
                i += 1 + n
                if i < len(ids) and ids[i] == tok.eoi_id:
                    i += 1
                continue
            text.append(t)
            i += 1
        if text:
            segments.append(tok.decode_text(text))
        return [s for s in segments if not (isinstance(s, str) and s == "")]

    def require_decoder_for(self, mode: str) -> None:
        """Image and interleaved outputs are decoded by the VQGAN: say before generating, not after,
        that this checkpoint cannot."""
        if mode != "text":
            self.vqgan.require_decoder()

    def generate(self, prompt: list[Segment] | str, **options) -> list[Segment]:
        """One prompt in, its mixed-modal continuation out. Options: see GenerationOptions."""
        from chameleon.generate import GenerationOptions, generate

        opts = GenerationOptions(**options)
        self.require_decoder_for(opts.mode)
        ids = generate(self, [self.encode_prompt(prompt)], opts)[0]
        return self.decode_output(ids)

    # --- identity and saving ----------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """sha256 of the config, tokenizer vocabulary and every weight, computed once (on first use):
        it identifies the checkpoint as loaded; call `refresh_fingerprint()` after changing weights."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps(asdict(self.config), sort_keys=True).encode())
            h.update(json.dumps(self.tokenizer.vocab, sort_keys=True).encode())
            for name, t in sorted(self.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())  # hashlib reads the buffer: no copy
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def refresh_fingerprint(self) -> str:
        self._fingerprint = None
        return self.fingerprint

    def to_checkpoint(self) -> Checkpoint:
        if self.tokenizer_file is None:
            raise InputError("this model has no tokenizer file to save with it")
        weights = {k: v.detach().cpu() for k, v in self.transformer.state_dict().items()}
        vq = {k: v.detach().cpu() for k, v in self.vqgan.state_dict().items()}
        return Checkpoint(self.config, weights, self.vqgan.cfg, vq, self.tokenizer_file, "memory", Path("."))

    def save(self, out: str | Path, format: str = "hf", shards: int | None = None, max_shard_bytes: int | None = None,
             progress: bool = False) -> None:
        """Write a checkpoint directory (`format` "hf" or "meta") into `out`, which must be new or
        empty: files of another checkpoint there would be overwritten or, left beside ours, mixed in.
        `progress`: a bar of the bytes written, with ETA, on stderr. A failed save removes what it wrote."""
        refuse_empty_paths(("out", out))
        for name, value, other in (("shards", shards, "meta"), ("max_shard_bytes", max_shard_bytes, "hf")):
            if value is None:
                continue
            if format != other and format in ("hf", "meta"):  # (not ignored silently)
                split = "HF output is split with max_shard_bytes" if other == "meta" else "Meta output is split with shards"
                raise InputError(f"{name}: applies to format={other!r}; {split}")
            if not (is_integer(value) and value >= 1):
                raise InputError(f"{name}: expected an integer >= 1, got {value!r}")
        out = Path(out)
        if why := occupied(out):
            raise InputError(f"{out}: exists and is {why}; save into a new directory")
        save_checkpoint(self.to_checkpoint(), out, format, self.tokenizer, shards, max_shard_bytes, progress)


def save_checkpoint(ckpt: Checkpoint, out: Path, format: str, tokenizer: ChameleonTokenizer, shards: int | None = None,
                    max_shard_bytes: int | None = None, progress: bool = False) -> None:
    """Write `ckpt` into `out` (new, or an empty directory). A failure (bad input, a full disk, ^C)
    leaves no half-written checkpoint behind, nor the directories made for it; a directory that
    existed keeps what it held before."""
    if format not in ("hf", "meta"):
        raise InputError(f"unknown checkpoint format {format!r}; expected 'hf' or 'meta'")
    with removed_on_failure(out, topmost_missing(out)), writing_bar(out, ckpt.nbytes, enabled=progress):
        if format == "hf":
            write_hf(ckpt, out, tokenizer, max_shard_bytes)
        else:
            write_meta(ckpt, out, shards)


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, pack_bf16: bool = True) -> Chameleon:
    """Load a HF- or Meta-format checkpoint directory (auto-detected) with its tokenizers. `path` may
    also be a Hugging Face hub repo id, `org/name[@revision]`, where no local path of that name
    exists: it is fetched into the hub cache (from the cache alone under HF_HUB_OFFLINE=1).

    q/k/v and w1/w3 are fused (`Transformer.fuse_`). On CPU the weights are also laid out for
    decoding (`Transformer.optimize_for_cpu_`); in bf16 that includes a packed copy of every matrix
    (2x faster decoding, 2x the weight memory; skipped, with a warning, where memory runs short)
    unless `pack_bf16=False`."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"path: expected a checkpoint directory or hub repo id, got {path!r}")
    refuse_empty_paths(("path", path))
    device = available_device(device)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):  # before any weights are read
        raise InputError(f"dtype {dtype!r}: expected a floating-point torch.dtype, e.g. torch.float32 or torch.bfloat16")
    ckpt = read_checkpoint(resolve_checkpoint_path(path))
    tokenizer = ChameleonTokenizer.from_file(ckpt.tokenizer_file)
    with torch.device("meta"):
        model = Chameleon(ckpt.args, ckpt.vq_config, tokenizer, with_decoder=ckpt.has_decoder)
    # The VQGAN stays fp32: its argmin over distances must not flip codes under bf16.
    _assign(model.transformer, ckpt.weights, device, dtype)
    _assign(model.vqgan, ckpt.vq_weights, device, torch.float32)
    model.tokenizer_file = ckpt.tokenizer_file
    if device.type == "cpu":
        model.transformer.optimize_for_cpu_(pack_bf16=pack_bf16)
    else:
        model.transformer.fuse_()
    return model.eval()


def _assign(module: nn.Module, weights: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> None:
    """Each weight of a module built on the meta device made, moved to `device` and `dtype`, and
    assigned in turn (names and shapes were checked when read): merged Meta shards loaded onto a GPU
    never hold all the merged weights in host memory, only the one being moved."""
    for name in weights:
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        placeholder = getattr(owner, leaf)
        w = weights[name]
        w = w.to(device=device, dtype=dtype if w.is_floating_point() else w.dtype)  # (as Module.to: floats only)
        setattr(owner, leaf, nn.Parameter(w, requires_grad=placeholder.requires_grad) if isinstance(placeholder, nn.Parameter) else w)


def available_device(device: str | torch.device) -> torch.device:
    """The device, checked before any weights are read."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device {device!r}: not a torch device (expected e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise InputError(f"device {str(device)!r}: this machine has {count} CUDA device(s)")
    elif device.type == "meta":
        raise InputError(f"device {str(device)!r}: holds no data; expected a device to run on (e.g. cpu, cuda)")
    elif device.type != "cpu":
        backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
        if not getattr(backend, "is_available", lambda: False)():
            raise InputError(f"device {str(device)!r}: not available in this torch build or on this machine")
    return device
