"""Checkpoint integrity: manifests catch damage, --resume falls back to the newest intact checkpoint
(single-process and 2-rank DCP), export and eval refuse damaged checkpoints, a crafted DCP file,
trainer state or safetensors header runs nothing and is named, non-finite weights are never
written or loaded, a full disk loses nothing, and pruning never leaves a half-deleted checkpoint."""
import errno
import io
import json
import os
import pickle
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import torch

from torchrun_train import SETTINGS, sets, torchrun
from trainer_utils import folder_hash, tiny_cli, tiny_config
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


@pytest.mark.slow
def test_two_rank_dcp_damage_is_detected_and_resume_falls_back(tmp_path, scripted_rollouts, capsys):
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
    first = save_checkpoint(tmp_path, 3, trainer_state={"step": 3, "data_position": 6, "bad_steps": 0, "scheduler": {}}, **parts)
    again = save_checkpoint(tmp_path, 3, trainer_state={"step": 3, "data_position": 6, "bad_steps": 7, "scheduler": {}}, **parts)
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


def rewrite_checkpoint(ckpt, change):
    """Apply ``change(ckpt)`` and write a matching manifest: what a crafted (not damaged) checkpoint looks like."""
    change(ckpt)
    (ckpt / "manifest.json").unlink()
    write_manifest(ckpt)


def poison_weight(ckpt, name="model.language_model.embed_tokens.weight"):
    from safetensors.torch import load_file, save_file

    def change(ckpt):
        path = ckpt / "model" / "model.safetensors"
        weights = load_file(path)
        weights[name][0, 0] = float("nan")
        save_file(weights, path, metadata={"format": "pt"})
    rewrite_checkpoint(ckpt, change)
    return name


def one_checkpoint(tmp_path, *overrides):
    cfg = tiny_config(tmp_path, "train.max_steps=1", "train.checkpoint_every=1", *overrides)
    return train(cfg).run_dir / "checkpoints" / "step_00000001"


def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    from vaopd.checkpoint import save_checkpoint
    from vaopd.tiny import build_image_processor, build_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_model("student", tokenizer, seed=0)
    parts = dict(model=model, tokenizer=tokenizer, image_processor=build_image_processor(), config_yaml="{}\n", keep=2)
    state = {"step": 1, "data_position": 2, "bad_steps": 0, "scheduler": {}}
    good = save_checkpoint(tmp_path, 1, trainer_state=state, **parts)
    before = folder_hash(tmp_path)
    name, weight = next(iter(model.named_parameters()))
    with torch.no_grad():
        weight.view(-1)[3] = float("inf")
    with pytest.raises(CheckpointError, match=rf"refusing to save {tmp_path / 'step_00000002'}: the weight {name} "
                                              rf"holds NaN or infinity. The last good checkpoint \({good}\) is left intact"):
        save_checkpoint(tmp_path, 2, trainer_state={**state, "step": 2}, **parts)
    assert folder_hash(tmp_path) == before


def test_loading_non_finite_weights_is_refused_by_resume_eval_and_export(tmp_path, capsys):
    from vaopd.train import main as train_main

    ckpt = one_checkpoint(tmp_path)
    name = poison_weight(ckpt)
    before = folder_hash(tmp_path / "run")
    expected = f"{ckpt / 'model' / 'model.safetensors'}: the weight {name} holds NaN or infinity; refusing to load it"
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        train(tiny_config(tmp_path, "train.max_steps=2", "train.checkpoint_every=1"), resume=True)
    assert train_main(["--resume", str(ckpt), *tiny_cli(tmp_path, "train.max_steps=2", "train.checkpoint_every=1")]) == 2
    assert eval_main(["--checkpoint", str(ckpt)]) == 2
    assert export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    plain = tmp_path / "plain"  # a model folder without a manifest is checked too
    shutil.copytree(ckpt / "model", plain)
    shutil.copy2(ckpt / "config.yaml", plain / "config.yaml")
    assert eval_main(["--checkpoint", str(plain)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 4 and all(expected in line for line in err[:3]), err
    assert f"{plain / 'model.safetensors'}: the weight {name} holds NaN or infinity" in err[3]
    assert folder_hash(tmp_path / "run") == before and not (tmp_path / "out").exists()


def test_a_garbage_or_crafted_trainer_state_is_named_and_runs_nothing(tmp_path, capsys):
    from vaopd.train import main as train_main

    ckpt = one_checkpoint(tmp_path)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    args = ["--resume", *tiny_cli(tmp_path, "train.max_steps=1", "train.checkpoint_every=1")]
    for content in (b"garbage" * 10, pickle.dumps({"step": Evil()}), None):
        def change(ckpt):
            path = ckpt / "trainer_state.pt"
            if content is None:  # a real torch.save file, cut short
                path.write_bytes(path.read_bytes()[:5000])
            else:
                path.write_bytes(content)
        rewrite_checkpoint(ckpt, change)
        assert train_main(args) == 2
        err = capsys.readouterr().err
        assert f"error: {ckpt / 'trainer_state.pt'}: not a trainer state vaopd can load" in err
        assert "nothing from it was run" in err and "weights_only=False" not in err and err.count("\n") == 1
        assert not marker.exists()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000001"]


@pytest.mark.parametrize("header", [
    b"\xff" * 8,  # a header length of 2^64 - 1
    (120).to_bytes(8, "little") + b'{"w": {"dtype": "F32", "shape": [1000000000], "data_offsets": [0, 4000000000]}}'.ljust(120),
    (40).to_bytes(8, "little") + b'{"w": {"dtype": "XX"'.ljust(40),
])
def test_crafted_safetensors_headers_are_refused_by_export(tmp_path, capsys, header):
    ckpt = one_checkpoint(tmp_path)
    rewrite_checkpoint(ckpt, lambda ckpt: (ckpt / "model" / "model.safetensors").write_bytes(header + b"\0" * 64))
    assert export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {ckpt / 'model' / 'model.safetensors'}: not a readable safetensors file")
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_a_kill_while_pruning_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    import vaopd.checkpoint as ckpt_mod
    from vaopd.checkpoint import remove_stale_temporaries, step_checkpoints

    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):  # deletes one file, then the process "dies"
        next(p for p in sorted(path.rglob("*")) if p.is_file()).unlink()
        raise KeyboardInterrupt

    cfg = tiny_config(tmp_path, "train.max_steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=1")
    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", lambda path, *a, **k: (killed_midway if "_pruned" in str(path)
                                                                          else real_rmtree)(path, *a, **k))
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in step_checkpoints(checkpoints)] == ["step_00000002"]
    verify_checkpoint(checkpoints / "step_00000002")
    left = sorted(p.name for p in checkpoints.iterdir() if p.name.startswith(".tmp"))
    assert left == [f".tmp_step_00000001_{os.getpid()}_pruned"]
    assert [p.name for p in remove_stale_temporaries(checkpoints)] == left
    assert [p.name for p in checkpoints.iterdir()] == ["step_00000002"]


def _full_disk_on_second_save(monkeypatch):
    """Make the second ``torch.save`` of a checkpoint write a little, then fail as a full disk does."""
    import vaopd.checkpoint as ckpt_mod

    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(ckpt_mod.torch, "save", save)


def test_a_full_disk_during_a_save_loses_nothing_and_says_so(tmp_path, monkeypatch, capsys):
    from vaopd.train import main as train_main

    run = tmp_path / "run"
    args = tiny_cli(tmp_path, "train.checkpoint_every=1", "train.keep_checkpoints=5")
    _full_disk_on_second_save(monkeypatch)
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert err == (f"error: cannot write checkpoint {run / 'checkpoints' / 'step_00000002'}: no space left on the "
                   f"device; its temporary folder was removed and the checkpoints already in {run / 'checkpoints'} "
                   "are intact. Free some space, then continue with --resume.\n")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000001"]
    verify_checkpoint(run / "checkpoints" / "step_00000001")
    monkeypatch.undo()
    assert train_main(["--resume", *args]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]


@pytest.fixture
def small_disk(tmp_path):
    """A 5 MiB tmpfs (room for one tiny checkpoint, not two); skipped where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_really_full_disk_during_a_save_loses_nothing(small_disk, capsys):
    from vaopd.train import main as train_main

    run = small_disk / "run"
    args = tiny_cli(small_disk, "train.max_steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=5")
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write checkpoint {run / 'checkpoints' / 'step_00000002'}: no space left "
                          "on the device; its temporary folder was removed") and err.count("\n") == 1
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000001"]
    verify_checkpoint(run / "checkpoints" / "step_00000001")
