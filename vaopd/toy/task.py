"""The toy task: questions whose answers need fine visual detail, mixed with ones that do not.

Every image is 64 x 64 (one Qwen-VL grid of 4 x 4 patches of 16 px). Two kinds of question:

- ``detail``: two seven-segment digits (8 x 12 px, strokes 2 px), each jittered inside one 16 px
  patch, in a grey that gives every digit about the same total ink. "Which digit is larger?"
  Pixelation at 10 % (64 -> 6 px per side, blocks of ~11 px) turns each digit into a few grey
  blocks: a linear probe trained on pixelated digits reads under 40 % of them (chance 10 %),
  against about 85 % clean (``tests/test_toy_task.py``).
- ``coarse``: one to four large squares (20-24 px) in the quadrants, each red, green, blue or
  yellow. "How many squares are there?" or "How many <colour> squares are there?" Pixelation
  keeps a block of solid colour inside every square, so these survive it.

Each answer is a worked response: a few vision-critical tokens (the digits read, the count seen)
inside language scaffolding, ending in ``\\boxed{N}`` so ``vaopd.eval.grade`` scores it. Two
templates (``TEMPLATES``): ``short``, one sentence around the readings (~20-27 tokens), and
``scaffold``, a reasoning scaffold of a few sentences (30-57 tokens, phrasing drawn from a few
variants) around the same readings, so the visually grounded tokens are a small part of the response
(the paper's regime). Both keep the reading sentence "The digits are A and B." verbatim, and the
phrasing is drawn from its own random stream, so the images, questions and answers of a split are
the same under either template.

Splits are JSONL files in the layout ``vaopd.data.load_records`` reads with its default keys
(``problem``, ``answer``, ``images`` as a path relative to the file), plus ``id``, ``kind`` and
``response`` (the SFT target). Everything is a pure function of the seed.

``python -m vaopd.toy.task --out DIR [--seed S] [--train N --val N --test N] [--template T] [--sheet PNG]`` writes the splits
(and a picture of a few examples above their pixelated copies).
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

__all__ = ["SIZE", "COLORS", "TEMPLATES", "Example", "render_digits", "render_squares", "make_example", "generate", "write_splits",
           "example_sheet"]

SIZE = 64
# The image processor's mean colour: a background that normalises to ~0, so the patch features
# carry the drawing rather than a large constant that would swamp a small digit.
BACKGROUND = (123, 117, 104)
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 30)}

# Seven-segment layout: segment -> which digits light it (a top, b top-right, c bottom-right,
# d bottom, e bottom-left, f top-left, g middle).
_SEGMENTS = {
    "a": "02356789", "b": "01234789", "c": "013456789", "d": "0235689",
    "e": "0268", "f": "045689", "g": "2345689",
}
_DIGIT_W, _DIGIT_H, _STROKE = 8, 12, 2
# Total darkness of a digit (sum over its segments of background - grey), before a +-20 % jitter.
_INK = 300
_GREY = 115


def _segment_boxes(x: int, y: int) -> dict[str, tuple[int, int, int, int]]:
    """Pixel rectangles (inclusive) of the seven segments of a digit whose top-left is (x, y)."""
    w, h, s = _DIGIT_W, _DIGIT_H, _STROKE
    mid = y + (h - s) // 2
    return {
        "a": (x, y, x + w - 1, y + s - 1),
        "g": (x, mid, x + w - 1, mid + s - 1),
        "d": (x, y + h - s, x + w - 1, y + h - 1),
        "f": (x, y, x + s - 1, mid + s - 1),
        "b": (x + w - s, y, x + w - 1, mid + s - 1),
        "e": (x, mid, x + s - 1, y + h - 1),
        "c": (x + w - s, mid, x + w - 1, y + h - 1),
    }


def draw_digit(draw: ImageDraw.ImageDraw, digit: int, x: int, y: int, ink: tuple[int, int, int]) -> None:
    for name, box in _segment_boxes(x, y).items():
        if str(digit) in _SEGMENTS[name]:
            draw.rectangle(box, fill=ink)


def digit_grey(digit: int, rng: random.Random) -> int:
    """A grey level that gives every digit about the same total ink.

    Without this, a pixelated digit's darkness would still tell its segment count (a 1 has two
    segments, an 8 seven), so pixelation would not destroy the detail as intended.
    """
    segments = sum(str(digit) in lit for lit in _SEGMENTS.values())
    return max(0, int(_GREY - _INK / segments * rng.uniform(0.8, 1.2)))


def render_digits(digits: tuple[int, int], rng: random.Random) -> Image.Image:
    """Two digits in the patches at grid (row 1, col 1) and (row 1, col 2), jittered inside them."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for col, digit in zip((1, 2), digits):
        grey = digit_grey(digit, rng)
        x = col * 16 + rng.randint(1, 16 - _DIGIT_W - 1)
        y = 16 + rng.randint(1, 16 - _DIGIT_H - 1)
        draw_digit(draw, digit, x, y, (grey, grey, grey))
    return image


def render_squares(colors: list[str | None], rng: random.Random) -> Image.Image:
    """Large squares in the four quadrants (``colors[q]`` or None for an empty quadrant)."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for q, color in enumerate(colors):
        if color is None:
            continue
        side = rng.randint(20, 24)
        r, c = divmod(q, 2)
        x = c * 32 + rng.randint(2, 30 - side)
        y = r * 32 + rng.randint(2, 30 - side)
        draw.rectangle([x, y, x + side - 1, y + side - 1], fill=COLORS[color])
    return image


@dataclass
class Example:
    kind: str  # "detail" or "coarse"
    image: Image.Image
    question: str
    response: str  # worked SFT target ending in \boxed{answer}
    answer: str


TEMPLATES = ("short", "scaffold")
# Scaffold phrasings, mostly words the tiny tokenizer has whole tokens for (vaopd.tiny's corpus);
# the rest spell out in a few byte tokens each. No phrase before the reading contains " are", so
# the first " are" of a detail response is the one before the digits (vaopd.toy.digits relies on it).
_DETAIL_OPENINGS = ("I count the shapes one by one in the image.", "I see two shapes in the image.",
                    "Think step by step and look at the image.")
_DETAIL_CLOSINGS = (" Think step by step: {big} is larger than {small}, so the answer is \\boxed{{{big}}}.",
                    " So the answer is the larger one, \\boxed{{{big}}}.")
_COARSE_OPENINGS = ("I count the squares one by one in the image.", "I see the image and count the squares.")
_COARSE_CLOSINGS = (" So the answer is \\boxed{{{n}}}.", " Think step by step: the answer is the number, \\boxed{{{n}}}.")


def _detail(rng: random.Random, phrasing: random.Random | None) -> Example:
    a, b = rng.sample(range(10), 2)
    reading = f"The digits are {a} and {b}."
    if phrasing is None:
        response = f"{reading} The larger is \\boxed{{{max(a, b)}}}."
    else:
        closing = phrasing.choice(_DETAIL_CLOSINGS).format(big=max(a, b), small=min(a, b))
        response = f"{phrasing.choice(_DETAIL_OPENINGS)} {reading}{closing}"
    return Example(kind="detail", image=render_digits((a, b), rng),
                   question="The image shows two digits. Which digit is larger?", response=response,
                   answer=str(max(a, b)))


def _coarse(rng: random.Random, phrasing: random.Random | None) -> Example:
    count = rng.randint(1, 4)
    quadrants = rng.sample(range(4), count)
    colors: list[str | None] = [None] * 4
    for q in quadrants:
        colors[q] = rng.choice(sorted(COLORS))
    image = render_squares(colors, rng)
    if rng.random() < 0.5:
        question, seen, n = "How many squares are there?", f"I see {count} squares.", count
    else:
        color = rng.choice(sorted(COLORS))
        n = colors.count(color)
        question, seen = f"How many {color} squares are there?", f"I see {count} squares and {n} are {color}."
    if phrasing is None:
        response = f"{seen} The answer is \\boxed{{{n}}}."
    else:
        response = f"{phrasing.choice(_COARSE_OPENINGS)} {seen}{phrasing.choice(_COARSE_CLOSINGS).format(n=n)}"
    return Example("coarse", image, question, response, str(n))


def make_example(rng: random.Random, detail_fraction: float = 0.5, phrasing: random.Random | None = None) -> Example:
    """One example; a ``detail`` question with probability ``detail_fraction``.

    ``phrasing``: None for the ``short`` template, else the random stream that picks the
    ``scaffold`` template's phrasing (separate from ``rng``, so the content does not depend on it).
    """
    return _detail(rng, phrasing) if rng.random() < detail_fraction else _coarse(rng, phrasing)


def generate(n: int, seed: int, split: str, detail_fraction: float = 0.5, template: str = "short") -> list[Example]:
    """``n`` examples of ``split``; a pure function of its arguments (string-seeded RNG)."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    rng = random.Random(f"vaopd-toy/{seed}/{split}")
    phrasing = random.Random(f"vaopd-toy/{seed}/{split}/phrasing") if template == "scaffold" else None
    return [make_example(rng, detail_fraction, phrasing) for _ in range(n)]


def write_splits(out: str | Path, seed: int = 0, sizes: dict[str, int] | None = None,
                 detail_fraction: float = 0.5, template: str = "short") -> dict[str, Path]:
    """Write ``<out>/<split>.jsonl`` and ``<out>/images/<split>/*.png``; returns split -> file."""
    out = Path(out)
    sizes = sizes or {"train": 2000, "val": 64, "test": 200}
    files = {}
    for split, n in sizes.items():
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for i, ex in enumerate(generate(n, seed, split, detail_fraction, template)):
            rid = f"{split}-{i:05d}"
            rel = f"images/{split}/{rid}.png"
            ex.image.save(out / rel, format="PNG")
            lines.append(json.dumps({"id": rid, "kind": ex.kind, "problem": ex.question, "answer": ex.answer,
                                     "response": ex.response, "images": [rel]}))
        path = out / f"{split}.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        files[split] = path
    return files


def example_sheet(n: int = 6, seed: int = 0, scale: int = 3) -> Image.Image:
    """The first ``n`` examples of a split (top row) above their pixelated copies (bottom row)."""
    from vaopd.ablate import ablate

    examples = generate(n, seed, "sheet")
    side = SIZE * scale
    sheet = Image.new("RGB", (n * (side + 4), 2 * (side + 4)), (255, 255, 255))
    for i, ex in enumerate(examples):
        for row, image in enumerate((ex.image, ablate(ex.image))):
            sheet.paste(image.resize((side, side), Image.NEAREST), (i * (side + 4), row * (side + 4)))
    return sheet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vaopd.toy.task", description="Write the toy task's splits.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=64)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--template", choices=TEMPLATES, default="short", help="answer template (see the module doc)")
    parser.add_argument("--sheet", default=None, metavar="PNG", help="also save clean/pixelated examples side by side")
    args = parser.parse_args(argv)
    if args.sheet:
        example_sheet(seed=args.seed).save(args.sheet)
    files = write_splits(args.out, args.seed, {"train": args.train, "val": args.val, "test": args.test},
                         template=args.template)
    for split, path in files.items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
