"""Turning a step's logits into tokens: the repetition penalty, and a pick per row (the first
maximum, or a draw after temperature, top-k and top-p from the row's own generator)."""

from __future__ import annotations

import torch


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style: divide positive, multiply negative logits of tokens already seen."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


NUCLEUS_CANDIDATES = (256, 4096)  # top-p on CPU ranks this many tokens first, then all (see pick_rows)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The logits with every token outside top-k and top-p set to -inf: the set sampling draws
    from (a token whose preceding mass reaches top_p is dropped, as in transformers). Sampling
    itself takes a faster route to the same set (`pick_rows`); this is its plain statement."""
    logits = _top_k(logits, top_k)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def _top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """-inf below each row's k-th largest logit (0: off; ties with it stay)."""
    if top_k <= 0:
        return logits
    kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None) -> int:
    """One token from a (V,) logit vector, as `pick_rows` picks for a row."""
    if temperature == 0:  # max(dim) finds the first maximum, as argmax does, ~3x faster on CPU
        return int(logits.max(dim=-1).indices)
    return int(pick_rows(logits[None], temperature, top_k, top_p, [generator])[0])


def pick_rows(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Each row's pick from (B, V) logits: the first maximum, or a draw after temperature, top-k
    and top-p (the set `filter_top_k_top_p` keeps) with one uniform number from the row's
    generator (None: torch's global one). A row's pick depends on its logits and generator alone.

    On CPU, sorting 65,536 probabilities costs ~4.6 ms a row and torch.multinomial ~1.5 ms, the
    better part of a small model's step. So top-p ranks the 256 most probable tokens first (a
    top-k, ~0.25 ms), then 4,096 for the rows whose nucleus is larger, and sorts whole only the
    rows whose nucleus is larger still (or whose first 256 hold less than half of top_p: likely
    a nucleus beyond 4,096 too); and the draw inverts the running sum at the uniform number
    (`_invert_cdf`). On a GPU the sort is cheap, and checking the candidates would wait for the
    device."""
    if temperature == 0:
        return logits.max(dim=-1).indices
    probs = _top_k(logits / temperature, top_k).softmax(-1)
    return _draw(probs, top_p, _uniforms(generators, probs.device))


def _draw(probs: torch.Tensor, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """Each row's token from its (B, V) probabilities after top-p, at its uniform number u."""
    if top_p >= 1.0:
        return _invert_cdf(probs, u)
    if probs.device.type != "cpu":
        # Stable: tied tokens in id order whatever kernel the batch size picks, so that a row's
        # draw (made in this order) does not depend on its batch.
        return _nucleus_pick(*torch.sort(probs, descending=True, dim=-1, stable=True), top_p, u)[0]
    picks = torch.empty(probs.shape[0], dtype=torch.long)
    todo = torch.ones(probs.shape[0], dtype=torch.bool)  # rows not picked yet
    sort_now = torch.zeros_like(todo)  # rows whose nucleus is likely beyond every tier
    for n in [n for n in NUCLEUS_CANDIDATES if n < probs.shape[-1]]:
        rows = (todo & ~sort_now).nonzero().squeeze(-1)
        if not len(rows):
            break
        got, reached = _nucleus_pick(*torch.topk(_take(probs, rows), n, dim=-1), top_p, _take(u, rows))
        covered = reached >= top_p
        picks[rows[covered]] = got[covered]
        todo[rows[covered]] = False
        sort_now[rows[reached < top_p / 2]] = True
    rows = todo.nonzero().squeeze(-1)
    if len(rows):  # a CPU sorts row by row: a row's order does not depend on its batch
        picks[rows] = _nucleus_pick(*torch.sort(_take(probs, rows), descending=True, dim=-1), top_p, _take(u, rows))[0]
    return picks


def _take(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x's rows (ascending indices), without a copy where they are all of them."""
    return x if len(rows) == len(x) else x[rows]


def _nucleus_pick(probs: torch.Tensor, ids: torch.Tensor, top_p: float, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A draw from the top-p prefix of (B, n) probabilities sorted in descending order (`ids`:
    their tokens), and the mass of the n: where it reaches top_p, the prefix ends within them
    (the token after them has that much mass before it, so it and all later ones are dropped)."""
    # Wide sums: a GPU adds in an order that depends on the batch size, and float32 rounding could
    # then move the boundary token in or out; in float64 it stays far below any probability gap.
    wide = probs.to(_wide(probs.device))
    mass = wide.cumsum(-1)
    kept = probs.masked_fill(mass - wide >= top_p, 0)
    return ids.gather(-1, _invert_cdf(kept, u)[:, None]).squeeze(-1), mass[:, -1]


def _uniforms(generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One uniform number in [0, 1) per row, from the row's generator, on `device`."""
    draws = [torch.rand(1, generator=g, dtype=_wide(device), device=device if g is None else g.device) for g in generators]
    return torch.cat([d.to(device) for d in draws])


def _wide(device: torch.device) -> torch.dtype:
    """float64 for the draw and the running sums (65,536 float32 sums lose ~1e-7), where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


def _invert_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first index where the running sum of the (B, n) weights (>= 0, not
    normalised) exceeds u times their total: a draw in proportion to the weights, never of a
    zero weight."""
    cdf = weights.to(_wide(weights.device)).cumsum(-1)
    total = cdf[:, -1:]
    pick = torch.searchsorted(cdf, (u[:, None].to(cdf.dtype) * total).contiguous(), right=True)
    last = torch.searchsorted(cdf, total.contiguous())  # the last index with weight: u * total may round up to total
    return torch.minimum(pick, last).squeeze(-1)
