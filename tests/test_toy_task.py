"""The toy task: deterministic splits the trainer loads, and pixelation that destroys exactly the detail."""
import json

import numpy as np

from vaopd.ablate import ablate
from vaopd.data import load_records
from vaopd.eval import grade
from vaopd.toy.task import BACKGROUND, COLORS, generate, write_splits


def _digit_probe_accuracy(examples, pixelate: bool) -> float:
    """Held-out accuracy of a ridge probe reading the left digit from the pixels around its patch."""
    labels = np.array([int(e.response.split("are ")[1][0]) for e in examples])
    images = [ablate(e.image) if pixelate else e.image for e in examples]
    X = np.stack([np.asarray(im.convert("L"), dtype=np.float32)[8:40, 8:40].ravel() / 255 for im in images])
    X = np.c_[X, np.ones(len(X))]
    n = int(0.8 * len(X))
    W = np.linalg.solve(X[:n].T @ X[:n] + np.eye(X.shape[1]), X[:n].T @ np.eye(10)[labels[:n]])
    return float((np.argmax(X[n:] @ W, 1) == labels[n:]).mean())


def _quadrant_colours(image) -> list[int]:
    """Nearest palette entry (0 = background) at each quadrant's centre."""
    palette = np.array([BACKGROUND, *COLORS.values()], dtype=np.float32)
    a = np.asarray(image, dtype=np.float32)
    return [int(np.argmin(((palette - a[r * 32 + 16, c * 32 + 16]) ** 2).sum(1))) for r in range(2) for c in range(2)]


def test_splits_are_deterministic_and_load_in_the_trainer(tmp_path):
    sizes = {"train": 12, "val": 4, "test": 6}
    a = write_splits(tmp_path / "a", seed=3, sizes=sizes)
    b = write_splits(tmp_path / "b", seed=3, sizes=sizes)
    c = write_splits(tmp_path / "c", seed=4, sizes=sizes)
    for split in sizes:
        assert a[split].read_text() == b[split].read_text()
        rows = [json.loads(line) for line in a[split].read_text().splitlines()]
        assert len(rows) == sizes[split]
        for row in rows:
            assert (tmp_path / "a" / row["images"][0]).read_bytes() == (tmp_path / "b" / row["images"][0]).read_bytes()
            assert grade(row["response"], row["answer"]), row
        ds = load_records(a[split], id_key="id")
        assert [r.id for r in ds.records] == [r["id"] for r in rows]
        assert all(r.image.size == (64, 64) for r in ds.records)
    assert a["train"].read_text() != c["train"].read_text()
    kinds = [json.loads(line)["kind"] for line in a["train"].read_text().splitlines()]
    assert set(kinds) == {"detail", "coarse"}


def test_detail_answers_follow_the_digits_drawn():
    for e in generate(40, 0, "check"):
        if e.kind == "detail":
            a, b = (int(x) for x in e.response.split("are ")[1].split(".")[0].split(" and "))
            assert a != b and e.answer == str(max(a, b))


def test_pixelation_destroys_the_digits_but_not_the_squares():
    examples = generate(1200, 0, "probe")
    digits = [e for e in examples if e.kind == "detail"]
    clean, pixelated = _digit_probe_accuracy(digits, False), _digit_probe_accuracy(digits, True)
    # Chance is 0.1. A linear probe trained on each view: clean digits are read, pixelated ones mostly not.
    assert clean > 0.75, clean
    assert pixelated < 0.5 and clean - pixelated > 0.35, (clean, pixelated)
    squares = [e for e in examples if e.kind == "coarse"][:150]
    for e in squares:
        assert _quadrant_colours(ablate(e.image)) == _quadrant_colours(e.image)


def test_scaffold_template_keeps_the_content_and_the_reading_sentence():
    from vaopd.tiny import build_tokenizer
    from vaopd.toy.digits import reading_positions

    tokenizer = build_tokenizer()
    short, scaffold = generate(60, 0, "check"), generate(60, 0, "check", template="scaffold")
    lengths = {"short": [], "scaffold": []}
    for s, e in zip(short, scaffold):
        assert (s.kind, s.question, s.answer) == (e.kind, e.question, e.answer)
        assert s.image.tobytes() == e.image.tobytes()
        assert grade(e.response, e.answer), e.response
        for name, ex in (("short", s), ("scaffold", e)):
            ids = tokenizer(ex.response, add_special_tokens=False)["input_ids"]
            lengths[name].append(len(ids))
            if ex.kind == "detail":
                # The digits read are found at the same reading positions under either template.
                tokens = [tokenizer.decode([i]) for i in ids]
                truth = ex.response.split(" are ")[1].split(".")[0].split(" and ")
                assert [tokens[p].strip() for p in reading_positions(tokens)] == truth
    # The scaffold makes the responses about twice as long: tens of tokens around two readings.
    assert max(lengths["short"]) <= 26 and 30 <= min(lengths["scaffold"]) and max(lengths["scaffold"]) <= 60
    assert sum(lengths["scaffold"]) > 1.7 * sum(lengths["short"])
    assert len({e.response.split(" The digits")[0] for e in scaffold if e.kind == "detail"}) > 1  # phrasing varies
