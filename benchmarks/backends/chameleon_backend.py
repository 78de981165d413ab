"""The reference Chameleon (`chameleon.load`) as an lm-eval model: "chameleon".

Text is scored in text mode: image-code logits are masked before the softmax, as transformers'
ChameleonForConditionalGeneration and Meta's text-mode decoding do.

Loglikelihood shares prefixes: requests are grouped by context, each context is run once and all
its continuations are scored from it. Single-token continuations (MMLU's " A".." D") need nothing
more than the context's last logits; longer ones continue from the context's KV cache, copied
to one row per continuation.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from tqdm import tqdm

from benchmarks.backends.base import GenSettings, Segment
from benchmarks.backends.token_lm import TokenLM, TokenPair


@register_model("chameleon")
class ChameleonBackend(TokenLM):
    backend_name = "chameleon"

    def __init__(self, pretrained: str, device: str = "cpu", dtype: str = "float32",
                 batch_size: int = 8, max_gen_toks: int = 256) -> None:
        super().__init__(batch_size=batch_size, max_gen_toks=max_gen_toks)
        import chameleon

        self.path = str(pretrained)
        self.device_name = device
        self.model = chameleon.load(pretrained, device=device, dtype=getattr(torch, dtype))
        self.model.eval()
        self.tok = self.model.tokenizer
        self.max_length = int(self.model.config.max_seq_len)
        self.eot_token_id = self.tok.eos_id

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    def describe(self) -> dict:
        return {**super().describe(), "path": self.path, "dtype": str(next(self.model.parameters()).dtype),
                "device": self.device_name}

    # --- tokenization -------------------------------------------------------------------------
    def encode_prompt(self, segments: list[Segment]) -> list[int]:
        return self.model.encode_prompt(list(segments), bos=True)

    def encode_text(self, text: str) -> list[int]:
        return self.tok.encode_text(text)

    def decode_text(self, ids: list[int]) -> str:
        return self.tok.decode_text(ids)

    # --- loglikelihood with shared prefixes ---------------------------------------------------
    @torch.no_grad()
    def _score(self, pairs: list[TokenPair]) -> list[tuple[float, bool]]:
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (ctx, _) in enumerate(pairs):
            groups[tuple(ctx)].append(i)
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        short = [c for c, idx in groups.items() if all(len(pairs[i][1]) == 1 for i in idx)]
        long = [c for c, idx in groups.items() if any(len(pairs[i][1]) > 1 for i in idx)]
        bar = tqdm(total=len(pairs), desc="chameleon loglikelihood", leave=False)
        # 1) contexts whose continuations are all one token: a batched forward of the contexts
        short.sort(key=len, reverse=True)
        for start in range(0, len(short), self.batch_size):
            ctxs = short[start:start + self.batch_size]
            tokens = self._pad([list(c) for c in ctxs])
            logp = self._logprobs(self.model(tokens))
            for r, c in enumerate(ctxs):
                last = logp[r, len(c) - 1]
                for i in groups[c]:
                    out[i] = self._result(last[None], pairs[i][1])
                bar.update(len(groups[c]))
        # 2) the rest: prefill the context once, continue every continuation from its KV cache
        for c in long:
            idx = groups[c]
            longest = max(len(pairs[i][1]) for i in idx)
            prefix = self.model.new_cache(1, len(c) + longest)
            last = self._logprobs(self.model(torch.tensor([c]), cache=prefix, start_pos=0)[0, -1])
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                conts = [pairs[i][1] for i in chunk]
                cache = self.model.new_cache(len(chunk), len(c) + longest)
                cache.copy_rows_from(prefix, src_row=0)
                width = max(map(len, conts)) - 1
                logp = None
                if width > 0:
                    tokens = self._pad([k[:-1] or [k[0]] for k in conts], width)
                    logp = self._logprobs(self.model(tokens, cache=cache, start_pos=len(c)))
                for r, i in enumerate(chunk):
                    rows = last[None] if logp is None else torch.cat([last[None], logp[r, : len(conts[r]) - 1]])
                    out[i] = self._result(rows, conts[r])
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]

    def _logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        logits[..., self.tok.image_token_ids.to(logits.device)] = float("-inf")
        return F.log_softmax(logits, -1)

    def _pad(self, seqs: list[list[int]], width: int | None = None) -> torch.Tensor:
        # right padding: causal attention keeps real positions independent of the pad
        width = width or max(map(len, seqs))
        tokens = torch.full((len(seqs), width), self.tok.pad_id, dtype=torch.long)
        for r, s in enumerate(seqs):
            tokens[r, : len(s)] = torch.tensor(s[:width])
        return tokens

    @staticmethod
    def _result(rows: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
        target = torch.tensor(cont)
        lp = rows.gather(-1, target[:, None]).sum().item()
        return lp, bool((rows.argmax(-1) == target).all())

    # --- generation ---------------------------------------------------------------------------
    def _options(self, settings: GenSettings, seed: int | None, mode: str = "text"):
        from chameleon.generate import GenerationOptions

        return GenerationOptions(
            max_new_tokens=settings.max_gen_toks, temperature=settings.temperature if seed is not None else 0.0,
            top_p=settings.top_p, top_k=settings.top_k, stop_strings=tuple(settings.until),
            seed=seed or 0, mode=mode,
        )

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], settings: GenSettings, seed: int | None) -> list[list[int]]:
        from chameleon.generate import generate

        return generate(self.model, prompts, self._options(settings, seed))

    @torch.no_grad()
    def generate_interleaved(self, prompts: list[list[Segment]], settings: GenSettings,
                             mode: str = "interleaved") -> list[list[Segment]]:
        from chameleon.generate import generate

        seed = None if settings.greedy else settings.seed
        new = generate(self.model, [self.encode_prompt(p) for p in prompts], self._options(settings, seed, mode))
        return [self.model.decode_output(ids) for ids in new]
