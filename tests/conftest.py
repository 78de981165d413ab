"""Shared fixtures: tiny Chameleon checkpoints the project builds itself (no downloads)."""

from __future__ import annotations

import contextlib
import importlib
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("CHAMELEON_KERNEL_CONFIGS", None)  # (the kernel tests time their own choices)
# Without a GPU, the Triton kernels (chameleon/kernels.py) run in Triton's interpreter, which must
# be chosen before anything imports triton (torch.compile on CPU does, when it is installed).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "benchmarks" / "data"
PHOTO = DATA / "images" / "skimage" / "chelsea.png"


def expect_error(path, *fragments):
    """Loading `path` fails with an InputError whose message holds every fragment."""
    import chameleon
    from chameleon.errors import InputError

    with pytest.raises(InputError) as err:
        chameleon.load(path)
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    """transformers' Chameleon logits over the whole vocabulary. Its forward sets the image codes'
    logits to the dtype's minimum (it generates text only), which would leave ours for them
    unchecked: they are its own lm_head on its own hidden states, checked to be what its forward
    gives on every other token."""
    with torch.no_grad():
        full = hf.lm_head(hf.model(input_ids=ids).last_hidden_state)
        masked = hf(input_ids=ids).logits
    image = masked[0, 0] == torch.finfo(masked.dtype).min
    assert 0 < int(image.sum()) < masked.shape[-1] and torch.equal(full[..., ~image], masked[..., ~image])
    return full


def cut_at_stop_strings(decode, rows: list[list[int]], stops: tuple[str, ...]) -> list[list[int]]:
    """Each row cut after its first token whose last 64 tokens decode to a text holding one of
    `stops`: the stop-string rule, written out independently of chameleon.generate."""

    def cut(row):
        for j in range(len(row)):
            if any(s in decode(row[max(0, j - 63) : j + 1]) for s in stops):
                return row[: j + 1]
        return row

    return [cut(row) for row in rows]


def build_tiny_llama(out: Path, bos: bool = True, vocab_size: int = 1024, max_positions: int = 4096) -> Path:
    """A random 2-layer Llama in HF format with a BPE tokenizer trained on the shipped GSM8K text.
    Its tokenizer adds no BOS (as GPT-2's and Pythia's); with `bos=False` it has none at all."""
    import json

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    lines = (DATA / "gsm8k/test.jsonl").read_text().splitlines()
    texts = [json.loads(line)["question"] + "\n" + json.loads(line)["answer"] for line in lines]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", **({"bos_token": "<s>"} if bos else {}))
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_positions,
                         bos_token_id=1 if bos else None, eos_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    """A tiny random Chameleon in HF format (GQA, two model-parallel q/k-norm groups)."""
    from chameleon.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "hf", "hf", seed=0)


@pytest.fixture(scope="session")
def tiny_meta(tmp_path_factory) -> Path:
    from chameleon.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "meta", "meta", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_hf):
    import chameleon

    return chameleon.load(tiny_hf)


class _FakeGraph:
    """A CUDA graph emulated on CPU (see `emulate_cuda_graphs`): replay runs the steps recorded in its capture."""

    def __init__(self):
        self.steps = None

    def replay(self):
        self.steps()


class _FakeStream:
    def wait_stream(self, other):
        pass


def emulate_cuda_graphs(monkeypatch, transformer, events: list) -> None:
    """Let `_GreedyGraphs` run on CPU, with torch's CUDA graph API emulated: a capture records the
    steps without running them (the tensors they write are restored after it), a replay runs
    them. `events` gets "capture", "captured N" and "clear" (cuBLAS workspaces emptied)."""
    compiled_decode = importlib.import_module("chameleon.compiled_decode")

    @contextlib.contextmanager
    def capture(graph, pool=None, stream=None, capture_error_mode="global"):
        graphs = next(g for g in transformer._greedy_graphs.values() if g.stream is stream)
        tensors = [*graphs.cache.tensors(), *vars(graphs.state).values()]
        before = [t.clone() for t in tensors]
        step, calls = graphs.step, []
        graphs.step = lambda cache, state: calls.append((cache, state))
        events.append("capture")
        try:
            yield
        finally:
            graphs.step = step
            for t, b in zip(tensors, before):  # recorded, not run
                t.copy_(b)
            graph.steps = lambda: [step(*c) for c in calls]
            events.append(f"captured {len(calls)}")

    monkeypatch.setattr(compiled_decode, "_captures_graphs", lambda cache: True)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", object)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: events.append("clear"), raising=False)
