"""Real, distinct images rendered from a prompt: a colour from the prompt's hash and the prompt's words."""

from __future__ import annotations

import hashlib
import io
import textwrap

from PIL import Image, ImageDraw, ImageFont

from imagegen.models import ImageType

# Pillow's name for each format.
PIL_FORMAT = {ImageType.PNG: "PNG", ImageType.JPEG: "JPEG", ImageType.WEBP: "WEBP"}


# The formats of one generation, by position: the real API mixes them too.
FORMAT_CYCLE = (ImageType.PNG, ImageType.JPEG, ImageType.WEBP, ImageType.PNG)


def render_image(prompt: str, index: int, fmt: ImageType, size: int | tuple[int, int] = 256, salt: str = "") -> bytes:
    """An image that differs per prompt, position and salt, with the prompt written on it; `size` is the side
    of a square or (width, height)."""
    width, height = (size, size) if isinstance(size, int) else size
    side = min(width, height)
    digest = hashlib.sha256(f"{salt}|{index}|{prompt}".encode()).digest()
    background = (digest[0], digest[1], digest[2])
    foreground = tuple(255 - c for c in background)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    accent = (digest[3], digest[4], digest[5])
    inset = side // 8 + digest[6] % (side // 8)
    draw.ellipse((inset, inset, width - inset, height - inset), outline=accent, width=max(2, side // 64))
    font = ImageFont.load_default(size=max(10, side // 18))
    text = "\n".join(textwrap.wrap(prompt[:200], width=24)[:8]) or "(empty prompt)"
    draw.multiline_text((side // 16, side // 16), f"#{index + 1}\n{text}", fill=foreground, font=font)
    out = io.BytesIO()
    image.save(out, format=PIL_FORMAT[fmt], **({"quality": 85} if fmt is not ImageType.PNG else {}))
    return out.getvalue()
