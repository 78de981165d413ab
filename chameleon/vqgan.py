"""VQGAN image tokenizer (Make-A-Scene lineage, taming-transformers parameter layout).

Module names match Meta's `vqgan.ckpt` keys (`encoder.*`, `decoder.*`, `quantize.embedding.weight`,
`quant_conv`, `post_quant_conv`); HF stores the same encoder names under `model.vqmodel.`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn

from chameleon.config import VQGAN_GROUPS, VQGANConfig
from chameleon.errors import InputError


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=VQGAN_GROUPS, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all positions."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q = self.q(h).reshape(b, c, hh * ww).permute(0, 2, 1)
        k = self.k(h).reshape(b, c, hh * ww)
        v = self.v(h).reshape(b, c, hh * ww)
        w = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)
        out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as in taming


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block`, `attn` and an optional resampler (names as in the checkpoints)."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def run(self, h):
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h):
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        res, in_mult = cfg.resolution, (1, *cfg.ch_mult)
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            block_in, block_out = cfg.ch * in_mult[i], cfg.ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _Level(blocks, attns)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in, cfg.dropout)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level.run(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.latent_size
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, cfg.dropout)
        levels: list[_Level] = []
        for i in reversed(range(len(cfg.ch_mult))):
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _Level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level)  # checkpoint order: up.0 is the highest resolution
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.run(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest codebook entry per position. z: (B, C, H, W) -> codes (B, H*W), row-major."""
        b = z.shape[0]
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        codebook = self.embedding.weight
        # Same expansion and op order as the reference implementations, so ties break identically.
        dist = (
            torch.sum(flat**2, dim=1, keepdim=True)
            + torch.sum(codebook**2, dim=1)
            - 2 * torch.einsum("bd,dn->bn", flat, codebook.transpose(0, 1))
        )
        return torch.argmin(dist, dim=1).reshape(b, -1)


class VQGAN(nn.Module):
    """Encoder + quantizer + decoder. The decoder is optional: HF checkpoints ship the encoder only."""

    def __init__(self, cfg: VQGANConfig, with_decoder: bool = True):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg) if with_decoder else None

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, R, R) in [-1, 1] -> codes (B, latent**2)."""
        return self.quantize(self.quant_conv(self.encoder(pixels)))

    def require_decoder(self) -> None:
        """Before image outputs are generated, not after: say now that they cannot be decoded."""
        if self.decoder is None:
            raise InputError(
                "this checkpoint has no VQGAN decoder (HF-format checkpoints ship the encoder only): "
                "image outputs need Meta's tokenizer/vqgan.ckpt, or convert a Meta checkpoint with "
                "`chameleon-bench convert SRC DST --to hf`, which keeps the decoder in vqgan_decoder.safetensors"
            )

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, latent**2) -> pixels (B, 3, R, R) clamped to [-1, 1]."""
        self.require_decoder()
        side = self.cfg.latent_size
        z = self.quantize.embedding(codes).reshape(codes.shape[0], side, side, -1).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(z)).clamp(-1.0, 1.0)

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode_image(self, image: Image.Image) -> torch.Tensor:
        pixels = preprocess(image, self.cfg.resolution).to(self.device, self.dtype)
        return self.encode(pixels)[0]

    def decode_image(self, codes: torch.Tensor) -> Image.Image:
        return to_pil(self.decode(codes.reshape(1, -1).to(self.device))[0])


# --- pixels <-> PIL, Meta's preprocessing ---------------------------------------------------------

ACCEPTED_MODES = {"RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1"}
BLEND_BLOCK_PIXELS = 1 << 18  # pixels blended at once by to_rgb (float64 temporaries: ~20 MB)
MAX_ASPECT_RATIO = 32  # preprocessing scales the short side to 512: a 20000x1 image would need 10 GB


def open_image(path: str | Path, decode: bool = True) -> Image.Image | None:
    """Open and fully decode an image file, naming the file in any error. `decode=False`: check
    only what its header says (size, mode), fast, and return None."""
    if Path(path).is_dir():
        raise InputError(f"{path}: expected an image file, got a directory")
    try:
        with Image.open(path) as img:
            check_image(img, str(path))  # before decoding: the header gives size and mode
            if not decode:
                return None
            img.load()
            return img.copy()
    except FileNotFoundError:
        raise InputError(f"{path}: image file not found") from None
    except Image.DecompressionBombError as err:
        raise InputError(f"{path}: image too large to decode safely ({err}); downscale it") from None
    except UnidentifiedImageError:
        raise InputError(f"{path}: not a readable image (PNG/JPEG/... expected)") from None
    except (OSError, SyntaxError) as err:
        if isinstance(err, OSError) and err.errno is not None:  # the OS failed to read the path (ELOOP, EIO, ...)
            raise InputError(f"{path}: cannot read the image file ({err.strerror})") from None
        raise InputError(f"{path}: image is truncated or corrupt ({err})") from None  # PIL's errors carry no errno


def check_image(image: Image.Image, name: str = "image") -> None:
    """A mode `to_rgb` converts, and a shape `preprocess` can scale and crop."""
    if image.mode not in ACCEPTED_MODES:
        raise InputError(f"{name}: unsupported image mode {image.mode!r}; expected an 8-bit RGB, RGBA, grayscale or palette image")
    w, h = image.size
    if not (w and h):  # e.g. an empty crop: there is no shortest side to scale
        raise InputError(f"{name}: a {w}x{h} image has no pixels")
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise InputError(f"{name}: a {w}x{h} image is too elongated (at most {MAX_ASPECT_RATIO}:1): crop it first")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, blending any transparency onto white (Meta's rule); for a mode `check_image` accepts."""
    if image.mode == "RGB":
        return image
    rgba = np.asarray(image.convert("RGBA"))
    if not (rgba[:, :, 3] < 255).any():
        return image.convert("RGB")
    out = np.empty((image.height, image.width, 3), np.uint8)
    rows = max(1, BLEND_BLOCK_PIXELS // image.width)
    for y in range(0, image.height, rows):  # in blocks: float64 of a whole 100 MP image is GBs
        block = rgba[y : y + rows]
        alpha = block[:, :, 3:4] / 255.0
        out[y : y + rows] = (1 - alpha) * 255 + alpha * block[:, :, :3]  # truncated to uint8, as Meta's astype
    return Image.fromarray(out, "RGB")


def centre_square(image: Image.Image, side: int) -> Image.Image:
    """The `side` x `side` square at the image's centre (what `preprocess` keeps once it has scaled)."""
    x0, y0 = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((x0, y0, x0 + side, y0 + side))


def preprocess(image: Image.Image, resolution: int = 512) -> torch.Tensor:
    """Meta's input pipeline: RGB on white, shortest side to `resolution` (LANCZOS), centre crop, x/255*2-1."""
    check_image(image, getattr(image, "filename", "") or "image")
    image = to_rgb(image)
    scale = resolution / min(image.size)
    image = image.resize((round(scale * image.size[0]), round(scale * image.size[1])), Image.LANCZOS)
    image = centre_square(image, resolution)
    arr = np.asarray(image, dtype=np.float64) / 255.0 * 2 - 1
    return torch.from_numpy(arr).permute(2, 0, 1).float().unsqueeze(0)


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL RGB (truncating to uint8, as Meta's code does)."""
    arr = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    return Image.fromarray((arr * 255).astype(np.uint8), "RGB")
