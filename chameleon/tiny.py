"""Tiny Chameleon models the project builds itself, for tests, benchmarks and the demo.

The tokenizer is a byte-level BPE trained on a small real corpus shipped with the package, with the
real model's special and image token names in the real order (`<s>`, `<pad>`, `</s>`, `<unk>`,
image codes, `<eoss>`, `<racm3:break>`, `<reserved08706>`, `<image>`); the weights are random.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from chameleon.chameleon import Chameleon, save_checkpoint
from chameleon.config import ModelArgs, VQGANConfig, preset
from chameleon.tokenizer import ChameleonTokenizer, image_token_name

ASSETS = Path(__file__).parent / "assets"
TINY_VQ = VQGANConfig(embed_dim=32, n_embed=1024, z_channels=32, resolution=128, ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1)


def build_tokenizer(n_image_codes: int, vocab_size: int, corpus: Path = ASSETS / "tiny_corpus.txt", fill: bool = False) -> Tokenizer:
    """Byte-level BPE over the corpus with the real special and image token names. The corpus yields
    about 6,000 merges at most; `fill` pads the vocabulary to exactly `vocab_size` with reserved
    (control) tokens, so that it knows every id of the model, as a real tokenizer does."""
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    specials += [image_token_name(c) for c in range(n_image_codes)]
    specials += ["<eoss>", "<racm3:break>", "<reserved08706>", "<image>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(corpus)], trainer)
    if fill:
        have = tok.get_vocab()
        names = (f"<reserved{n:05d}>" for n in range(10000, 100000))
        tok.add_special_tokens([n for n in names if n not in have][: vocab_size - tok.get_vocab_size()])
    # As in HF's Chameleon tokenizer.json: encoding with special tokens prepends <s>.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    return tok


def randomize_(model: Chameleon, seed: int) -> None:
    """Random weights that exercise every parameter, norms included (their permutations matter).

    Heads within one model-parallel shard share their q/k-norm, so Meta's format can hold them.
    Numbers are drawn on the parameters' device (a 7B-shaped model on a GPU takes seconds).
    """
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    args = model.config

    def randn(shape):
        return torch.randn(shape, generator=g, device=device)

    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if name.endswith(("q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias")):
                base = 1.0 if name.endswith("weight") else 0.0
                shards = args.model_parallel_size
                per_shard = randn((shards, 1, p.shape[1])) * 0.2 + base
                p.copy_(per_shard.expand(shards, p.shape[0] // shards, p.shape[1]).reshape(p.shape))
            elif p.ndim == 1:  # RMSNorm
                p.copy_(1.0 + 0.1 * randn(p.shape))
            else:
                p.copy_(0.02 * randn(p.shape) * (4.0 if "tok_embeddings" in name else 1.0))
        for name, p in model.vqgan.named_parameters():
            if p.ndim > 1:  # conv kernels and the codebook: unit-variance outputs
                p.copy_(randn(p.shape) / max(1, p[0].numel()) ** 0.5)
            else:  # GroupNorm scales near 1, biases near 0
                p.copy_(0.05 * randn(p.shape) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))


def random_model(
    args: ModelArgs, vq: VQGANConfig, seed: int = 0, text_vocab: int | None = None, device="cpu", fill_vocab: bool = False
) -> Chameleon:
    """An in-memory Chameleon with the tiny tokenizer and random weights (see `randomize_`);
    `fill_vocab`: a tokenizer that knows every id of the model's vocabulary, as real ones do."""
    tok = build_tokenizer(vq.n_embed, args.vocab_size if fill_vocab else text_vocab or args.vocab_size, fill=fill_vocab)
    with torch.device(device):
        model = Chameleon(args, vq, ChameleonTokenizer(tok, "tiny tokenizer"))
    randomize_(model, seed)
    return model


def build_tiny_model(
    out_dir: str | Path,
    format: str = "hf",
    seed: int = 0,
    args: ModelArgs | None = None,
    vq: VQGANConfig | None = None,
    text_vocab: int | None = None,
    shards: int | None = None,
) -> Path:
    """Write a loadable checkpoint directory of a tiny random Chameleon and return its path."""
    out = Path(out_dir)
    args = args or dataclasses.replace(preset("tiny"), model_parallel_size=2)
    model = random_model(args, vq or TINY_VQ, seed, text_vocab)
    out.mkdir(parents=True, exist_ok=True)
    model.tokenizer_file = out / "_tokenizer_build.json"
    model.tokenizer.tokenizer.save(str(model.tokenizer_file))
    save_checkpoint(model.to_checkpoint(), out, format, model.tokenizer, shards)
    model.tokenizer_file.unlink()
    return out
