"""Shared request handling for backends that run a token-in, logits-out model locally.

Subclasses provide tokenization, `_score` (log-probabilities of continuations) and `_generate`;
this class turns lm-eval requests into token pairs exactly the way lm-eval's HF backend does
(trailing context whitespace moves to the continuation; continuation = encode(ctx + cont) minus
encode(ctx)), so scores are comparable with lm-eval's own backends.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from benchmarks.backends.base import (
    GenSettings, MixedModalLM, Segment, parse_gen_kwargs, sample_indices, sample_seed, to_segments,
    truncate_at_stops,
)

TokenPair = tuple[list[int], list[int]]  # (context ids incl. bos, continuation ids)


def continuation_score(rows: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
    """(log-probability of `cont`, whether greedy decoding yields it) from the log-probabilities
    at the continuation's positions, (len(cont), vocab)."""
    target = torch.tensor(cont, device=rows.device)
    return rows.gather(-1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())


class TokenLM(MixedModalLM):
    def __init__(self, batch_size: int = 8, max_gen_toks: int = 256) -> None:
        super().__init__()
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)

    # --- to implement -------------------------------------------------------------------------
    max_length: int
    eot_token_id: int

    def encode_prompt(self, segments: list[Segment]) -> list[int]:  # with bos
        raise NotImplementedError

    def encode_text(self, text: str) -> list[int]:  # no bos
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

    # --- lm-eval interface --------------------------------------------------------------------
    def encode_pair(self, segments: list[Segment], continuation: str) -> TokenPair:
        if segments and isinstance(segments[-1], str):
            context = segments[-1]
            n = len(context) - len(context.rstrip())
            if n:
                continuation = context[-n:] + continuation
                segments = [*segments[:-1], context[:-n]] if context[:-n] else segments[:-1]
        ctx = self.encode_prompt(segments)
        if segments and isinstance(segments[-1], str):
            whole = self.encode_prompt([*segments[:-1], segments[-1] + continuation])
        else:
            whole = self.encode_prompt([*segments, continuation])
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx):]
        return ctx, self.encode_text(continuation)

    def _truncate(self, pair: TokenPair) -> TokenPair:
        ctx, cont = pair
        cont = cont[-self.max_length:]
        keep = self.max_length - len(cont)
        if len(ctx) > keep:  # lm-eval keeps the most recent context
            ctx = ctx[len(ctx) - max(keep, 1):]
        return ctx, cont

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for req in requests:
            context, continuation, *aux = req.args
            pairs.append(self._truncate(self.encode_pair(to_segments(context, aux[0] if aux else None), continuation)))
        # lm-eval's CachingLM stores each result as soon as it exists
        return self._score(pairs, lambda i, res: self.cache_hook.add_partial("loglikelihood", requests[i].args, res))

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
        return self.encode_prompt([])[0]

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
            ids = ids[-budget:] if len(ids) > budget else ids
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
