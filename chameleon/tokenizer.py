"""Text tokenizer (a `tokenizers` JSON) and the image-code <-> token-id mapping.

Every special id comes from the tokenizer's names, never from constants: `<s>`, `</s>`, `<pad>`,
`<racm3:break>` (begin of image), `<eoss>` (end of image), `<reserved08706>` (end of turn), and the
image codes, whose tokens are named `IMGIMG<letters>Z` with letters A..J standing for digits 0..9.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tokenizers import Tokenizer

from chameleon.errors import InputError

IMAGE_TOKEN_RE = re.compile(r"^IMGIMG([A-J]+)Z$")
CONTROL_NAME_RE = re.compile(r"^<[^<>\s]+>$")
SPECIAL_NAMES = {
    "bos": "<s>",
    "pad": "<pad>",
    "eos": "</s>",
    "eoi": "<eoss>",
    "boi": "<racm3:break>",
    "eot": "<reserved08706>",
}


def image_code_of(name: str) -> int | None:
    """`IMGIMGFDZ` -> 53; None for a name that is not an image token."""
    m = IMAGE_TOKEN_RE.match(name)
    if not m:
        return None
    return int("".join(str(ord(c) - ord("A")) for c in m.group(1)))


def image_token_name(code: int) -> str:
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


class ChameleonTokenizer:
    def __init__(self, tokenizer: Tokenizer, source: str = "tokenizer"):
        self.tokenizer = tokenizer
        self.source = source
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.vocab = vocab
        self.vocab_size = max(vocab.values()) + 1

        code_to_id: dict[int, int] = {}
        for name, tid in vocab.items():
            code = image_code_of(name)
            if code is not None:
                if code in code_to_id:
                    raise InputError(f"{source}: image code {code} appears twice ({name})")
                code_to_id[code] = tid
        if not code_to_id:
            raise InputError(f"{source}: the tokenizer has no image tokens (names like IMGIMGAZ); a Chameleon tokenizer is needed")
        n_codes = len(code_to_id)
        if sorted(code_to_id) != list(range(n_codes)):
            raise InputError(f"{source}: image codes must be 0..{n_codes - 1} without gaps")
        self.n_image_codes = n_codes
        self.code_to_id = torch.tensor([code_to_id[c] for c in range(n_codes)], dtype=torch.long)
        self.id_to_code = torch.full((self.vocab_size,), -1, dtype=torch.long)
        self.id_to_code[self.code_to_id] = torch.arange(n_codes)

        for key, name in SPECIAL_NAMES.items():
            if name not in vocab:
                raise InputError(f"{source}: special token {name!r} ({key}) is missing from the vocabulary")
            setattr(self, f"{key}_id", vocab[name])
        # Ids that never render as text, and that text generation never samples (Meta's decoder
        # samples none of them either): image codes and control tokens. A control token is an added
        # token that the tokenizer marks special or that is named like one (`<unk>`, `<image>`,
        # `<reserved08707>`). Unlike Meta's rule (any name starting with '<'), BPE tokens of the
        # vocabulary such as `<<` or `</` stay text.
        specials = {self.bos_id, self.pad_id, self.eos_id, self.eoi_id, self.boi_id, self.eot_id}
        specials |= {tid for tid, added in tokenizer.get_added_tokens_decoder().items() if added.special or CONTROL_NAME_RE.match(added.content)}
        self.non_text_ids = torch.zeros(self.vocab_size, dtype=torch.bool)
        self.non_text_ids[self.code_to_id] = True
        self.non_text_ids[list(specials)] = True
        # Plain lists for per-token lookups from Python (indexing a tensor per id is ~10x slower).
        self._is_image = (self.id_to_code >= 0).tolist()
        self._is_text = (~self.non_text_ids).tolist()

    bos_id: int
    pad_id: int
    eos_id: int
    eoi_id: int
    boi_id: int
    eot_id: int

    @classmethod
    def from_file(cls, path: str | Path) -> "ChameleonTokenizer":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: tokenizer file not found" + (" (a directory is there)" if path.is_dir() else ""))
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
            raise InputError(f"{path}: not a valid `tokenizers` JSON file ({err})") from None
        return cls(tok, str(path))

    def is_image_token(self, token_id: int) -> bool:
        return 0 <= token_id < self.vocab_size and self._is_image[token_id]

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode_text(self, ids: list[int]) -> str:
        keep = [i for i in ids if 0 <= i < self.vocab_size and self._is_text[i]]
        return self.tokenizer.decode(keep, skip_special_tokens=False)

    def codes_to_ids(self, codes: torch.Tensor) -> list[int]:
        return self.code_to_id[codes.cpu().long()].tolist()

    def ids_to_codes(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        codes = self.id_to_code[torch.as_tensor(ids, dtype=torch.long)]
        if (codes < 0).any():
            raise ValueError("not every id is an image token")
        return codes
