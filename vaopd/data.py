"""Image + question + answer records: local JSONL/parquet files or the tiny generated data set.

File records follow Geometry3K (``images`` a list of ``{"bytes", "path"}``, ``problem``,
``answer``) or ViRL39K (``image`` a list of paths, ``question``, ``answer``); the keys are
configurable. An image may be a path (relative to ``image_root`` or the data file's folder), raw
bytes, a ``{"bytes", "path"}`` dict, or a one-element list of those. Every image is decoded at
load time, so a missing, corrupt or unusable image (an aspect ratio over ``MAX_ASPECT_RATIO``)
fails before training starts and before the run folder is touched, with an error naming the record
(or, with ``skip_bad_records``, the record is skipped and counted). A data file that is not UTF-8
or not valid JSON is named with its line.

The order of prompts is a pure function of the seed and the position: epoch ``e`` is a seeded
permutation of the records, and the prompts of optimizer step ``s`` are positions
``[s * P, (s + 1) * P)`` of the concatenated epochs. Resuming needs only the step.
"""
from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

__all__ = ["DataError", "Record", "Dataset", "MAX_ASPECT_RATIO", "load_records", "load_dataset", "tiny_records",
           "step_indices"]

# The widest image a vision-language image processor accepts (longest side over shortest): the
# Qwen-VL processors raise beyond it, in the middle of a run, so such an image is refused at load.
MAX_ASPECT_RATIO = 200


class DataError(ValueError):
    """A bad data file or record; the message names the record."""


@dataclass
class Record:
    """One prompt: ``image`` is a decoded RGB PIL image."""

    id: str
    image: Image.Image
    question: str
    answer: str


@dataclass
class Dataset:
    records: list[Record]
    skipped: int = 0  # bad records left out (skip_bad_records)
    source: str = ""

    def __len__(self) -> int:
        return len(self.records)


_COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


def tiny_records(n: int, seed: int) -> list[Record]:
    """``n`` generated counting problems: 64x64 images with 1 to 5 coloured squares."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        count = rng.randint(1, 5)
        color = rng.choice(sorted(_COLORS))
        image = Image.new("RGB", (64, 64), (250, 250, 250))
        draw = ImageDraw.Draw(image)
        cells = rng.sample(range(16), count)  # a 4x4 grid of 16-pixel cells, one square per cell
        for cell in cells:
            r, c = divmod(cell, 4)
            x, y = c * 16 + rng.randint(1, 4), r * 16 + rng.randint(1, 4)
            draw.rectangle([x, y, x + 10, y + 10], fill=_COLORS[color])
        question = f"How many {color} squares are in the image?"
        records.append(Record(id=f"tiny-{seed}-{i}", image=image, question=question, answer=str(count)))
    return records


def _image_bytes(value, base: Path) -> tuple[bytes, str]:
    """The encoded bytes of an image field value (path, bytes, dict or one-element list) and where
    they came from (the file's path, or "inline bytes"), for error messages."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"expected exactly one image, got {len(value)}")
        value = value[0]
    if isinstance(value, dict):
        if value.get("bytes"):
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise ValueError("image dict has neither 'bytes' nor 'path'")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), "inline bytes"
    if isinstance(value, str):
        path = Path(value)
        if not path.is_absolute():
            path = base / path
        if not path.is_file():
            raise ValueError(f"image file not found: {path}")
        return path.read_bytes(), str(path)
    raise ValueError(f"unsupported image value of type {type(value).__name__}")


def _decode(data: bytes, where: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            image = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        # PIL's own message names an anonymous BytesIO; say which image it was.
        reason = "not a readable image" if isinstance(e, Image.UnidentifiedImageError) else f"{type(e).__name__}: {e}"
        raise ValueError(f"cannot decode the image {where} ({len(data)} bytes): {reason}") from None
    width, height = image.size
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ValueError(f"the image {where} is {width}x{height}, an aspect ratio over {MAX_ASPECT_RATIO} that "
                         "vision-language image processors refuse; crop or pad it")
    return image


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise DataError(f"{path}: line {line} is not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as "
                            "UTF-8") from None
        if suffix == ".json":
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e}); a cut-short file must be written again") from None
            if not isinstance(rows, list):
                raise DataError(f"{path}: a .json data file must hold a list of records")
            return rows
        rows = []
        for n, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {n + 1} is not valid JSON ({e})") from None
        return rows
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install 'vaopd[parquet]')") from None
        try:
            return pq.read_table(path).to_pylist()
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
    raise DataError(f"{path}: unsupported data file type {suffix!r} (use .jsonl, .json or .parquet)")


def load_records(
    path: str | Path,
    *,
    question_key: str = "problem",
    answer_key: str = "answer",
    image_key: str = "images",
    id_key: str = "",
    image_root: str = "",
    skip_bad_records: bool = False,
) -> Dataset:
    """Load and decode every record of a JSONL/JSON/parquet file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    base = Path(image_root) if image_root else path.parent
    records, skipped = [], 0
    for n, row in enumerate(_read_rows(path)):
        rid = str(row.get(id_key, n)) if (id_key and isinstance(row, dict)) else str(n)
        try:
            if not isinstance(row, dict):
                raise ValueError("record is not a mapping")
            for key, setting in ((question_key, "question_key"), (answer_key, "answer_key"), (image_key, "image_key")):
                if row.get(key) is None:
                    raise ValueError(f"missing field {key!r} (its fields: {', '.join(map(repr, row)) or 'none'}; "
                                     f"set data.{setting} to the name this file uses)")
            image = _decode(*_image_bytes(row[image_key], base))
            # Geometry3K/ViRL put an <image> tag in the text; the chat template places the image.
            question = str(row[question_key]).replace("<image>", "").strip()
            records.append(Record(id=rid, image=image, question=question, answer=str(row[answer_key]).strip()))
        except (ValueError, OSError) as e:
            if not skip_bad_records:
                raise DataError(f"{path}: bad record {rid} (row {n}): {e} (set data.skip_bad_records=true to skip such records)") from None
            skipped += 1
    if not records:
        raise DataError(f"{path}: no usable records ({skipped} skipped)")
    return Dataset(records=records, skipped=skipped, source=str(path))


def step_indices(step: int, prompts_per_step: int, num_records: int, seed: int) -> list[int]:
    """Record indices of optimizer step ``step`` (0-based): positions of seeded epoch permutations."""
    out = []
    for pos in range(step * prompts_per_step, (step + 1) * prompts_per_step):
        epoch, offset = divmod(pos, num_records)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out.append(int(torch.randperm(num_records, generator=g)[offset]))
    return out


def load_dataset(cfg, source: str, split_seed: int) -> Dataset:
    """The records of a ``vaopd.config.Config``'s data ``source``: "tiny" (generated;
    ``split_seed`` tells train 0 from validation 1) or a JSONL/parquet file."""
    if source == "tiny":
        size = cfg.data.tiny_train_size if split_seed == 0 else cfg.data.tiny_val_size
        return Dataset(records=tiny_records(size, seed=2 * cfg.train.seed + split_seed), source="tiny")
    return load_records(source, question_key=cfg.data.question_key, answer_key=cfg.data.answer_key,
                        image_key=cfg.data.image_key, id_key=cfg.data.id_key, image_root=cfg.data.image_root,
                        skip_bad_records=cfg.data.skip_bad_records)
