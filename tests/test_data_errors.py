"""Data errors say what to fix: the unreadable image's path, the config key of a missing field, and
the number of records skipped reaches the run's output."""
import pytest

from tests.test_data import png_bytes, write_jsonl
from tests.trainer_utils import tiny_config
from vaopd.data import DataError, load_records
from vaopd.train import train


def test_unreadable_image_names_its_path_and_inline_bytes_say_so(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "corrupt.png").write_bytes(b"not an image at all")
    write_jsonl(tmp_path / "d.jsonl", [{"problem": "q", "answer": "1", "images": ["img/corrupt.png"]}])
    with pytest.raises(DataError) as e:
        load_records(tmp_path / "d.jsonl")
    assert f"cannot decode the image {tmp_path / 'img' / 'corrupt.png'} (19 bytes): not a readable image" in str(e.value)
    assert "BytesIO" not in str(e.value)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"images": [[{"bytes": b"garbage", "path": None}]], "problem": ["q"], "answer": ["1"]}),
                   tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"cannot decode the image inline bytes \(7 bytes\): not a readable image"):
        load_records(tmp_path / "d.parquet")


@pytest.mark.parametrize("missing, setting", [("problem", "data.question_key"), ("answer", "data.answer_key"),
                                              ("images", "data.image_key")])
def test_missing_field_names_the_setting_that_maps_it(tmp_path, missing, setting):
    (tmp_path / "a.png").write_bytes(png_bytes())
    row = {"problem": "q", "answer": "1", "images": ["a.png"]}
    del row[missing]
    write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(DataError, match=rf"missing field '{missing}' \(its fields: .*; set {setting} to the name"):
        load_records(tmp_path / "d.jsonl")


def test_skipped_records_are_reported_in_the_run_output(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    rows = [{"problem": f"How many? {i}", "answer": "1", "images": ["a.png"]} for i in range(2)]
    rows.insert(1, {"problem": "q", "answer": "1", "images": ["bad.png"]})
    write_jsonl(tmp_path / "d.jsonl", rows)
    train(tiny_config(tmp_path, f"data.train={tmp_path / 'd.jsonl'}", "data.skip_bad_records=true", "train.max_steps=1"))
    assert f"data.skip_bad_records: skipped 1 bad record(s) of {tmp_path / 'd.jsonl'}" in capsys.readouterr().out
