"""Checkpoint integrity: manifests catch damage, --resume falls back to the newest intact checkpoint
(single-process and 2-rank DCP), export and eval refuse damaged checkpoints, and a crafted DCP
file runs nothing."""
import io
import json
import pickle
import shutil
from types import SimpleNamespace

import pytest
import torch

import vaopd.build as build_mod
from tests.test_distributed_train import SETTINGS, ScriptedRollout, sets, torchrun
from tests.test_runs import folder_hash
from tests.trainer_utils import tiny_config
from vaopd.checkpoint import CheckpointError, load_sharded_state, verify_checkpoint
from vaopd.eval import main as eval_main
from vaopd.export import main as export_main
from vaopd.manifest import write_manifest
from vaopd.safe_dcp import SafeLoadPlanner, read_dcp_metadata
from vaopd.train import train


def flip_byte(path, offset=None):
    """Change one byte of ``path`` in place (same size)."""
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damage_is_named_and_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "train.max_steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=5")
    run = train(cfg).run_dir
    one, two = run / "checkpoints" / "step_00000001", run / "checkpoints" / "step_00000002"
    manifest = json.loads((two / "manifest.json").read_text())["files"]
    assert {"model/model.safetensors", "model/config.json", "trainer_state.pt", "config.yaml", "meta.json"} <= set(manifest)

    # Truncation, a missing file and a same-size byte flip are each named (checked on copies).
    for damage, expect in [(lambda c: (c / "trainer_state.pt").write_bytes((c / "trainer_state.pt").read_bytes()[:100]),
                            r"trainer_state.pt: 100 bytes, manifest.json says \d+"),
                           (lambda c: (c / "model" / "config.json").unlink(), r"model/config.json: missing"),
                           (lambda c: flip_byte(c / "model" / "model.safetensors"), r"model.safetensors: SHA-256 differs"),
                           (lambda c: (c / "manifest.json").unlink(), r"manifest.json: missing")]:
        copy = tmp_path / "copy"
        shutil.copytree(two, copy)
        damage(copy)
        with pytest.raises(CheckpointError, match=expect):
            verify_checkpoint(copy)
        shutil.rmtree(copy)

    # Both checkpoints damaged: --resume fails, naming both, and changes nothing.
    flip_byte(two / "model" / "model.safetensors")
    flip_byte(one / "trainer_state.pt")
    before = folder_hash(run)
    more = tiny_config(tmp_path, "train.max_steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=5")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint(.|\n)*step_00000002/model/model.safetensors"
                                              r"(.|\n)*step_00000001/trainer_state.pt"):
        train(more, resume=True)
    assert folder_hash(run) == before

    # Only the newest damaged: --resume names it and continues from the one before.
    flip_byte(one / "trainer_state.pt")  # undo
    capsys.readouterr()
    result = train(more, resume=True)
    out = capsys.readouterr().out
    assert "step_00000002 is damaged" in out and "model.safetensors: SHA-256 differs" in out
    assert f"falling back to {one}" in out and "(step 1)" in out
    assert result.step == 3 and [r["step"] for r in result.history] == [2, 3]
    verify_checkpoint(two)  # rewritten by the new branch
    # The damaged one was set aside, as it was, not deleted (a passing read error also fails a manifest).
    aside = run / "checkpoints" / "step_00000002.damaged"
    assert "kept the damaged step_00000002.damaged aside" in out
    with pytest.raises(CheckpointError, match="model.safetensors: SHA-256 differs"):
        verify_checkpoint(aside)

    # export and eval refuse a damaged checkpoint, naming the file.
    flip_byte(two / "meta.json", 0)
    assert export_main(["--checkpoint", str(two), "--out", str(tmp_path / "export")]) == 2
    assert eval_main(["--checkpoint", str(two), "--samples", "1"]) == 2
    assert capsys.readouterr().err.count("meta.json: SHA-256 differs") == 2
    assert not (tmp_path / "export").exists()


def test_export_output_is_accepted_by_eval(tmp_path, capsys):
    result = train(tiny_config(tmp_path, "train.max_steps=1"))
    out = tmp_path / "export"
    assert export_main(["--checkpoint", str(result.checkpoint), "--out", str(out)]) == 0
    verify_checkpoint(out)
    capsys.readouterr()
    assert eval_main(["--checkpoint", str(out), "--samples", "1", "--set", "data.tiny_val_size=1", "--data", "tiny"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == 1


def test_two_rank_dcp_damage_is_detected_and_resume_falls_back(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    done = torchrun(tmp_path, *sets(f"train.run_dir={run}", "train.max_steps=2", "train.checkpoint_every=1",
                                    "train.keep_checkpoints=5"))
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = run / "checkpoints" / "step_00000001", run / "checkpoints" / "step_00000002"
    # Rank 0 decides and tells every rank: a second run into the folder stops on both, changing nothing.
    before = folder_hash(run)
    again = torchrun(tmp_path, *sets(f"train.run_dir={run}", "train.max_steps=2"))
    assert again.returncode != 0 and again.stderr.count("already holds a run") == 2, again.stderr[-3000:]
    assert folder_hash(run) == before
    files = json.loads((two / "manifest.json").read_text())["files"]
    shards = sorted(n for n in files if n.endswith(".distcp"))
    assert len(shards) == 2 and "dcp/.metadata" in files  # rank 0's manifest covers both ranks' shards
    flip_byte(two / shards[1])
    with pytest.raises(CheckpointError, match=rf"{shards[1]}: SHA-256 differs"):
        verify_checkpoint(two)
    monkeypatch.setattr(build_mod, "HFGenerate", ScriptedRollout)
    result = train(tiny_config(tmp_path, *SETTINGS, "train.max_steps=2", f"train.run_dir={run}"), resume=True)
    out = capsys.readouterr().out
    assert f"falling back to {one}" in out and result.step == 2 and len(result.history) == 1


class _Touch:
    """Unpickling this creates ``path``: what a crafted checkpoint would do instead of a harmless touch."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _dcp_checkpoint(folder):
    """A small DCP checkpoint folder (``dcp/`` with a model and optimizer state) and its model."""
    import torch.distributed.checkpoint as dcp

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 3)).sum().backward()
    optimizer.step()
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    with pytest.warns(UserWarning):
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder / "dcp", no_dist=True)
    return model


def test_crafted_dcp_metadata_runs_nothing(tmp_path, capsys):
    ckpt = tmp_path / "step_00000001"
    model = _dcp_checkpoint(ckpt)
    assert read_dcp_metadata(ckpt / "dcp" / ".metadata").state_dict_metadata  # the real one loads
    load_sharded_state(ckpt, model)

    marker = tmp_path / "pwned"
    (ckpt / "dcp" / ".metadata").write_bytes(pickle.dumps(_Touch(marker)))
    write_manifest(ckpt)  # a forger rewrites the manifest too: the allowlist must still hold
    with pytest.raises(CheckpointError, match=r"\.metadata: refused to load: (io|builtins)\.open is not a DCP metadata type"):
        verify_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_sharded_state(ckpt, model)
    (ckpt / "model").mkdir()
    assert export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists()


def test_crafted_non_tensor_dcp_entry_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    blob = io.BytesIO()
    torch.save({"lr": _Touch(marker)}, blob)
    blob.seek(0)
    item = SimpleNamespace(dest_index=SimpleNamespace(fqn="optim.param_groups.0.lr"))
    with pytest.raises(CheckpointError, match="optim.param_groups.0.lr: refused to load"):
        SafeLoadPlanner().load_bytes(item, blob)
    assert not marker.exists()


def test_saving_an_existing_step_replaces_it(tmp_path):
    from vaopd.checkpoint import load_trainer_state, save_checkpoint
    from vaopd.tiny import build_image_processor, build_model, build_tokenizer

    tokenizer = build_tokenizer()
    parts = dict(model=build_model("student", tokenizer, seed=0), tokenizer=tokenizer,
                 image_processor=build_image_processor(), config_yaml="{}\n", keep=2)
    first = save_checkpoint(tmp_path, 3, trainer_state={"step": 3, "bad_steps": 0}, **parts)
    again = save_checkpoint(tmp_path, 3, trainer_state={"step": 3, "bad_steps": 7}, **parts)
    assert again == first and load_trainer_state(first)["bad_steps"] == 7
    verify_checkpoint(first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003"]  # no temporary or replaced folder left


def test_damaged_safetensors_in_a_model_folder_are_named(tmp_path):
    from vaopd.config import ConfigError
    from vaopd.tiny import build_image_processor, build_model, build_tokenizer

    folder = tmp_path / "student"
    build_model("student", build_tokenizer(), seed=0).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    build_image_processor().save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ConfigError, match=rf"model.student: cannot load .*damaged weights {weights}"):
        train(tiny_config(tmp_path, f"model.student={folder}"))
    assert not (tmp_path / "run").exists()
