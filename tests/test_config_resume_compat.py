"""A run written before the config used null for "not set" still resumes; a checkpoint's
config.yaml with a YAML tag is refused with an error naming the file, and its tag never runs."""
import json

import yaml

from trainer_utils import OLD_UNSET, flatten, tiny_config, unflatten
from vaopd.manifest import write_manifest
from vaopd.train import main, train


def _old_spelling(path):
    """Rewrite ``path`` (a config.yaml) as vaopd wrote it before null: 0, -1 or "" for not set."""
    flat = flatten(yaml.safe_load(path.read_text()))
    flat.update({k: OLD_UNSET[k] for k, v in flat.items() if v is None})
    path.write_text(yaml.safe_dump(unflatten(flat), sort_keys=False))


def test_a_checkpoint_written_with_the_old_spellings_resumes(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "train.max_steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=5")
    run = train(cfg).run_dir
    first = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ckpt = run / "checkpoints" / "step_00000001"
    for path in (run / "config.yaml", ckpt / "config.yaml"):
        _old_spelling(path)
    assert "checkpoint_every: 1" in (ckpt / "config.yaml").read_text()
    assert "stop_after: 0" in (ckpt / "config.yaml").read_text() and "val: ''" in (ckpt / "config.yaml").read_text()
    write_manifest(ckpt)  # sealed as the older vaopd sealed it
    capsys.readouterr()
    resumed = train(cfg, resume=str(ckpt))
    out = capsys.readouterr().out
    assert resumed.step == 2 and "changed settings" not in out
    again = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in again] == [r["loss"] for r in first]  # step 2 retraced exactly


def test_a_yaml_tag_in_a_checkpoint_config_is_refused(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "train.max_steps=1")
    run = train(cfg).run_dir
    ckpt = run / "checkpoints" / "step_00000001"
    marker = tmp_path / "ran"
    (ckpt / "config.yaml").write_text(f'train:\n  name: !!python/object/apply:os.system ["touch {marker}"]\n')
    write_manifest(ckpt)  # a crafted checkpoint, not a damaged one
    capsys.readouterr()
    assert main(["--resume", str(ckpt), "--set", f"train.run_dir={run}", "--set", "train.device=cpu",
                 "--set", "train.precision=fp32", "--set", "data.val=", "--set", "log.progress=false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: config file {ckpt / 'config.yaml'} is not valid YAML (line 2, column 9)")
    assert "constructor for the tag" in err and err.count("\n") == 1
    assert not marker.exists()
