"""The reference Chameleon (`chameleon.load`) as an lm-eval model: "chameleon".

Text is scored in text mode: image-code logits are masked before the softmax, as transformers'
ChameleonForConditionalGeneration and Meta's text-mode decoding do. A continuation counts as
greedy if text-mode greedy decoding yields it, which never picks a control token (`<unk>`,
reserved ones) either; such tokens keep their probability in the scores, as in transformers.

Loglikelihood shares prefixes at two levels: requests with the same context and a one-token
continuation (MMLU's " A".." D") are one row whose last logits score them all, and rows sharing a
prefix (the k-shot exemplars of one prompt) prefill it once into a KV cache that is copied to
every row, which then runs only its own suffix.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model

from benchmarks.backends.base import GenSettings, Segment
from benchmarks.backends.token_lm import TokenLM, TokenPair, continuation_score
from chameleon.checkpoint import hub_commit, resolve_checkpoint_path
from chameleon.commands import parse_dtype
from chameleon.generate import GenerationOptions, generate, non_text_mask


@register_model("chameleon")
class ChameleonBackend(TokenLM):
    backend_name = "chameleon"

    def __init__(self, pretrained: str, device: str = "cpu", dtype: str = "float32",
                 batch_size: int = 8, max_gen_toks: int = 256, max_batch_size: int | None = None) -> None:
        super().__init__(batch_size=batch_size, max_gen_toks=max_gen_toks, max_batch_size=max_batch_size)
        import chameleon

        self.path = str(pretrained)  # a directory or a hub repo id, as given
        self.device_name = device
        directory = resolve_checkpoint_path(pretrained)
        self.commit = hub_commit(pretrained, directory)
        self.model = chameleon.load(directory, device=device, dtype=parse_dtype(dtype, flag="dtype"))
        self.model.eval()
        self.tok = self.model.tokenizer
        self.max_length = int(self.model.config.max_seq_len)
        self.eot_token_id = self.tok.eos_id
        self.image_bounds = (self.tok.boi_id, self.tok.eoi_id)
        self.prompt_start = [self.tok.bos_id]
        self.not_greedy = non_text_mask(self.tok, self.model.config.vocab_size, self.model.device)

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    def describe(self) -> dict:
        return {**super().describe(), "path": self.path, **({"commit": self.commit} if self.commit else {}),
                "dtype": str(next(self.model.parameters()).dtype), "device": self.device_name}

    # --- tokenization -------------------------------------------------------------------------
    def encode_image(self, image) -> list[int]:
        return self.model.encode_image(image)

    def encode_text(self, text: str) -> list[int]:
        return self.tok.encode_text(text)

    def decode_text(self, ids: list[int]) -> str:
        return self.tok.decode_text(ids)

    # --- loglikelihood with shared prefixes ---------------------------------------------------
    LOGITS_BUDGET = 1 << 27  # floats of full-sequence logits per forward (512 MiB in float32)

    @torch.no_grad()
    def _score(self, pairs: list[TokenPair], on_result=None) -> list[tuple[float, bool]]:
        # One row per distinct token sequence (context + continuation minus its last token): the
        # four MMLU choices " A".." D" share one row. Rows sorted lexicographically put the items
        # of one few-shot prompt side by side; each batch runs their longest common prefix once
        # (kept while the next batches share it) and only the rows' own suffixes after it.
        rows: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (ctx, cont) in enumerate(pairs):
            rows[tuple(ctx + cont[:-1])].append(i)
        order = sorted(rows)
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        shared: tuple[int, ...] = ()
        shared_cache = None
        bar = self.progress_bar(len(pairs), "chameleon loglikelihood", leave=False)
        for batch in self._batches(order):
            first_read = min(len(pairs[i][0]) - 1 for seq in batch for i in rows[seq])
            p = min(_common_prefix(batch[0], batch[-1]), first_read)
            keep = shared and len(shared) <= p and 2 * len(shared) >= p and batch[0][:len(shared)] == shared
            if not keep:
                shared, shared_cache = batch[0][:p], (self._prefill(batch[0][:p]) if p else None)
            p = len(shared)
            last_only = all(len(pairs[i][1]) == 1 for seq in batch for i in rows[seq])
            for sub in self._split(batch, p, last_only):
                logp, pads = self._run_suffixes(sub, p, shared_cache, last_only)
                for r, seq in enumerate(sub):
                    for i in rows[seq]:
                        ctx, cont = pairs[i]
                        if last_only:
                            lp = logp[r][None]
                        else:
                            lp = logp[r, [q - p + pads[r] for q in range(len(ctx) - 1, len(ctx) - 1 + len(cont))]]
                        out[i] = continuation_score(lp, cont, self.not_greedy)
                        if on_result:
                            on_result(i, out[i])
                    bar.update(len(rows[seq]))
                    self.report_progress(len(rows[seq]))
        bar.close()
        return out  # type: ignore[return-value]

    def _batches(self, order: list[tuple[int, ...]]) -> list[list[tuple[int, ...]]]:
        """Consecutive sorted rows, batch_size at most; a row that would cut a batch's shared
        prefix (>= 32 tokens) by more than half starts a new batch (e.g. the next MMLU subject)."""
        batches: list[list[tuple[int, ...]]] = []
        cur: list[tuple[int, ...]] = []
        shared = 0
        for seq in order:
            q = _common_prefix(cur[0], seq) if cur else 0
            if cur and (len(cur) == self.batch_size or (len(cur) > 1 and shared >= 32 and 2 * q < shared)):
                batches.append(cur)
                cur = []
            shared = q if len(cur) == 1 else min(shared, q) if cur else 0
            cur.append(seq)
        return batches + [cur] if cur else batches

    def _split(self, batch: list[tuple[int, ...]], p: int, last_only: bool) -> list[list[tuple[int, ...]]]:
        """Sub-batches whose full-sequence logits fit LOGITS_BUDGET (last-only logits always fit)."""
        if last_only:
            return [batch]
        width = max(len(s) for s in batch) - p
        n = max(1, self.LOGITS_BUDGET // (width * self.model.config.vocab_size))
        return [batch[i:i + n] for i in range(0, len(batch), n)]

    def _prefill(self, tokens: tuple[int, ...]):
        cache = self.model.new_cache(1, len(tokens))
        self.model(torch.tensor([tokens], device=self.model.device), cache=cache, last_only=True)
        return cache

    def _run_suffixes(self, seqs: list[tuple[int, ...]], p: int, prefix_cache, last_only: bool):
        """Log-probs for each sequence's tokens after the first p (already in `prefix_cache`).

        Suffixes are left-padded; pad slots stay invalid in the cache and RoPE positions continue
        from p in every row, so each row is computed as if alone. Returns (B, V) log-probs after
        the last token if `last_only`, else (B, W, V), and each row's left padding.
        """
        width = max(len(s) for s in seqs) - p
        cache = self.model.new_cache(len(seqs), p + width)
        if p:
            cache.copy_rows_from(prefix_cache, src_row=0, length=p)
        tokens = torch.full((len(seqs), width), self.tok.pad_id, dtype=torch.long)
        positions = torch.full((len(seqs), width), p, dtype=torch.long)
        valid = torch.zeros((len(seqs), width), dtype=torch.bool)
        pads = []
        for r, s in enumerate(seqs):
            pad = width - (len(s) - p)
            pads.append(pad)
            tokens[r, pad:] = torch.tensor(s[p:])
            positions[r, pad:] = torch.arange(p, len(s))
            valid[r, pad:] = True
        dev = self.model.device
        logits = self.model(tokens.to(dev), cache=cache, start_pos=p, valid=valid.to(dev), positions=positions.to(dev),
                            last_only=last_only)
        return self._logprobs(logits[:, -1] if last_only else logits), pads

    def _logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        logits[..., self.tok.code_to_id.to(logits.device)] = float("-inf")
        return F.log_softmax(logits, -1)

    # --- generation ---------------------------------------------------------------------------
    def _options(self, settings: GenSettings, seed: int | None, mode: str = "text"):
        return GenerationOptions(
            max_new_tokens=settings.max_gen_toks, temperature=settings.temperature if seed is not None else 0.0,
            top_p=settings.top_p, top_k=settings.top_k, stop_strings=tuple(settings.until),
            seed=seed or 0, mode=mode,
        )

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], settings: GenSettings, seed: int | None) -> list[list[int]]:
        return generate(self.model, prompts, self._options(settings, seed))

    @torch.no_grad()
    def generate_interleaved(self, prompts: list[list[Segment]], settings: GenSettings,
                             mode: str = "interleaved") -> list[list[Segment]]:
        self.model.require_decoder_for(mode)
        seed = None if settings.greedy else settings.seed
        new = generate(self.model, [self.encode_prompt(p) for p in prompts], self._options(settings, seed, mode))
        return [self.model.decode_output(ids) for ids in new]


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
