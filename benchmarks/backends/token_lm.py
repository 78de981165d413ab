"""Shared request handling for backends that run a token-in, logits-out model locally.

Subclasses provide tokenization, `_score` (log-probabilities of continuations) and `_generate`;
this class turns lm-eval requests into token pairs the way lm-eval's HF backend does (trailing
context whitespace moves to the continuation; continuation = encode(ctx + cont) minus
encode(ctx); an empty context is the prefix token, or the continuation's own first token where
that is the prefix token; over-long requests keep their most recent max_length tokens), so scores
are comparable with lm-eval's own backends. Two deliberate differences: where tokenization merges
across the boundary, so that encode(ctx + cont) does not start with encode(ctx), the continuation
is encoded on its own (lm-eval slices the whole anyway, scoring tokens that do not spell the
continuation); and a rolling loglikelihood scores the text's tokens after the prefix token alone,
where HFLM, whose tokenizer adds BOS (Chameleon's, Llama's), also scores that BOS after the BOS
prefix (lm-eval issue #3333).
"""

from __future__ import annotations

from array import array
from collections import OrderedDict, defaultdict

import torch
from PIL import Image
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from benchmarks.backends.base import (
    FileImage, GenSettings, MixedModalLM, Segment, instance_hash, known_digest, parse_gen_kwargs, pixels, sample_indices,
    sample_seed, to_segments, truncate_at_stops,
)
from chameleon.errors import InputError

TokenPair = tuple[list[int], list[int]]  # (context ids incl. bos, continuation ids)


def continuation_score(rows: torch.Tensor, cont: list[int], banned: torch.Tensor | None = None) -> tuple[float, bool]:
    """(log-probability of `cont`, whether greedy decoding yields it) from the log-probabilities
    at the continuation's positions, (len(cont), vocab); greedy decoding never picks the
    `banned` ids (a (vocab,) mask), which keep their probability in the score."""
    target = torch.tensor(cont, device=rows.device)
    greedy = rows if banned is None else rows.masked_fill(banned, float("-inf"))
    return rows.gather(-1, target[:, None]).sum().item(), bool((greedy.argmax(-1) == target).all())


def count_arg(name: str, value) -> int:
    """A positive count among a backend's arguments, as lm-eval passes them: its CLI's --batch_size
    as a string, --model_args values as ints where they look like one."""
    n = value if type(value) is int else int(value) if isinstance(value, str) and value.strip().isdecimal() else 0
    if n < 1:
        auto = " (a fixed batch size: lm-eval's automatic 'auto' sizes are not supported)" if name == "batch_size" else ""
        raise InputError(f"{name} {value!r}: expected a positive integer{auto}")
    return n


class TokenLM(MixedModalLM):
    # max_batch_size: lm-eval passes its --max_batch_size flag to every model; it bounds only
    # 'auto' batch sizes, so with the fixed batch_size here it changes nothing (as in lm-eval's HFLM).
    def __init__(self, batch_size: int = 8, max_gen_toks: int = 256, max_batch_size: int | None = None) -> None:
        super().__init__()
        self.batch_size = count_arg("batch_size", batch_size)
        self.max_gen_toks = count_arg("max_gen_toks", max_gen_toks)
        self._image_memo: OrderedDict[str, array] = OrderedDict()  # image digest -> its ids

    # --- to implement -------------------------------------------------------------------------
    max_length: int
    eot_token_id: int
    prompt_start: list[int] = []  # what every prompt begins with (bos, where the model takes one)
    image_bounds: tuple[int, int] | None = None  # (begin, end of image) ids where prompts hold images

    def encode_text(self, text: str) -> list[int]:  # no bos
        raise NotImplementedError

    def encode_image(self, image: Image.Image) -> list[int]:  # begin of image, its codes, end of image
        raise NotImplementedError

    def decode_text(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _score(self, pairs: list[TokenPair], on_result=None) -> list[tuple[float, bool]]:
        """(logprob, is_greedy) per pair; calls on_result(i, result) as each one is computed."""
        raise NotImplementedError

    def _generate(self, prompts: list[list[int]], settings: GenSettings, seed: int | None) -> list[list[int]]:
        """New token ids per prompt; greedy when seed is None, else each row sampled from a stream
        seeded by (seed, its prompt), as `chameleon.generate` does."""
        raise NotImplementedError

    # --- prompts -------------------------------------------------------------------------------
    def encode_prompt(self, segments: list[Segment]) -> list[int]:
        ids = list(self.prompt_start)
        for seg in segments:
            ids += self.encode_text(seg) if isinstance(seg, str) else self.image_ids(seg)
        return ids

    IMAGE_MEMO = 16384  # images whose ids are kept: ~4 KB each at 1,024 codes

    def image_ids(self, image) -> list[int]:
        """`encode_image` of a request image, kept by its content digest where that is known (always
        under the runner): 2-shot captioning shows each photo ~3 times, and loglikelihood encodes a
        context twice (alone, and with its continuation)."""
        if not isinstance(image, (Image.Image, FileImage)):
            raise InputError(f"request image: expected a PIL image, got {type(image).__name__}")
        key = known_digest(image)
        if key in self._image_memo:
            self._image_memo.move_to_end(key)
            return list(self._image_memo[key])
        ids = self.encode_image(pixels(image))
        if key is not None:
            self._image_memo[key] = array("i", ids)  # (4 bytes an id)
            if len(self._image_memo) > self.IMAGE_MEMO:
                self._image_memo.popitem(last=False)
        return ids

    # --- lm-eval interface --------------------------------------------------------------------
    def encode_pair(self, segments: list[Segment], continuation: str) -> TokenPair:
        if segments and isinstance(segments[-1], str):
            context = segments[-1]
            n = len(context) - len(context.rstrip())
            if n:
                continuation = context[-n:] + continuation
                segments = [*segments[:-1], context[:-n]] if context[:-n] else segments[:-1]
        ctx = self.encode_prompt(segments) or [self.prefix_token_id]  # lm-eval's rule for an empty context
        if not segments:  # ...which takes a continuation's own leading prefix token as the context
            cont = self.encode_text(continuation)
            return (cont[:1], cont[1:]) if cont[:1] == [self.prefix_token_id] else (ctx, cont)
        if isinstance(segments[-1], str):
            whole = self.encode_prompt([*segments[:-1], segments[-1] + continuation])
        else:
            whole = self.encode_prompt([*segments, continuation])
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx):]
        return ctx, self.encode_text(continuation)

    def _truncate(self, pair: TokenPair) -> TokenPair:
        """The pair with its context cut from the left so that the model reads at most max_length
        tokens (the last continuation token is never read), as lm-eval cuts."""
        ctx, cont = pair
        keep = self.max_length + 1 - len(cont)
        return (self._cut_left(ctx, keep) if len(ctx) > keep else ctx), cont

    def _cut_left(self, ids: list[int], keep: int) -> list[int]:
        """The last `keep` ids, and fewer where that would start inside an image: a cut image is
        dropped whole (its codes without their begin-of-image would read as garbage)."""
        ids = ids[len(ids) - keep:]
        if self.image_bounds is not None:
            begin, end = self.image_bounds
            first = next((n for n, t in enumerate(ids) if t in (begin, end)), None)
            if first is not None and ids[first] == end:  # the cut fell inside an image
                ids = ids[first + 1:]
        return ids or [self.prefix_token_id]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs, todo = [], []
        out: list[tuple[float, bool]] = [(float("-inf"), False)] * len(requests)
        for i, req in enumerate(requests):
            context, continuation, *aux = req.args
            ctx, cont = self.encode_pair(to_segments(context, aux[0] if aux else None), continuation)
            if len(cont) > self.max_length:  # lm-eval refuses these too: nothing of the context would be read
                self.failures[instance_hash(req, "loglikelihood")] = (
                    f"continuation of {len(cont)} tokens is longer than the model's max_length {self.max_length}")
                continue
            pairs.append(self._truncate((ctx, cont)))
            todo.append(i)

        def stored(n: int, res) -> None:  # lm-eval's CachingLM stores each result as soon as it exists
            self.cache_hook.add_partial("loglikelihood", requests[todo[n]].args, res)

        for i, res in zip(todo, self._score(pairs, stored)):
            out[i] = res
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs, owner = [], []
        for i, req in enumerate(requests):
            ids = self.encode_text(req.args[0])
            windows = get_rolling_token_windows(ids, prefix_token=self.prefix_token_id,
                                                max_seq_len=self.max_length, context_len=1)
            for w in map(make_disjoint_window, windows):
                pairs.append((list(w[0]), list(w[1])))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self._score(pairs)):
            totals[i] += lp
        for req, res in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, res)
        return totals

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is scored after: BOS, else end of text (lm-eval's rule)."""
        return (self.encode_prompt([]) or [self.eot_token_id])[0]

    def generate_until(self, requests, disable_tqdm: bool = False,
                       sample_index: list[int] | None = None) -> list[str]:
        sample_index = sample_index if sample_index is not None else sample_indices(requests)
        out: list[str | None] = [None] * len(requests)
        # one batch per (settings, sample index): the k samples of one prompt need k seeds, and
        # backends derive each row's stream from (seed, prompt), so batching never changes output
        groups: dict[tuple, list[int]] = defaultdict(list)
        parsed = []
        for i, req in enumerate(requests):
            context, gen_kwargs, *aux = req.args
            settings = parse_gen_kwargs(gen_kwargs, self.max_gen_toks)
            ids = self.encode_prompt(to_segments(context, aux[0] if aux else None))
            budget = self.max_length - settings.max_gen_toks
            if budget <= 0:
                raise InputError(f"generation settings: max_gen_toks {settings.max_gen_toks} leaves no room for a "
                                 f"prompt in the model's max_length {self.max_length}; expected fewer")
            ids = self._cut_left(ids, budget) if len(ids) > budget else ids  # the most recent tokens, as lm-eval
            seed = None if settings.greedy else sample_seed(settings, sample_index[i])
            parsed.append((ids, settings))
            groups[(settings, seed)].append(i)
        bar = self.progress_bar(len(requests), f"{self.backend_name} generate", disable=disable_tqdm)
        for (settings, seed), idxs in groups.items():
            # longest first so the first batch fails fast on memory
            idxs = sorted(idxs, key=lambda i: -len(parsed[i][0]))
            for start in range(0, len(idxs), self.batch_size):
                chunk = idxs[start:start + self.batch_size]
                new = self._generate([parsed[i][0] for i in chunk], settings, seed)
                for i, ids in zip(chunk, new):
                    text = truncate_at_stops(self.decode_text(ids), settings.until)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
                self.report_progress(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]
