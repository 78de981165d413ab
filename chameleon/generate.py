"""Batched generation with a static KV cache: text, image (3-way classifier-free guidance) and interleaved.

Each prompt owns one row of the cache, or three when images are guided: the full prompt, the prompt
reduced to its `<s>` tokens and images (and the images generated so far), and the unconditional
`<s><boi>` (started afresh at each image, as Meta's image decoder does). All rows advance one slot per step; a row that
must not see a token (left padding; text tokens for the two guidance rows; an unconditional row's
earlier images) gets that slot marked invalid and its RoPE position does not advance. So every
row of a batch may be in a different phase (text, image, done) and one forward pass per step
serves all of them.

The decode steps themselves (compiled, replayed from CUDA graphs, or on fused Triton kernels) and
the KV caches they reuse across calls are in compiled_decode.py.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import math
import numbers
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from chameleon.compiled_decode import _decode_step, _fused_decoder, _greedy_steps, _prepare_compiled, _reusable_cache, _writable
from chameleon.config import as_real
from chameleon.errors import InputError
from chameleon.sampling import apply_repetition_penalty, pick_rows, sample

MODES = ("text", "image", "interleaved")
KERNELS = ("torch", "triton")
CACHE_BUCKET = 256


def is_integer(value) -> bool:
    """An int (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_token_id(value, vocab_size: int) -> bool:
    return is_integer(value) and 0 <= value < vocab_size


@dataclass
class GenerationOptions:
    max_new_tokens: int = 256
    # Text defaults: greedy, no repetition penalty (what benchmarks decode with). Meta's sampling
    # defaults (temperature 0.7, top-p 0.9, penalty 1.2) are the generate command's.
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # applied to text tokens and boi (prompt and output), as Meta does
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int = 0
    mode: str = "text"
    # Image codes are sampled with their own settings; Meta's defaults.
    image_temperature: float = 0.7
    image_top_p: float = 0.9
    cfg_text_scale: float = 3.0
    cfg_image_scale: float = 1.2
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to text-phase logits
    compile: bool | None = None  # compile the decode step; default: on CUDA only
    # Experimental, compiled greedy text only: N decode steps per call of the compiled step; on
    # CUDA each N-step call is replayed from a CUDA graph captured here (`_GreedyGraphs`) instead
    # of torch.compile's one-step reduce-overhead graphs. None: the latter.
    graph_steps: int | None = None
    # Experimental: "triton" runs batch-1 greedy text decode steps on fused Triton kernels
    # (chameleon/kernels.py), on CUDA replayed from graphs the generator captures (`graph_steps`
    # steps a graph, 1 by default). Where they do not apply (sampling, a repetition penalty,
    # image modes, batch > 1, swin_norm, no triton, no GPU) the usual step runs, with a warning.
    # "torch": the usual step.
    kernels: str = "torch"
    progress: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise InputError(f"mode {self.mode!r}: expected one of {', '.join(MODES)}")
        for name in ("max_new_tokens", "top_k", "seed"):
            value = getattr(self, name)
            if not is_integer(value):
                raise InputError(f"{name} must be an integer, got {value!r}")
        if self.max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if self.kernels not in KERNELS:
            raise InputError(f"kernels {self.kernels!r}: expected one of {', '.join(KERNELS)}")
        if self.graph_steps is not None and not (is_integer(self.graph_steps) and self.graph_steps >= 1):
            raise InputError(f"graph_steps must be an integer >= 1 (None: off), got {self.graph_steps!r}")
        for name, ok, expected in (
            ("temperature", lambda v: v >= 0, " >= 0"),
            ("image_temperature", lambda v: v >= 0, " >= 0"),
            ("top_p", lambda v: 0 < v <= 1, " in (0, 1]"),
            ("image_top_p", lambda v: 0 < v <= 1, " in (0, 1]"),
            ("repetition_penalty", lambda v: v > 0, " > 0"),
            ("cfg_text_scale", lambda v: True, ""),
            ("cfg_image_scale", lambda v: True, ""),
        ):
            value = as_real(getattr(self, name))
            if value is None or not math.isfinite(value) or not ok(value):
                raise InputError(f"{name} must be a finite number{expected}, got {getattr(self, name)!r}")
        if self.compile not in (True, False, None):  # (a string "no" would compile)
            raise InputError(f"compile must be True, False or None (default), got {self.compile!r}")
        if self.progress not in (True, False):
            raise InputError(f"progress must be True or False, got {self.progress!r}")
        if not isinstance(self.logit_bias, Mapping):
            raise InputError(f"logit_bias must be a dict {{token id: bias}}, got {type(self.logit_bias).__name__}")
        for token, bias in self.logit_bias.items():
            value = as_real(bias)
            if value is None or not (math.isfinite(value) or value == -math.inf):
                raise InputError(f"logit_bias[{token!r}] must be a finite number or -inf (to ban the token), got {bias!r}")
        # (ids as decimal strings too: JSON's keys, as generation.json records these options)
        self.logit_bias = {int(token) if isinstance(token, str) and token.isdecimal() else token: as_real(bias)
                           for token, bias in self.logit_bias.items()}
        if isinstance(self.stop_ids, (str, bytes)) or not isinstance(self.stop_ids, Iterable):  # (ids: checked by generate)
            raise InputError(f"stop_ids must be a list of token ids, got {self.stop_ids!r}")
        self.stop_ids = tuple(self.stop_ids)
        strings = self.stop_strings
        self.stop_strings = (strings,) if isinstance(strings, str) else tuple(strings) if isinstance(strings, Iterable) else None
        if self.stop_strings is None or not all(isinstance(s, str) and s for s in self.stop_strings):
            shown = strings if self.stop_strings is None else list(self.stop_strings)
            raise InputError(f"stop_strings must be non-empty strings (an empty one would stop every row at once), got {shown!r}")

    @property
    def guided(self) -> bool:
        """Guidance changes nothing when both scales are 1: then the full row alone is sampled."""
        return self.mode != "text" and (self.cfg_text_scale, self.cfg_image_scale) != (1.0, 1.0)


def non_text_mask(tok, vocab: int, device) -> torch.Tensor:
    """(vocab,) True on the ids text may not hold: image codes, control tokens, ids the tokenizer
    does not know; the two end tokens stay allowed, as either ends a text answer."""
    mask = torch.ones(vocab, dtype=torch.bool, device=device)
    mask[: tok.vocab_size] = tok.non_text_ids.to(device)
    mask[[tok.eos_id, tok.eot_id]] = False
    return mask


def cfg_mix(full: torch.Tensor, image_only: torch.Tensor, uncond: torch.Tensor, s_txt: float, s_img: float) -> torch.Tensor:
    """uncond + s_img * (image_only - uncond) + s_txt * (full - image_only)."""
    return uncond + s_img * (image_only - uncond) + s_txt * (full - image_only)


def row_seed(seed: int, prompt: list[int]) -> int:
    """A seed per prompt, so that sampled outputs do not depend on batch composition or order."""
    digest = hashlib.sha256(f"{seed}:{','.join(map(str, prompt))}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class _Row:
    """Per-prompt state."""

    def __init__(self, prompt: list[int], opts: GenerationOptions, seed: int):
        self.prompt = prompt
        self.out: list[int] = []
        self.text_run: list[int] = []  # text tokens since the last image, for stop strings
        self.codes_left = 0  # >0: inside an image
        self.pending: int | None = None  # a token the next step must emit (eoi after an image's codes; boi in image mode)
        self.done = False
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.device_generator: torch.Generator | None = None  # draws off the CPU (see _row_generator)


def _open_image(prompt: list[int], tok, n_codes: int, i: int) -> list[int]:
    """The prompt's unfinished image at its end, begin-of-image and the codes after it ([] if none)."""
    start = len(prompt) - 1 - prompt[::-1].index(tok.boi_id) if tok.boi_id in prompt else None
    if start is None or tok.eoi_id in prompt[start:]:
        return []
    tail = prompt[start:]
    if not all(tok.is_image_token(t) for t in tail[1:]):
        raise InputError(f"prompt {i}: its last begin-of-image is followed by other tokens than image codes, and no end-of-image")
    if len(tail) - 1 > n_codes:
        raise InputError(f"prompt {i} ends with {len(tail) - 1} codes after its last begin-of-image; an image has {n_codes}")
    return tail


def _image_only_prompt(prompt: list[int], tok) -> list[int]:
    """The prompt reduced to its `<s>` tokens and images (boi + codes + eoi), in place, text
    removed: Meta's image-conditioned row, which keeps every `<s>` (a prompt of two documents keeps
    both). A prompt with neither (no `<s>`, no image) gives `<s>`, where Meta's row would be empty
    until its boi."""
    out = []
    inside = False
    for t in prompt:
        if t == tok.boi_id:
            inside = True
        if inside or t == tok.bos_id:
            out.append(t)
        if t == tok.eoi_id:
            inside = False
    return out or [tok.bos_id]


def generate(model, prompts: list[list[int]], opts: GenerationOptions) -> list[list[int]]:
    """New token ids for each prompt (stop ids, eos and prompt excluded).

    Text: generation ends at eos, a stop id, after the token that completes a stop string (cut the
    decoded text at the stop string), or at max_new_tokens. Image: `boi + N codes + eoi`. Interleaved:
    text with images; an image starts only where `boi + N codes + eoi` still fits. In both, a prompt
    ending inside an image (boi, maybe some of its codes) continues it: the output begins with them.
    """
    if not isinstance(prompts, (list, tuple)):  # (a tensor's truth value, a generator read twice: no clear error later)
        raise InputError(f"prompts: expected a list of prompts (lists of token ids), got {type(prompts).__name__}")
    if not isinstance(opts, GenerationOptions):
        raise InputError(f"opts: expected GenerationOptions, got {type(opts).__name__}")
    use_compile = opts.compile if opts.compile is not None else model.device.type == "cuda"
    # Eager steps run in inference mode, which skips autograd's bookkeeping on every op (a 100M
    # bf16 CPU step is ~7% faster); compiled steps (CUDA graphs) run under no_grad.
    with torch.no_grad() if use_compile else torch.inference_mode():
        return _generate(model, prompts, opts, use_compile)


def _generate(model, prompts: list[list[int]], opts: GenerationOptions, use_compile: bool) -> list[list[int]]:
    if not prompts:
        return []
    tok = model.tokenizer
    n_codes = model.image_seq_len
    args = model.config
    device = model.device
    for i, p in enumerate(prompts):
        if not isinstance(p, list):  # a string, a tensor, or one prompt's ids given as the batch
            raise InputError(f"prompt {i}: expected a list of token ids (model.encode_prompt gives one), got {type(p).__name__}")
        if not p:
            raise InputError(f"prompt {i} is empty")
        bad = next((t for t in p if not is_token_id(t, args.vocab_size)), None)
        if bad is not None:  # ids of another tokenizer would fail in the embedding, naming nothing
            raise InputError(f"prompt {i}: {bad!r} is not a token id: expected integers 0..{args.vocab_size - 1}")
    for what, ids in (("stop id", opts.stop_ids), ("logit_bias:", opts.logit_bias)):
        for t in ids:
            if not is_token_id(t, args.vocab_size):
                raise InputError(f"{what} {t!r} is not a token id: expected integers 0..{args.vocab_size - 1}")
    # A prompt ending inside an image (begin-of-image, maybe some of its codes) asks for that image,
    # as Meta's decoder reads a prompt ending in boi: it is generated as if the boi and codes were
    # the output's first tokens, which they become. They are prefilled with the prompt (the two
    # guidance rows get them too), and the rest is sampled.
    open_images = [_open_image(p, tok, n_codes, i) for i, p in enumerate(prompts)]
    if any(open_images):
        i = next(i for i, o in enumerate(open_images) if o)
        if opts.mode == "text":
            raise InputError(f"prompt {i} ends inside an image: text mode cannot continue an image; use mode 'image' or 'interleaved'")
        if opts.mode == "interleaved" and opts.max_new_tokens < n_codes + 2:
            raise InputError(f"prompt {i} ends inside an image: its image needs max_new_tokens >= {n_codes + 2}, got {opts.max_new_tokens}")
        prompts = [p[: len(p) - len(o)] for p, o in zip(prompts, open_images)]
        if not all(prompts):
            raise InputError(f"prompt {[len(p) for p in prompts].index(0)} is only an open image: start it with <s> (encode_prompt does)")
    if opts.mode == "image" and all(len(o) <= 1 for o in open_images):
        open_images = [[] for _ in prompts]  # boi alone: image mode starts every row with it anyway
    budget = opts.max_new_tokens
    if opts.mode == "image":
        budget = n_codes + 2  # boi + codes + eoi, whatever max_new_tokens says
    longest = max(len(p) for p in prompts)
    if longest + budget > args.max_seq_len:
        room = args.max_seq_len - longest
        what_to_do = ("the prompt alone fills it; shorten the prompt" if room <= 0 else
                      f"an image takes {budget}; shorten the prompt by {-room + budget} tokens" if opts.mode == "image" else
                      f"at most {room} new tokens fit after it (lower max_new_tokens), or shorten the prompt")
        raise InputError(f"prompt of {longest} tokens plus {budget} new tokens exceeds the model's context of {args.max_seq_len} tokens: {what_to_do}")

    guided = opts.guided
    rows = [_Row(p, opts, row_seed(opts.seed, p)) for p in prompts]
    # Image mode starts every row with boi in one lockstep block; a batch with rows given some of
    # their codes takes the per-row loop instead, the other rows then made to begin with boi.
    per_row_image = opts.mode == "image" and any(open_images)
    for r, opened in zip(rows, open_images):
        if opened:  # the state after choosing them
            r.out, r.codes_left = list(opened), n_codes - (len(opened) - 1)
            r.pending = tok.eoi_id if r.codes_left == 0 else None
        elif per_row_image:
            r.pending = tok.boi_id
    # Row layout in the cache: [full_0..full_{B-1}, image_only_0.., uncond_0..] when guided.
    streams = [r.prompt + o for r, o in zip(rows, open_images)]
    if guided:
        streams += [_image_only_prompt(r.prompt, tok) + o for r, o in zip(rows, open_images)]
        streams += [[tok.bos_id] + o for o in open_images]
    n_rows, n_prompts = len(streams), len(rows)
    max_len = max(len(s) for s in streams)
    total = max_len + budget - min(len(o) for o in open_images)  # given tokens count in the budget
    # The fused Triton step keeps its state, graphs and attention block size per cache shape too
    # (`_compiled_greedy_state`, `_GreedyGraphs`, `kernels._tuned`), compiled or not: a cache per
    # prompt length would keep one more state, capture and tuning per length met.
    fused_wanted = opts.kernels == "triton" and opts.mode == "text" and n_rows == 1
    if use_compile or fused_wanted:  # a compiled step has static shapes: round the cache up so calls share graphs
        total = max(total, min(args.max_seq_len, -(-total // CACHE_BUCKET) * CACHE_BUCKET))
        cache = _reusable_cache(model.transformer, n_rows, total)
        if use_compile:
            _prepare_compiled(model.transformer, cache)  # once, before any compiled step
    else:
        cache = model.new_cache(n_rows, total)

    # Masks over the vocabulary.
    vocab = args.vocab_size
    image_ids = tok.code_to_id.to(device)  # code -> token id
    not_text = non_text_mask(tok, vocab, device)
    # Added to a row's logits in its text phase: the logit bias, and -inf on every non-text id.
    text_bias = torch.zeros(vocab, device=device)
    for tid, bias in opts.logit_bias.items():
        text_bias[tid] += bias
    text_bias.masked_fill_(not_text, float("-inf"))
    if opts.mode != "image" and not bool(torch.isfinite(text_bias).any()):
        raise InputError("logit_bias: -inf on every text token (and the end tokens) leaves nothing to generate")
    text_seen = None  # text tokens (and boi) seen per prompt, kept only when a repetition penalty needs them
    if opts.repetition_penalty != 1.0:
        text_seen = torch.zeros(n_prompts, vocab, dtype=torch.bool, device=device)
        for i, stream in enumerate(streams[:n_prompts]):
            text_seen[i, torch.tensor(stream, device=device)] = True
        # Meta penalises every token of the context, so begin-of-image too (which interleaved text
        # may pick) once an image is in it; the other non-text tokens are never picked in text.
        text_seen &= ~not_text | (torch.arange(vocab, device=device) == tok.boi_id)

    # Prefill, left-padded: every stream ends at slot max_len - 1.
    pads = [max_len - len(s) for s in streams]
    tokens = torch.tensor([[tok.pad_id] * p + s for p, s in zip(pads, streams)], device=device)
    pad_t = torch.tensor(pads, device=device)
    slots = torch.arange(max_len, device=device)
    cache.valid[:, :max_len] = slots[None, :] >= pad_t[:, None]
    positions = (slots[None, :] - pad_t[:, None]).clamp(min=0)
    next_pos = [len(s) for s in streams]  # RoPE position of each row's next visible token
    # Logits only for the vocabulary spans that can hold a next token (text rows skip image codes).
    may_sample = ~not_text
    if opts.mode == "interleaved":
        may_sample[tok.boi_id] = True
    spans_of = _spans_holding(model.transformer.vocab_spans, {"text": may_sample.nonzero().flatten(), "image": image_ids})
    weights = model.transformer.inference_weights()  # once: weights do not change while generating
    logits = model.transformer(
        tokens, cache=cache, input_pos=0, positions=positions, kv_len=max_len, last_only=True, spans=spans_of(rows), weights=weights
    )[:, -1]

    cur = max_len
    stop_ids = {tok.eos_id, tok.eot_id, *opts.stop_ids}
    with _progress_bar(opts.progress, budget, opts.mode) as progress:
        stop_strings = _StopStringScan(opts.stop_strings, tok.decode_text, tok.pad_id, n_rows) if opts.stop_strings else None
        text_loop_args = (model, logits, text_bias, stop_ids, budget, cache, cur, next_pos, tok.pad_id, progress, stop_strings)
        # Text mode runs on the device text loop; plain greedy picks inside a compiled graph.
        pick = _text_pick(opts, rows, device, text_seen) if opts.mode == "text" else None
        fused = None
        if opts.kernels == "triton" and opts.mode == "text" and pick is None:
            fused = _fused_decoder(model.transformer, cache, spans_of(rows))
        elif opts.kernels == "triton":
            warnings.warn("kernels='triton' does not apply here (it serves greedy text without a repetition penalty): the usual decode step runs")
        if opts.mode == "text" and pick is None and (use_compile or fused is not None):  # a graph of its own, not the logits step below
            return _text_loop(*text_loop_args, graph_steps=opts.graph_steps, fused=fused)
        step_fn = _decode_step(model, use_compile, weights)
        if opts.mode == "image" and not per_row_image:
            return _image_loop(logits, rows, n_prompts, guided, opts, tok, n_codes, image_ids, cache, cur, next_pos, step_fn, spans_of, progress)
        if opts.mode == "text":
            return _text_loop(*text_loop_args, step_fn, spans_of(rows), pick)
        steps = 0
        while steps < budget:
            # Every row that is still going is inside an image: its codes run in lockstep on the device.
            block = _image_block_length(rows, budget - steps)
            if block:
                logits, next_pos = _image_block(block, logits, rows, n_prompts, guided, opts, tok, image_ids, cache, cur, next_pos, step_fn, spans_of(rows))
                cur, steps = cur + block, steps + block
                if progress is not None:
                    progress.update(block)
                continue
            steps += 1
            # Plain lists while choosing (cheaper than per-element tensor writes), one tensor each after.
            next_tokens = [tok.pad_id] * n_rows
            visible = [False] * n_rows
            # Image-code logits of every row, when some row is inside an image.
            codes = logits.index_select(1, image_ids) if any(r.codes_left > 0 for r in rows) else None
            for i, r in enumerate(rows):
                if r.done:
                    continue
                t = _choose(r, i, logits, codes, n_prompts, guided, opts, tok, n_codes, image_ids, text_bias, text_seen, total - cur)
                if r.done:
                    continue
                next_tokens[i] = t
                visible[i] = True
                if guided and (r.codes_left > 0 or r.pending == tok.eoi_id or t in (tok.boi_id, tok.eoi_id)):
                    # Image tokens (and their brackets) condition all three rows: every code, the
                    # last one included (chosen as the count reaches 0, with eoi pending).
                    next_tokens[i + n_prompts] = next_tokens[i + 2 * n_prompts] = t
                    visible[i + n_prompts] = visible[i + 2 * n_prompts] = True
                    if t == tok.boi_id:  # each image's unconditional row is `<s> boi`, as in Meta's decoder
                        uncond = i + 2 * n_prompts
                        cache.valid[uncond, pads[uncond] + 1 : cur] = False  # all after its <s> (a prefilled open image too)
                        next_pos[uncond] = 1
            if not any(visible):
                break
            visible_t = torch.tensor(visible, device=device)
            cache.valid[:, cur] = visible_t
            pos = torch.tensor(next_pos, device=device)[:, None]
            next_pos = [p + v for p, v in zip(next_pos, visible)]
            logits = step_fn(torch.tensor(next_tokens, device=device)[:, None], cur, pos, cache, spans_of(rows))
            cur += 1
            if progress is not None:
                progress.update(1)
        return [r.out for r in rows]


def _progress_bar(enabled: bool, total: int, mode: str):
    if not enabled:
        return contextlib.nullcontext()
    from tqdm import tqdm

    return tqdm(total=total, desc=f"generate ({mode})", unit="tok")


def _choose(r: _Row, i, logits, codes, n_prompts, guided, opts, tok, n_codes, image_ids, text_bias, text_seen, slots_left) -> int | None:
    """Pick row i's next token from the last logits, update its state, and return it."""
    if r.pending is not None:
        t, r.pending = r.pending, None
    elif r.codes_left > 0:
        # Only image codes may follow: sample among their logits alone (8192 of 65,536).
        code_logits = codes[i]
        if guided:
            code_logits = cfg_mix(codes[i], codes[i + n_prompts], codes[i + 2 * n_prompts], opts.cfg_text_scale, opts.cfg_image_scale)
        t = int(image_ids[sample(code_logits, opts.image_temperature, 0, opts.image_top_p, _row_generator(r, code_logits.device))])
    else:
        row_logits = logits[i] + text_bias
        may_start_image = opts.mode == "interleaved" and slots_left >= n_codes + 2 and opts.max_new_tokens - len(r.out) >= n_codes + 2
        if may_start_image:
            row_logits[tok.boi_id] = logits[i, tok.boi_id] + opts.logit_bias.get(tok.boi_id, 0.0)
        if text_seen is not None:
            row_logits = apply_repetition_penalty(row_logits, text_seen[i], opts.repetition_penalty)
        t = sample(row_logits, opts.temperature, opts.top_k, opts.top_p, r.generator)

    if t == tok.boi_id:
        r.codes_left = n_codes
        r.text_run = []
        r.out.append(t)
        if text_seen is not None:  # an image is in the context now, and Meta penalises its boi (see _generate)
            text_seen[i, t] = True
        return t
    if r.codes_left > 0:
        r.codes_left -= 1
        r.out.append(t)
        if r.codes_left == 0:
            r.pending = tok.eoi_id  # exactly N codes, then end-of-image
        return t
    if t == tok.eoi_id:
        r.out.append(t)
        # one image, then the end; or no budget left (an image's given codes took none of the steps)
        r.done = opts.mode == "image" or len(r.out) >= opts.max_new_tokens
        return t
    # text token
    if t in (tok.eos_id, tok.eot_id) or t in opts.stop_ids:
        r.done = True
        return None
    r.out.append(t)
    r.text_run.append(t)
    if text_seen is not None:
        text_seen[i, t] = True
    if len(r.out) >= opts.max_new_tokens:
        r.done = True
    elif opts.stop_strings and _ends_in_stop_string(r.text_run, opts.stop_strings, tok.decode_text):
        r.done = True
    return t


STOP_STRING_WINDOW = 64  # text tokens decoded to look for a stop string


def _ends_in_stop_string(tokens: list[int], strings: tuple[str, ...], decode) -> bool:
    """Whether the text of the last STOP_STRING_WINDOW tokens holds a stop string: a row ends
    after the first token for which it does."""
    tail = decode(tokens[-STOP_STRING_WINDOW:])
    return any(s in tail for s in strings)


class _TextState:
    """What the device text loop reads and updates in place: each row's next input token, its RoPE
    position and slot, whether it ended, and its tokens so far by slot (pad once it ended). The
    compiled greedy step keeps one per cache shape on the model, like the caches: CUDA graphs are
    recorded against addresses (`_compiled_greedy_state`)."""

    def __init__(self, n_rows: int, n_slots: int, vocab: int, device):
        def zeros(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=device)

        self.tokens, self.positions, self.slot = zeros(n_rows, 1), zeros(n_rows, 1), zeros(1)
        self.text_bias, self.is_stop = zeros(vocab, dtype=torch.float), zeros(vocab, dtype=torch.bool)
        self.done, self.out, self.pad = zeros(n_rows, dtype=torch.bool), zeros(n_rows, n_slots), zeros()

    def reset(self, text_bias, stop_ids, pad_id: int, next_pos: list[int], cur: int) -> None:
        """Before the first `advance`, on the prefill's logits (which belong to slot cur - 1)."""
        self.text_bias.copy_(text_bias)
        self.is_stop.zero_()
        self.is_stop[sorted(stop_ids)] = True
        self.pad.fill_(pad_id)
        self.done.zero_()
        self.out.fill_(pad_id)
        self.positions.copy_(torch.tensor(next_pos, device=self.positions.device)[:, None] - 1)
        self.slot.fill_(cur - 1)

    def advance(self, logits: torch.Tensor, pick=None) -> None:
        """Pick every row's token after `slot` (the same bias and first-maximum rule as the general
        loop, or `pick` of the biased logits; pad is not text, so never a pick), record it, and make
        it the next step's input."""
        biased = logits + self.text_bias
        t = biased.max(dim=-1).indices if pick is None else pick(biased)
        self.done |= self.is_stop[t]
        # torch.where, not masked_fill: CUDA's masked_fill reads a tensor fill value on the host
        # (.item()), a sync that CUDA graph capture refuses, and the fused Triton step
        # (kernels.FusedDecoder) runs this eagerly inside a capture (`_GreedyGraphs`)
        self.out.index_copy_(1, self.slot + 1, torch.where(self.done, self.pad, t)[:, None])
        self.tokens.copy_(t[:, None])
        self.positions.add_(1)
        self.slot.add_(1)

    def texts(self, cur: int, budget: int, pad_id: int) -> list[list[int]]:
        return [row[: row.index(pad_id)] if pad_id in row else row for row in self.out[:, cur : cur + budget].tolist()]


class _StopStringScan:
    """Stop strings for `_text_loop`, by the general loop's rule (`_ends_in_stop_string`). The
    device loop picks tokens
    without waiting for the host; this scans each row's picks on the host whenever the loop looks,
    marks the rows that hit a stop string as ended, and cuts their outputs there at the end (tokens
    picked after the hit and before the look are dropped)."""

    def __init__(self, strings: tuple[str, ...], decode, pad_id: int, n_rows: int):
        self.strings, self.decode, self.pad_id = strings, decode, pad_id
        self.tokens: list[list[int]] = [[] for _ in range(n_rows)]  # each row's picks so far
        self.closed = [False] * n_rows  # ended (pad seen: an end token) or stopped here
        self.stop_at: list[int | None] = [None] * n_rows
        self.read = 0  # picks copied from the device so far, per row

    def catch_up(self, state: _TextState, cur: int, picked: int) -> None:
        """Scan the picks up to `picked` (slots cur .. cur + picked - 1); mark rows that stop."""
        newly = []
        for i, new in enumerate(state.out[:, cur + self.read : cur + picked].tolist()):
            for t in new if not self.closed[i] else ():
                if t == self.pad_id:  # pad is never picked: the row ended on an end token
                    self.closed[i] = True
                    break
                self.tokens[i].append(t)
                if _ends_in_stop_string(self.tokens[i], self.strings, self.decode):
                    self.stop_at[i], self.closed[i] = len(self.tokens[i]), True
                    newly.append(i)
                    break
        self.read = picked
        if newly:
            state.done[newly] = True

    def cut(self, texts: list[list[int]]) -> list[list[int]]:
        return [t if n is None else t[:n] for t, n in zip(texts, self.stop_at)]


def _host_look_every(device: torch.device) -> int:
    """Steps between looks at the host (whether all rows ended, stop strings): each costs a sync,
    which on a GPU stalls the queue of steps, and on a CPU costs next to nothing."""
    return 1 if device.type == "cpu" else 16


def _text_pick(opts: GenerationOptions, rows: list[_Row], device: torch.device, text_seen: torch.Tensor | None):
    """The pick of `_text_loop` where it is not plain greedy (None then): the repetition penalty
    on the text tokens each row has seen, then the first maximum or a draw as `sample` draws:
    temperature, top-k and top-p, one draw per row from its own seeded generator (on the logits'
    device, so that nothing waits for the host; a GPU therefore draws other numbers than the CPU,
    whose tokens equal the general loop's)."""
    if opts.temperature == 0 and text_seen is None:
        return None
    generators = [_row_generator(r, device) for r in rows]

    def pick(biased: torch.Tensor) -> torch.Tensor:
        if text_seen is not None:
            biased = apply_repetition_penalty(biased, text_seen, opts.repetition_penalty)
        t = pick_rows(biased, opts.temperature, opts.top_k, opts.top_p, generators)
        if text_seen is not None:  # (an end token is marked too, but it ends its row)
            text_seen.scatter_(1, t[:, None], True)
        return t

    return pick


def _text_loop(model, logits, text_bias, stop_ids, budget, cache, cur, next_pos, pad_id, progress, stop_strings=None, step_fn=None, spans=None, pick=None, graph_steps=None, fused=None) -> list[list[int]]:
    """Text for all rows without leaving the device: no per-token host sync, so a GPU runs ahead
    of Python; a row that ended keeps decoding into slots nobody reads until every row has ended.
    Stop strings are checked whenever the loop looks at the host (`_StopStringScan`). Eager or
    compiled logits steps run `step_fn`, and the pick is greedy or `pick` (`_text_pick`); without a
    `step_fn`, the compiled greedy step runs, with the greedy pick inside the graph, so that a CUDA
    graph replay is all the per-token work (around a logits-only graph the pick was ~10 eager
    kernels, ~0.3 ms per token on an H200 against a 7B step of ~4.3 ms in the graph), in calls of
    `graph_steps` steps where given (the budget's remainder one step a call); `fused` (a
    `kernels.FusedDecoder`) runs that greedy step on fused Triton kernels instead."""
    n_rows, device = logits.shape[0], logits.device
    if budget == 0:  # (a compiled cache may hold no slot for a first token)
        return [[] for _ in range(n_rows)]
    chunk = graph_steps or 1  # (given with the compiled greedy step only)
    if step_fn is None:
        state = _compiled_greedy_state(model.transformer, cache, logits.shape[-1])
        steps = _greedy_steps(model.transformer, cache, state, graph_steps, fused)
    else:
        state = _TextState(n_rows, cache.max_seq_len, logits.shape[-1], device)

        def steps(first_slot: int, n: int) -> None:
            for slot in range(first_slot, first_slot + n):
                cache.valid[:, slot] = True
                state.advance(step_fn(state.tokens, slot, state.positions, cache, spans), pick)

    state.reset(text_bias, stop_ids, pad_id, next_pos, cur)
    state.advance(logits, pick)  # the first token, from the prefill
    look_every = _host_look_every(device)
    if progress is not None:
        progress.update(1)
    picked, looked = 1, 0
    while picked < budget:
        if picked - looked >= look_every:
            looked = picked
            if stop_strings is not None:
                stop_strings.catch_up(state, cur, picked)
            if bool(state.done.all()):
                break
        n = chunk if picked + chunk <= budget else 1
        steps(cur + picked - 1, n)
        picked += n
        if progress is not None:
            progress.update(n)
    texts = state.texts(cur, budget, pad_id)
    if stop_strings is None:
        return texts
    stop_strings.catch_up(state, cur, picked)
    return stop_strings.cut(texts)


def _compiled_greedy_state(transformer, cache, vocab: int) -> _TextState:
    """The state of the compiled greedy step for this cache's shape, kept on the model per shape
    (small: a token per slot and row), so that a shape seen before gets its addresses back (as
    the cache does, see `_reusable_cache`)."""
    states = transformer.__dict__.setdefault("_greedy_states", {})
    key = (cache.batch_size, cache.max_seq_len, vocab, cache.valid.device)
    state = states.get(key)
    if state is None or not _writable(state.out):
        state = states[key] = _TextState(cache.batch_size, cache.max_seq_len, vocab, cache.valid.device)
        for t in vars(state).values():  # updated in place by the graph
            torch._dynamo.mark_static_address(t)
    return state


def _image_loop(logits, rows, n_prompts, guided, opts, tok, n_codes, image_ids, cache, cur, next_pos, step_fn, spans_of, progress) -> list[list[int]]:
    """Image mode: every row emits boi, then its N codes in one lockstep block (`_image_block`: no
    wait for the device until the end; on a GPU the general loop's per-token host sync left it idle
    for part of every step), then eoi."""
    for r in rows:
        r.out.append(tok.boi_id)
        r.codes_left = n_codes
    cache.valid[:, cur] = True  # every row, the guidance rows too, sees boi
    boi = torch.full((cache.batch_size, 1), tok.boi_id, dtype=torch.long, device=logits.device)
    logits = step_fn(boi, cur, torch.tensor(next_pos, device=logits.device)[:, None], cache, spans_of(rows))
    if progress is not None:
        progress.update(1)
    _image_block(n_codes, logits, rows, n_prompts, guided, opts, tok, image_ids, cache, cur + 1, [p + 1 for p in next_pos],
                 step_fn, spans_of(rows), feed_last=False)  # eoi ends the output: no step for the last code
    if progress is not None:
        progress.update(n_codes + 1)
    return [r.out + [tok.eoi_id] for r in rows]


LOCKSTEP_MIN_CODES = 2  # shorter runs of codes go through the per-row loop


def _row_generator(r: _Row, device: torch.device) -> torch.Generator:
    """The generator a row draws from on `device`: text in the device text loop, and image codes
    in a lockstep block or in the per-row loop alike (so that a row's codes do not depend on which
    of the two its batch ran). On CPU the row's own generator; elsewhere one on the device, seeded
    per row and kept on it, so that a draw never waits for the host."""
    if device.type == "cpu":
        return r.generator
    if r.device_generator is None:
        r.device_generator = torch.Generator(device).manual_seed(r.seed)
    return r.device_generator


def _image_block_length(rows: list[_Row], steps_left: int) -> int:
    """Steps the per-row loop may hand to `_image_block`: while every row still going is inside an
    image with no token pending, as many as the row nearest its image's end has codes left."""
    going = [r for r in rows if not r.done]
    if not going or any(r.codes_left == 0 or r.pending is not None for r in going):
        return 0
    block = min(min(r.codes_left for r in going), steps_left)
    return block if block >= LOCKSTEP_MIN_CODES else 0


def _image_block(block, logits, rows, n_prompts, guided, opts, tok, image_ids, cache, cur, next_pos, step_fn, spans, feed_last=True):
    """`block` image codes for every row still going, chosen with tensor ops and fed back without
    waiting for the host, then handed back (to the per-row loop, or to `_image_loop`): the same
    codes as choosing them one row at a time on CPU (same mix, same filters, each row's own
    generator; a GPU draws from device generators seeded per row). Returns the last logits and
    the rows' next RoPE positions."""
    device = logits.device
    going = [i for i, r in enumerate(rows) if not r.done]
    generators = [_row_generator(rows[i], device) for i in going]
    # Rows fed: every row still going, and in guided generation its two guidance rows too.
    fed = going + ([i + k * n_prompts for k in (1, 2) for i in going] if guided else [])
    fed_t = torch.tensor(fed, device=device)
    visible = torch.zeros(cache.batch_size, dtype=torch.bool, device=device)
    visible[fed_t] = True
    tokens = torch.full((cache.batch_size, 1), tok.pad_id, dtype=torch.long, device=device)
    positions = torch.tensor(next_pos, device=device)[:, None]
    going_t = torch.tensor(going, device=device)
    picked = torch.empty(len(going), block, dtype=torch.long, device=device)
    for j in range(block):
        codes = logits.index_select(1, image_ids)
        if guided:
            codes = cfg_mix(codes[going_t], codes[going_t + n_prompts], codes[going_t + 2 * n_prompts], opts.cfg_text_scale, opts.cfg_image_scale)
        else:
            codes = codes[going_t]
        picked[:, j] = t = image_ids[pick_rows(codes, opts.image_temperature, 0, opts.image_top_p, generators)]
        tokens[fed_t, 0] = t.repeat(3 if guided else 1)
        if j == block - 1 and not feed_last:
            break
        cache.valid[:, cur + j] = visible
        logits = step_fn(tokens, cur + j, positions + j * visible[:, None], cache, spans)
    for i, codes in zip(going, picked.tolist()):  # the one wait for the device
        r = rows[i]
        r.out.extend(codes)
        r.codes_left -= block
        if r.codes_left == 0:
            r.pending = tok.eoi_id  # exactly N codes, then end-of-image
    fed_set = set(fed)
    return logits, [p + block * (i in fed_set) for i, p in enumerate(next_pos)]


def free_generation_buffers(model) -> None:
    """Free what compiled generation keeps on a model between calls: its KV-cache buffers (as
    large as its largest cache so far), greedy states and captured graphs. The next compiled call
    allocates them again (and records its CUDA graphs again)."""
    transformer = getattr(model, "transformer", model)
    transformer._cache_store = transformer._greedy_graphs = None
    transformer.__dict__.pop("_greedy_states", None)
    transformer.__dict__.pop("_fused_decoders", None)  # (kernels='triton': their buffers, and the weights it was made for)
    gc.collect()  # torch.compile's tracing leaves reference cycles that reach the first call's tensors


def _spans_holding(spans: list[tuple[int, int]], ids: dict[str, torch.Tensor]):
    """A function rows -> the indices of the vocabulary spans their next tokens may come from
    (None: all of them). `ids` gives, per phase, the token ids it may sample."""
    per_phase = {
        phase: {i for i, (a, b) in enumerate(spans) if bool(((sel >= a) & (sel < b)).any())} for phase, sel in ids.items()
    }
    everything = set(range(len(spans)))

    def spans_of(rows) -> tuple[int, ...] | None:
        need: set[int] = set()
        for r in rows:
            if not r.done and r.pending is None:
                need |= per_phase["image" if r.codes_left > 0 else "text"]
        return None if need == everything else tuple(sorted(need))

    return spans_of
