"""Image ablations that remove fine detail but keep the image's size and mode.

Size-preserving matters: the Qwen-VL image processor then gives the ablated image the same grid
and number of image tokens as the clean one, so both teacher views share input ids and positions
and run as one doubled batch. The random ablations (noise, patch mask) take an explicit seed so a
run is reproducible and resumable.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageFilter

__all__ = ["ABLATIONS", "ablate"]

ABLATIONS = ("pixelate", "blur", "noise", "patch_mask")


def _pixelate(image: Image.Image, factor: float) -> Image.Image:
    # SPEC: bilinear down to max(1, floor(factor * side)), nearest back up.
    w, h = image.size
    small = image.resize((max(1, math.floor(factor * w)), max(1, math.floor(factor * h))), Image.BILINEAR)
    return small.resize((w, h), Image.NEAREST)


def _noise(image: Image.Image, std: float, seed: int) -> Image.Image:
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    noisy = rgb + np.random.default_rng(seed).normal(0.0, std, size=rgb.shape)
    out = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
    return out.convert(image.mode)


def _patch_mask(image: Image.Image, patch: int, fraction: float, seed: int) -> Image.Image:
    arr = np.array(image.convert("RGB"))
    rows, cols = math.ceil(arr.shape[0] / patch), math.ceil(arr.shape[1] / patch)
    n = rows * cols
    chosen = np.random.default_rng(seed).permutation(n)[: max(1, round(fraction * n))]
    for i in chosen:
        r, c = divmod(int(i), cols)
        arr[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = 0
    return Image.fromarray(arr, "RGB").convert(image.mode)


def ablate(
    image: Image.Image,
    kind: str = "pixelate",
    *,
    seed: int = 0,
    pixelate_factor: float = 0.1,
    blur_radius: float = 4.0,
    noise_std: float = 64.0,
    patch_size: int = 16,
    patch_fraction: float = 0.5,
) -> Image.Image:
    """Return an ablated copy of ``image`` with the same size and mode.

    Args:
        image: a PIL image.
        kind: "pixelate" (default), "blur" (Gaussian, ``blur_radius`` px), "noise" (Gaussian,
            ``noise_std`` in 0..255 units) or "patch_mask" (blacken ``patch_fraction`` of the
            ``patch_size`` squares).
        seed: seeds the random ablations (noise, patch_mask).
    """
    if kind == "pixelate":
        out = _pixelate(image, pixelate_factor)
    elif kind == "blur":
        out = image.filter(ImageFilter.GaussianBlur(blur_radius))
    elif kind == "noise":
        out = _noise(image, noise_std, seed)
    elif kind == "patch_mask":
        out = _patch_mask(image, patch_size, patch_fraction, seed)
    else:
        raise ValueError(f"unknown ablation {kind!r}: choose one of {ABLATIONS}")
    assert out.size == image.size and out.mode == image.mode
    return out
