"""Parity with transformers' ChameleonForConditionalGeneration on tiny random configs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import ChameleonConfig, ChameleonForConditionalGeneration
from transformers.generation import LogitsProcessor, LogitsProcessorList

import chameleon
from chameleon.config import preset
from chameleon.tiny import TINY_VQ, build_tokenizer
from chameleon.vqgan import open_image, preprocess
from tests.conftest import PHOTO, hf_logits

TEXT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."


def save_hf_random(path, swin_norm: bool, n_kv_heads: int | None, seed: int = 0):
    """A transformers-built random Chameleon saved with save_pretrained, plus our tiny tokenizer."""
    args = dataclasses.replace(preset("tiny"), swin_norm=swin_norm, n_kv_heads=n_kv_heads)
    tok = build_tokenizer(TINY_VQ.n_embed, args.vocab_size)
    vocab = tok.get_vocab(with_added_tokens=True)
    cfg = ChameleonConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_seq_len, swin_norm=swin_norm, vq_config=TINY_VQ.to_hf(),
        vocabulary_map=vocab, bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
    )
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # every parameter random, per-head q/k-norms included
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight") and "vqmodel" not in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "vqmodel" in name:
                p.copy_(torch.randn_like(p) / max(1, p[0].numel()) ** 0.5 if p.ndim > 1 else 0.05 * torch.randn_like(p) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    return model


@pytest.fixture(scope="module", params=[(False, 2), (True, 2), (False, None)], ids=["gqa", "swin-gqa", "mha"])
def hf_pair(request, tmp_path_factory):
    swin, kv = request.param
    path = tmp_path_factory.mktemp("hf-random")
    hf = save_hf_random(path, swin, kv)
    return hf, chameleon.load(path)


def test_logits_match_transformers(hf_pair):
    """Every logit, the image codes' included (image generation samples from them)."""
    hf, ours = hf_pair
    ids = torch.tensor([ours.encode_prompt(TEXT)])
    with torch.no_grad():
        got = ours(ids)
    torch.testing.assert_close(got, hf_logits(hf, ids), atol=1e-5, rtol=0)


class _MaskLike(LogitsProcessor):
    """Give HF's greedy search the same candidate set as our text mode."""

    def __init__(self, banned):
        self.banned = banned

    def __call__(self, input_ids, scores):
        return scores.masked_fill(self.banned, float("-inf"))


def test_greedy_tokens_match_transformers(hf_pair):
    hf, ours = hf_pair
    tok = ours.tokenizer
    prompt = ours.encode_prompt(TEXT)
    got = chameleon.generate(ours, [prompt], chameleon.GenerationOptions(max_new_tokens=32, stop_ids=()))[0]
    banned = tok.non_text_ids.clone()
    banned[[tok.eos_id, tok.eot_id]] = False
    expected = hf.generate(
        torch.tensor([prompt]), max_new_tokens=len(got), do_sample=False, pad_token_id=tok.pad_id,
        logits_processor=LogitsProcessorList([_MaskLike(banned)]),
    )[0, len(prompt):].tolist()
    assert len(got) == 32, "a random model should not hit eos this early; if it does, change the prompt"
    assert got == expected


def test_vq_codes_match_transformers_on_real_photo(hf_pair):
    hf, ours = hf_pair
    pixels = preprocess(open_image(PHOTO), TINY_VQ.resolution)
    with torch.no_grad():
        expected = hf.model.vqmodel.encode(pixels).image_tokens.flatten()
    got = ours.vqgan.encode(pixels).flatten()
    assert got.numel() == TINY_VQ.image_seq_len
    assert torch.equal(got, expected)
    assert got.unique().numel() > 10  # a real photo, not a constant image
