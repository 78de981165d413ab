"""One HTML page showing a generation: the prompt and the output, text and images."""

from __future__ import annotations

from pathlib import Path

import jinja2
from PIL import Image

from chameleon.vqgan import centre_square, to_rgb

TEMPLATES = Path(__file__).parent / "templates"
_env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=jinja2.select_autoescape(["html", "j2"]))


def _as_model_reads(image: Image.Image) -> Image.Image:
    """RGB on white (PNG cannot hold CMYK) and the centre square: the part the model reads (see
    chameleon.vqgan.preprocess), so that a panorama's page does not show what the model never saw."""
    return centre_square(to_rgb(image), min(image.size))


def _segments(segments, out_dir: Path, prefix: str) -> list[dict]:
    rendered, n_images = [], 0
    for seg in segments:
        if isinstance(seg, Image.Image):
            n_images += 1
            name = f"{prefix}_image_{n_images}.png"
            _as_model_reads(seg).save(out_dir / name)
            rendered.append({"kind": "image", "src": name, "number": n_images})  # counted among images only
        else:
            rendered.append({"kind": "text", "text": seg})
    return rendered


def write_generation_page(out_dir: Path, prompt: list, output: list, mode: str, meta: dict, settings: dict | None = None,
                          title: str = "Chameleon generation") -> Path:
    """Write PNGs and index.html into out_dir; return the page's path. `meta`: what the run was
    (model, speed, ...); `settings`: the sampling settings that made the output."""
    out_dir.mkdir(parents=True, exist_ok=True)
    html = _env.get_template("generation.html.j2").render(
        title=title,
        prompt=_segments(prompt, out_dir, "prompt"),
        output=_segments(output, out_dir, "output"),
        mode=mode,
        meta=meta,
        settings=settings or {},
    )
    page = out_dir / "index.html"
    page.write_text(html, encoding="utf-8")  # as its <meta charset> says, whatever the locale
    return page
