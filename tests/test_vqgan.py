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


def test_transparency_blended_as_meta_in_bounded_memory(monkeypatch):
    """Transparent pixels go onto white with Meta's float64 formula, exactly, for every mode with
    alpha; blending works in row blocks, so a large photo's float64 temporaries are not all held at
    once (a 10000x10000 RGBA PNG took 7 GB). Blocks are scaled down here with the image."""
    import tracemalloc

    from chameleon import vqgan
    from chameleon.vqgan import to_rgb

    monkeypatch.setattr(vqgan, "BLEND_BLOCK_PIXELS", 1 << 14)  # 13 rows of 1200: the last block is short

    photo = open_image(PHOTO).convert("RGB").resize((1200, 900))
    alpha = np.add.outer(np.arange(900) % 256, np.arange(1200) // 5).astype(np.uint8)
    rgba = Image.fromarray(np.dstack([np.asarray(photo), alpha]), "RGBA")
    pal = photo.convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = 3
    for image in (rgba, rgba.convert("LA"), rgba.convert("PA"), pal):
        v = np.asarray(image.convert("RGBA"))
        a = v[:, :, 3:4] / 255.0
        want = ((1 - a) * 255 + a * v[:, :, :3]).astype("uint8")  # Meta's _whiten_transparency
        assert (v[:, :, 3] < 255).any() and np.array_equal(np.asarray(to_rgb(image)), want), image.mode
    tracemalloc.start()
    to_rgb(rgba)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3 * rgba.width * rgba.height * 4, peak  # the RGBA array, the output and a block
