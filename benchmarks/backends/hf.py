"""Hugging Face transformers baseline: any causal LM, and `ChameleonForConditionalGeneration`.

Scores whole (context + continuation) sequences in right-padded batches, like lm-eval's `hf`
model type; images are supported for Chameleon checkpoints (VQ codes spliced in as tokens).
"""

from __future__ import annotations

import hashlib
import json
from fnmatch import fnmatchcase
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from safetensors import SafetensorError

try:  # config fields of the wrong type, with huggingface_hub's strict dataclasses (transformers 5)
    from huggingface_hub.errors import StrictDataclassError
except ImportError:
    StrictDataclassError = ValueError

from benchmarks.backends.base import GenSettings
from benchmarks.backends.token_lm import TokenLM, TokenPair, continuation_score
from chameleon.chameleon import available_device
from chameleon.checkpoint import PROCESSOR_FILES, hf_patterns, hub_commit, resolve_checkpoint_path
from chameleon.commands import parse_dtype
from chameleon.errors import InputError
from chameleon.generate import row_seed


# what transformers raises for a malformed checkpoint directory: bad JSON, unknown model_type,
# missing or corrupt weights, a config field of the wrong type, weights of the wrong shape
LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError, RuntimeError, AssertionError, SafetensorError, StrictDataclassError)


def hash_checkpoint(path: Path) -> str:
    """sha256 over the files of a HF checkpoint directory that a hub fetch brings (config, weights,
    tokenizer files: `hf_patterns`; the dtype it is loaded in is part of a run's identity, see
    runner/run.py), and no others: a directory and the repo id of the same files match. So .bin
    weights count only where there are no safetensors, which transformers loads instead."""
    h = hashlib.sha256()
    patterns = hf_patterns(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and any(fnmatchcase(p.name, pat) for pat in patterns))
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


@register_model("hf-mm")
class HFBackend(TokenLM):
    backend_name = "hf"

    def __init__(self, pretrained: str, device: str = "cpu", dtype: str = "float32",
                 batch_size: int = 8, max_gen_toks: int = 256, max_length: int | None = None,
                 add_bos_token: bool | None = None, max_batch_size: int | None = None) -> None:
        super().__init__(batch_size=batch_size, max_gen_toks=max_gen_toks, max_batch_size=max_batch_size)
        import transformers

        path = resolve_checkpoint_path(pretrained)  # a hub repo id too, fetched as for the chameleon backend
        if not (path / "config.json").is_file():
            raise InputError(f"--model {pretrained}: expected a Hugging Face checkpoint directory with config.json")
        self.path, self.commit = str(pretrained), hub_commit(pretrained, path)
        self.device_name = device
        available_device(device)  # before any weights are read
        torch_dtype = parse_dtype(dtype, flag="dtype")
        try:
            config = transformers.AutoConfig.from_pretrained(path)
            self.is_chameleon = config.model_type == "chameleon"
            auto = transformers.AutoModelForImageTextToText if self.is_chameleon else transformers.AutoModelForCausalLM
            model = auto.from_pretrained(path, dtype=torch_dtype)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            self.image_problem = self.checkpoint_image_problem(path)
            self.processor = None if self.image_problem else transformers.AutoProcessor.from_pretrained(path)
        except LOAD_ERRORS as err:
            reason = " ".join(str(err).split())[:500]
            raise InputError(f"--model {pretrained}: cannot load this Hugging Face checkpoint directory "
                             f"({type(err).__name__}: {reason})") from None
        self.model = model.to(device).eval()
        self.max_length = int(max_length or getattr(config, "max_position_embeddings", None)
                              or getattr(getattr(config, "text_config", None), "max_position_embeddings", 2048))
        # special ids: the tokenizer's, else the model config's (Chameleon checkpoints set them there)
        first = lambda *xs: next((x for x in xs if x is not None), None)  # noqa: E731
        self.eot_token_id = first(self.tokenizer.eos_token_id, getattr(config, "eos_token_id", None))
        self.bos_id = first(self.tokenizer.bos_token_id, getattr(config, "bos_token_id", None))
        self.pad_id = first(self.tokenizer.pad_token_id, getattr(config, "pad_token_id", None), self.eot_token_id, 0)
        # Prompts start with BOS where the tokenizer itself adds one, as in lm-eval's hf model (GPT-2,
        # Pythia and Qwen tokenizers add none); Chameleon's always does. `add_bos_token` overrides.
        if add_bos_token is None:
            add_bos_token = self.is_chameleon or self.tokenizer("a")["input_ids"][:1] == [self.tokenizer.bos_token_id]
        self.add_bos = bool(add_bos_token) and self.bos_id is not None
        self.prompt_start = [self.bos_id] if self.add_bos else []
        # Generation ends at any of the checkpoint's end ids (generation_config may list several).
        listed = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        listed = listed if isinstance(listed, (list, tuple)) else [listed]
        self.stop_ids = sorted({t for t in (self.eot_token_id, *listed) if t is not None})
        if self.processor is not None:  # where an image's tokens begin and end (left truncation skips a cut one)
            self.image_bounds = (self.processor.image_start_token_id, self.processor.image_end_token_id)
        self._fingerprint = hash_checkpoint(path)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def describe(self) -> dict:
        return {**super().describe(), "path": self.path, **({"commit": self.commit} if self.commit else {}),
                "class": type(self.model).__name__,
                "dtype": str(self.model.dtype), "device": self.device_name}

    # --- tokenization -------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def prefix_token_id(self) -> int:  # what an empty context is scored after (lm-eval's rule)
        return self.bos_id if self.bos_id is not None else self.eot_token_id

    @classmethod
    def checkpoint_image_problem(cls, pretrained) -> str | None:
        path = Path(pretrained)
        try:
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            return None  # loading says what is wrong with config.json
        if model_type != "chameleon":
            return f"it is a {model_type!r} checkpoint; images need a Chameleon one"
        missing = [name for name in PROCESSOR_FILES if not (path / name).is_file()]
        if missing:
            return (f"it lacks {' and '.join(missing)} (transformers' ChameleonProcessor settings, which turn an "
                    f"image into VQ codes); `chameleon-bench convert SRC DST --to hf` writes them")
        return None

    @torch.no_grad()
    def encode_image(self, image) -> list[int]:
        """boi, the VQ codes as tokens, eoi. Only the image processor is used: the processor's text
        path would append the tokenizer's sep_token and needs `<image>` in the vocabulary."""
        if self.image_problem:
            raise InputError(f"--model {self.path}: the hf backend cannot take image input: {self.image_problem}")
        pixels = self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        codes = self.model.model.get_image_tokens(pixels.to(self.model.device, self.model.dtype))
        return [self.processor.image_start_token_id, *codes.flatten().tolist(), self.processor.image_end_token_id]

    # --- model --------------------------------------------------------------------------------
    def _logits(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens, attention_mask=mask).logits

    @torch.no_grad()
    def _score(self, pairs: list[TokenPair], on_result=None) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        bar = self.progress_bar(len(pairs), "hf loglikelihood", leave=False)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            seqs = [(pairs[i][0] + pairs[i][1])[:-1] for i in chunk]
            width = max(map(len, seqs))
            tokens = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, s in enumerate(seqs):
                tokens[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
            logp = F.log_softmax(self._logits(tokens.to(self.model.device), mask.to(self.model.device)).float(), -1)
            for r, i in enumerate(chunk):
                ctx, cont = pairs[i]
                pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont))
                out[i] = continuation_score(logp[r, pos], cont)
                if on_result:
                    on_result(i, out[i])
            bar.update(len(chunk))
            self.report_progress(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], settings: GenSettings, seed: int | None) -> list[list[int]]:
        if seed is not None:  # one torch RNG stream per row, seeded by (seed, prompt)
            return [self._hf_generate([p], settings, row_seed(seed, p))[0] for p in prompts]
        return self._hf_generate(prompts, settings, None)

    def _hf_generate(self, prompts: list[list[int]], settings: GenSettings, seed: int | None) -> list[list[int]]:
        width = max(map(len, prompts))
        tokens = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(tokens)
        for r, p in enumerate(prompts):  # left padding for generation
            tokens[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        kwargs = dict(max_new_tokens=settings.max_gen_toks, pad_token_id=self.pad_id,
                      eos_token_id=self.stop_ids, do_sample=seed is not None)
        if seed is not None:
            torch.manual_seed(seed)
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k or None)
        if settings.until:
            kwargs.update(stop_strings=list(settings.until), tokenizer=self.tokenizer)
        gen = self.model.generate(input_ids=tokens.to(self.model.device), attention_mask=mask.to(self.model.device),
                                  **kwargs)[:, width:].tolist()
        out = []
        for row in gen:  # up to its first end id, which decoding drops where it is a special token (as lm-eval's)
            row = row[: next((n + 1 for n, t in enumerate(row) if t in self.stop_ids), len(row))]
            out.append([t for t in row if t != self.pad_id])
        return out


