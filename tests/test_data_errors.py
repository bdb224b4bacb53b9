"""Data errors say what to fix: the unreadable or unusable image's path, the config key of a
missing field, the line of a non-UTF-8 or cut-short file, and the number of records skipped
reaches the run's output."""
import json

import pytest

from trainer_utils import png_bytes, tiny_cli, tiny_config, write_jsonl
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


def test_an_image_no_processor_takes_is_refused_at_load_naming_the_record_or_skipped(tmp_path, capsys):
    from vaopd.train import main

    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "line.png").write_bytes(png_bytes(size=(400, 1)))  # 1x400: aspect ratio 400
    rows = [{"problem": f"How many? {i}", "answer": "1", "images": ["a.png"]} for i in range(8)]
    rows[5]["images"] = ["line.png"]  # a record the run would reach only mid-run
    write_jsonl(tmp_path / "d.jsonl", rows)
    args = tiny_cli(tmp_path, f"data.train={tmp_path / 'd.jsonl'}", "train.max_steps=3")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {tmp_path / 'd.jsonl'}: bad record 5 (row 5): the image {tmp_path / 'line.png'} is 400x1, "
                   "an aspect ratio over 200 that vision-language image processors refuse; crop or pad it (set "
                   "data.skip_bad_records=true to skip such records)\n")
    assert not (tmp_path / "run").exists()  # nothing to --overwrite afterwards
    assert main([*args, "--set", "data.skip_bad_records=true"]) == 0
    assert f"data.skip_bad_records: skipped 1 bad record(s) of {tmp_path / 'd.jsonl'}" in capsys.readouterr().out


def test_non_utf8_and_truncated_data_files_name_the_file_and_line(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    good = json.dumps({"problem": "q", "answer": "1", "images": ["a.png"]})
    (tmp_path / "d.jsonl").write_bytes(f"{good}\n{good}\n".encode() + b'{"problem": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"^{tmp_path / 'd.jsonl'}: line 3 is not UTF-8 text \(byte 0xe9\); save the "
                                        "file as UTF-8$"):
        load_records(tmp_path / "d.jsonl")
    (tmp_path / "d.json").write_text(f"[{good}, {good}"[:-7])
    with pytest.raises(DataError, match=rf"^{tmp_path / 'd.json'}: not valid JSON \(.*\); a cut-short file must be "
                                        "written again$"):
        load_records(tmp_path / "d.json")
    (tmp_path / "d.parquet").write_bytes(b"PAR1 cut short")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'd.parquet'}: not a readable parquet file"):
        load_records(tmp_path / "d.parquet")
