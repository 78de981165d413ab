"""VQGAN image tokenizer: Meta's preprocessing and codes <-> PIL both ways."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from chameleon.vqgan import open_image, preprocess, to_pil
from tests.conftest import DATA, PHOTO


def test_preprocess_resizes_shortest_side_and_center_crops():
    img = open_image(DATA / "images" / "coco" / "COCO_val2014_000000199510.jpg")  # landscape
    assert img.width != img.height
    x = preprocess(img, 64)
    assert x.shape == (1, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    # Same as doing Meta's steps by hand.
    scale = 64 / min(img.size)
    resized = img.convert("RGB").resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
    left, top = (resized.width - 64) // 2, (resized.height - 64) // 2
    expected = np.asarray(resized.crop((left, top, left + 64, top + 64)), dtype=np.float64) / 255 * 2 - 1
    torch.testing.assert_close(x[0].permute(1, 2, 0).double(), torch.from_numpy(expected), atol=1e-6, rtol=0)
    assert preprocess(img.convert("L"), 32).shape == (1, 3, 32, 32)  # grayscale becomes RGB


def test_codes_pil_round_trip(tiny_model):
    codes = tiny_model.vqgan.encode_image(open_image(PHOTO))
    assert codes.shape == (tiny_model.image_seq_len,) and 0 <= codes.min() and codes.max() < tiny_model.vqgan.cfg.n_embed
    ids = tiny_model.encode_image(open_image(PHOTO))
    assert ids[0] == tiny_model.tokenizer.boi_id and ids[-1] == tiny_model.tokenizer.eoi_id
    assert tiny_model.tokenizer.ids_to_codes(ids[1:-1]).tolist() == codes.tolist()
    image = tiny_model.vqgan.decode_image(codes)
    assert image.mode == "RGB" and image.size == (tiny_model.vqgan.cfg.resolution,) * 2
    # Decoding is deterministic and pixels map back: to_pil inverts x/255*2-1 up to truncation.
    assert np.array_equal(np.asarray(image), np.asarray(tiny_model.vqgan.decode_image(codes)))
    pixels = torch.rand(3, 8, 8) * 2 - 1
    back = torch.from_numpy(np.asarray(to_pil(pixels), dtype=np.float64)).permute(2, 0, 1) / 255 * 2 - 1
    assert (back - pixels.double()).abs().max() <= 2 / 255
