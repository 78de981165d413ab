"""The decode step beyond a plain eager forward: torch.compile'd steps, CUDA graphs and the state
they need kept on the model between calls.

generate.py runs the loops (prompts, masks, guidance, rows, text and image phases) and asks here
for a step: `_decode_step` (one token's logits, compiled on CUDA), `_greedy_steps` (greedy text
with the pick inside the compiled graph, replayed from `_GreedyGraphs` with `graph_steps`, or on
the fused Triton kernels with `_fused_decoder`), and `_reusable_cache` (a KV cache at the same
addresses for every call of a shape, as CUDA graphs are recorded against addresses). This is
the part that needs a GPU to run for real; tests emulate CUDA graphs on the CPU.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from chameleon.model import KVCache

if TYPE_CHECKING:
    from chameleon.generate import _TextState



def _fused_decoder(transformer, cache, spans: tuple[int, ...] | None):
    """The Triton decoder for this model and cache (`GenerationOptions.kernels`), or None where
    it does not apply, with a warning that says why. It computes logits for the vocabulary
    `spans` (indices into vocab_spans; None: all), skipping the longest run of the others."""
    from chameleon import kernels  # (imports triton, only when asked for)

    why = kernels.unsupported(transformer, cache)
    if why is not None:
        warnings.warn(f"kernels='triton' does not apply here ({why}): the usual decode step runs")
        return None
    return kernels.fused_decoder(transformer, kernels.skipped_range(transformer.vocab_spans, spans))


def _compiled_greedy_step(transformer, mode: str | None = None):
    """The compiled greedy step for this model (see `_text_loop`): mark the input's slot
    valid, run it, advance. One per compile mode, kept on the model; `_compile_mode`'s by default."""
    mode = mode or _compile_mode(transformer)
    compiled = getattr(transformer, "_compiled_greedy", None)
    if compiled is None:
        compiled = transformer._compiled_greedy = {}
    if mode not in compiled:

        def greedy_step(cache, state):
            cache.valid.index_fill_(1, state.slot, True)
            state.advance(transformer(state.tokens, cache=cache, input_pos=state.slot, positions=state.positions, kv_len=None)[:, -1])

        compiled[mode] = torch.compile(greedy_step, mode=mode, fullgraph=True, dynamic=False)
    return compiled[mode]


def _captures_graphs(cache) -> bool:
    """Whether greedy steps on this cache may be captured as CUDA graphs (a function of its own:
    tests emulate CUDA graphs on the CPU)."""
    return cache.valid.is_cuda


def _greedy_steps(transformer, cache, state: _TextState, graph_steps: int | None, fused=None):
    """A function (first slot, n) that runs n compiled greedy steps (the slots are in `state`).
    With `graph_steps` on CUDA, the steps are replayed from `_GreedyGraphs`; otherwise each is a
    call of the compiled step (CUDA graphs of one step by torch.compile's reduce-overhead mode).
    With `fused` (a `kernels.FusedDecoder`), its greedy step runs instead: from `_GreedyGraphs`
    on CUDA, one step at a time elsewhere (Triton's interpreter, for tests)."""
    captures = _captures_graphs(cache)
    if fused is not None:
        step, kind = fused.greedy_step, "triton"
    elif graph_steps is not None and captures:
        step, kind = _compiled_greedy_step(transformer, mode="default"), "inductor"
    else:
        step, kind = _first_call_may_compile(_compiled_greedy_step(transformer)), None
    if kind is not None and captures:
        return _GreedyGraphs.of(transformer, cache, state, step, kind).run

    def steps(first_slot: int, n: int) -> None:
        for _ in range(n):
            step(cache, state)

    return steps


class _GreedyGraphs:
    """Greedy steps replayed from CUDA graphs captured here around the inductor-compiled step
    (compiled without CUDA graphs), one graph per number of steps a call asks for. A replay is
    one graph launch: a call of a reduce-overhead step first checks its hundreds of inputs
    (~0.15 ms per token between replays on an H200, RESULTS.md run 3), and one graph may hold
    several steps. A graph reads and writes the addresses it was captured with, so it is kept
    on the model for as long as the cache, the state and the weights are the tensors it saw,
    and the global state dynamo guards on (grad mode, TF32, deterministic algorithms...) is
    the one its warm-up compiled under: a replay checks no guard, and a capture must not
    recompile (compilation cannot run inside a capture)."""

    WARM_UP_STEPS = 3  # uncaptured steps first: compilation, autotuning, lazy library set-up

    KEPT_SHAPES = 8  # cache shapes whose graphs are kept, the most recently used

    def __init__(self, key, step, cache, state):
        self.key, self.step, self.cache, self.state = key, step, cache, state
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.warm = 0
        self.device = cache.valid.device
        self.global_state = torch._C._dynamo.guards.GlobalStateGuard()
        with torch.cuda.device(self.device):  # (the model's GPU, which need not be the current one)
            self.stream = torch.cuda.Stream()  # warm-up and capture, off the current stream
        # This shape's graphs share a pool (they run one at a time), which goes with them. (A pool
        # shared across shapes would need one capture stream for all, since the allocator reuses
        # a block only on its stream, and a fresh id once its graphs are gone: the allocator
        # refuses a capture into a pool whose graphs were all freed.)
        self.pool = torch.cuda.graph_pool_handle()

    @staticmethod
    def of(transformer, cache, state: _TextState, step, kind: str) -> "_GreedyGraphs":
        """This cache shape's graphs of `step` (one step function per `kind`), kept on the model
        for the KEPT_SHAPES shapes used last (as the cache and the state are kept per shape:
        harness batches alternate shapes), captured anew where they no longer apply."""
        tensors = [*transformer.parameters(), *(f.tensor for f in transformer.fused_tensors()), *cache.tensors(), *vars(state).values()]
        key = tuple((t.data_ptr(), t.shape, t.stride(), t.dtype) for t in tensors)
        every = getattr(transformer, "_greedy_graphs", None)
        if every is None:
            every = transformer._greedy_graphs = {}
        shape = (cache.batch_size, cache.max_seq_len, cache.valid.device, kind)
        graphs = every.pop(shape, None)  # (put back last: the most recently used)
        if graphs is None or graphs.key != key or graphs.step != step or graphs.cache is not cache or graphs.state is not state or not graphs.global_state.check():
            while len(every) >= _GreedyGraphs.KEPT_SHAPES:
                every.pop(next(iter(every)))
            graphs = _GreedyGraphs(key, step, cache, state)
        every[shape] = graphs
        return graphs

    def run(self, first_slot: int, n: int) -> None:
        graph = self.graphs.get(n)
        if graph is not None:
            graph.replay()  # (on the current stream of the device it was captured on)
            return
        with torch.cuda.device(self.device):
            if self.warm < self.WARM_UP_STEPS:  # on a side stream, as CUDA graph capture wants
                self.stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self.stream), _new_shapes_allowed():
                    for _ in range(n):
                        self.step(self.cache, self.state)
                torch.cuda.current_stream().wait_stream(self.stream)
                self.warm += n
                return
            graph = torch.cuda.CUDAGraph()
            # cuBLAS keeps one workspace per (handle, stream) in a process-wide map, and a captured
            # GEMM embeds its address. Emptied before the capture, the map gets a workspace for it
            # from this graph's pool, which lives as long as the graph does; emptied after, no other
            # capture or eager call inherits it, and no other graph's reset (which drops its capture
            # stream's entries) or reduce-overhead recording (which empties the map) frees memory
            # this graph still uses. Inductor's CUDA graph trees do the same (clear_cublas_manager).
            torch._C._cuda_clearCublasWorkspaces()
            try:
                with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                    for _ in range(n):  # recorded, not run
                        self.step(self.cache, self.state)
            finally:
                torch._C._cuda_clearCublasWorkspaces()
            self.graphs[n] = graph
            graph.replay()


def _writable(t: torch.Tensor) -> bool:
    """Whether generation may update a tensor kept on the model in place: not one made under
    torch.inference_mode() when it runs outside (an in-place update of an inference tensor outside
    inference mode is an error)."""
    return not t.is_inference() or torch.is_inference_mode_enabled()


def _reusable_cache(transformer, n_rows: int, total: int):
    """The KV cache for compiled steps. A CUDA graph is recorded against its inputs' addresses,
    and torch.compile's graph trees keep every recording and check them in turn at each call: a
    cache at new addresses in each call would add a recording per call. So every cache is a view
    at the start of buffers kept on the model (`_CacheStore`), which grow to the largest shape
    asked for: a shape seen before gets its addresses back, however shapes alternate between
    calls (batch remainders, maj@k groups, prompt lengths). The price: the model keeps buffers of
    its largest cache, and one model runs one compiled generation at a time."""
    dtype, device = transformer.output.weight.dtype, transformer.output.weight.device
    store = getattr(transformer, "_cache_store", None)
    if store is None or not store.holds(n_rows * total, dtype, device):
        size = max(n_rows * total, store.size if store is not None and store.dtype == dtype else 0)
        # Free the old buffers (and the graphs using them) before allocating: this local name
        # held them too, so the old and the new buffers would have been alive at once.
        store = transformer._cache_store = transformer._greedy_graphs = None
        store = transformer._cache_store = _CacheStore(transformer.args, size, dtype, device)
    return store.cache(n_rows, total)


class _CacheStore:
    """Flat buffers behind the compiled path's caches (see `_reusable_cache`): keys and values per
    layer, and `valid`; each shape's cache is a view at their start, made once and kept."""

    def __init__(self, args, size: int, dtype: torch.dtype, device: torch.device):
        self.args, self.size, self.dtype, self.device = args, size, dtype, device  # size: rows x slots
        self.per_slot = args.kv_heads * args.head_dim
        self.k = [torch.zeros(size * self.per_slot, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(size * self.per_slot, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.valid = torch.zeros(size, dtype=torch.bool, device=device)
        self.caches: dict[tuple[int, int], KVCache] = {}

    def holds(self, size: int, dtype: torch.dtype, device: torch.device) -> bool:
        return size <= self.size and (dtype, device) == (self.dtype, self.device) and _writable(self.valid)

    def cache(self, n_rows: int, total: int) -> KVCache:
        cache = self.caches.get((n_rows, total))
        if cache is None:
            shape, n = (n_rows, self.args.kv_heads, total, self.args.head_dim), n_rows * total * self.per_slot
            cache = self.caches[n_rows, total] = KVCache.from_tensors(
                [k[:n].view(shape) for k in self.k], [v[:n].view(shape) for v in self.v], self.valid[: n_rows * total].view(n_rows, total))
        cache.valid.zero_()
        return cache


def _decode_step(model, use_compile: bool, weights):
    """One-token forward for every row. Compiled on CUDA (static shapes: reads the whole cache and
    computes every logit); eager elsewhere, computing only the vocabulary spans asked for, with the
    block weights looked up once per generation."""
    transformer = model.transformer

    def eager(tokens, cur, positions, cache, spans):
        return transformer(tokens, cache=cache, input_pos=cur, positions=positions, kv_len=cur + 1, spans=spans, weights=weights)[:, -1]

    if not use_compile:
        return eager
    compiled = _first_call_may_compile(_compiled_step(transformer))
    slot = torch.zeros(1, dtype=torch.long, device=model.device)

    def step(tokens, cur, positions, cache, spans):
        slot.fill_(cur)  # a device-side fill: unlike torch.tensor([cur], device=...), no host sync
        return compiled(tokens, cache, slot, positions)

    return step


def _prepare_compiled(transformer, cache) -> None:
    """Before the compiled steps of a generation run: the graph cannot check that fused weights are
    current (see inference_weights), so check here, once (weights do not change while
    generating). Fused tensors are not parameters and the cache is mutated in place by the graph:
    static addresses let CUDA graphs replay them instead of copying them in at every replay."""
    transformer.check_fused()
    for t in [f.tensor for f in transformer.fused_tensors()] + cache.tensors():
        torch._dynamo.mark_static_address(t)


# Compiled steps have static shapes: each cache shape (rows, slots; slots rounded up to
# CACHE_BUCKET) is compiled once. A suite of benchmarks meets more shapes than dynamo's default
# limit of 8 per function, past which a fullgraph compile is a hard error, not a fallback. Rows
# take every value up to the batch size (batch remainders, maj@k groups, shards, resumed chunks;
# 3 rows a prompt in guided image generation) and slots up to max_seq_len / CACHE_BUCKET values,
# so a long run can meet more than 64 shapes (a limit of 64 failed on the 65th). The first call
# on a cache, which compiles at most one new shape, therefore runs with both of dynamo's limits
# raised to this: the per-function one, and the one over the process (each model's step is a
# closure of one shared code object, so every model's shapes count there). Later calls keep
# dynamo's limits: a step that recompiled on every call would still fail.
RECOMPILE_LIMIT = 4096


def _first_call_may_compile(compiled):
    """`compiled` (a step, made once per generation), its first call, where a new cache shape
    compiles, under `_new_shapes_allowed`."""
    first = True

    def call(*args):
        nonlocal first
        if first:
            first = False
            with _new_shapes_allowed():
                return compiled(*args)
        return compiled(*args)

    return call


def _new_shapes_allowed():
    """Around a compiled step's first call on a cache (not every call: ~15 us each)."""
    config = torch._dynamo.config
    # torch < 2.7 names the limits cache_size_limit and accumulated_cache_size_limit (later
    # versions keep those as aliases of the recompile_limit names)
    names = ("recompile_limit", "accumulated_recompile_limit") if hasattr(config, "recompile_limit") \
        else ("cache_size_limit", "accumulated_cache_size_limit")
    return config.patch(**{name: max(RECOMPILE_LIMIT, getattr(config, name)) for name in names})


def _compile_mode(transformer) -> str:
    return "reduce-overhead" if transformer.output.weight.is_cuda else "default"


def _compiled_step(transformer):
    """One compiled step per model, kept on the model (a global keyed by id() could outlive it)."""
    if getattr(transformer, "_compiled_step", None) is None:

        def full_cache_step(tokens, cache, input_pos, positions):
            return transformer(tokens, cache=cache, input_pos=input_pos, positions=positions, kv_len=None)[:, -1]

        transformer._compiled_step = torch.compile(full_cache_step, mode=_compile_mode(transformer), fullgraph=True, dynamic=False)
    return transformer._compiled_step
