"""Data files (JSONL, parquet; Geometry3K and ViRL39K layouts), bad records, order, ablations."""
import math

import numpy as np
import pytest
from PIL import Image

from trainer_utils import png_bytes, write_jsonl
from vaopd.ablate import ABLATIONS, ablate
from vaopd.data import DataError, load_records, step_indices, tiny_records


def test_virl_style_jsonl_with_relative_paths(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png_bytes())
    write_jsonl(tmp_path / "d.jsonl", [{"qid": "q1", "question": "<image>What is x?", "answer": "\\boxed{3}", "image": ["images/a.png"]}])
    ds = load_records(tmp_path / "d.jsonl", question_key="question", image_key="image", id_key="qid")
    (r,) = ds.records
    assert (r.id, r.question, r.answer, r.image.size, r.image.mode) == ("q1", "What is x?", "\\boxed{3}", (40, 30), "RGB")


def test_geometry3k_style_parquet_with_embedded_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "images": [[{"bytes": png_bytes((1, 2, 3)), "path": None}], [{"bytes": png_bytes((9, 9, 9)), "path": None}]],
        "problem": ["<image>Find y.", "<image>Find z."],
        "answer": ["12", "5"],
    })
    pq.write_table(table, tmp_path / "g.parquet")
    ds = load_records(tmp_path / "g.parquet")
    assert [r.question for r in ds.records] == ["Find y.", "Find z."]
    assert [r.answer for r in ds.records] == ["12", "5"]
    assert ds.records[1].image.getpixel((0, 0)) == (9, 9, 9)


def test_bad_records_name_the_record_or_are_skipped_and_counted(tmp_path):
    (tmp_path / "ok.png").write_bytes(png_bytes())
    (tmp_path / "corrupt.png").write_bytes(b"not an image at all")
    rows = [
        {"id": "good", "problem": "q", "answer": "1", "images": ["ok.png"]},
        {"id": "broken", "problem": "q", "answer": "1", "images": ["corrupt.png"]},
        {"id": "gone", "problem": "q", "answer": "1", "images": ["missing.png"]},
        {"id": "noanswer", "problem": "q", "images": ["ok.png"]},
    ]
    write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"bad record broken \(row 1\)"):
        load_records(tmp_path / "d.jsonl", id_key="id")
    write_jsonl(tmp_path / "e.jsonl", rows[2:3])
    with pytest.raises(DataError, match=r"bad record gone .*not found"):
        load_records(tmp_path / "e.jsonl", id_key="id")
    ds = load_records(tmp_path / "d.jsonl", id_key="id", skip_bad_records=True)
    assert [r.id for r in ds.records] == ["good"] and ds.skipped == 3


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported data file type"):
        load_records(tmp_path / "d.csv")
    (tmp_path / "d.jsonl").write_text('{"problem": 1}\n{oops\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_records(tmp_path / "d.jsonl")


def test_step_order_is_a_seeded_permutation_per_epoch():
    n, p = 10, 4
    order = [i for s in range(5) for i in step_indices(s, p, n, seed=3)]  # 20 positions = 2 epochs
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:]) == list(range(10))
    assert order[:10] != order[10:]  # each epoch has its own permutation
    assert step_indices(3, p, n, seed=3) == order[12:16]  # a pure function of (step, seed)
    assert step_indices(0, p, n, seed=4) != step_indices(0, p, n, seed=3)


def test_tiny_records_are_deterministic():
    a, b = tiny_records(3, seed=5), tiny_records(3, seed=5)
    assert [(r.question, r.answer) for r in a] == [(r.question, r.answer) for r in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ABLATIONS)
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_ablations_keep_size_and_mode_and_remove_detail(kind, mode):
    image = tiny_records(1, seed=0)[0].image.convert(mode)
    out = ablate(image, kind, seed=1)
    assert out.size == image.size and out.mode == image.mode
    assert not np.array_equal(np.asarray(out), np.asarray(image))
    if kind in ("noise", "patch_mask"):
        assert np.array_equal(np.asarray(out), np.asarray(ablate(image, kind, seed=1)))  # seeded


def test_pixelate_follows_the_spec():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 48, 3), dtype=np.uint8))
    out = ablate(image, "pixelate", pixelate_factor=0.1)
    small = image.resize((math.floor(0.1 * 48), math.floor(0.1 * 64)), Image.BILINEAR)
    assert np.array_equal(np.asarray(out), np.asarray(small.resize((48, 64), Image.NEAREST)))
    assert ablate(Image.new("RGB", (5, 5)), "pixelate").size == (5, 5)  # sides below 10 px: 1 px
