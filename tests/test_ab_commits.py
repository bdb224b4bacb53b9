"""bench/ab_commits.py: each worker times its own commit's loss, and the rounds alternate.

A throwaway clone gets a second commit whose ``va_opd_loss`` sleeps 0.3 s first; timing the clone's
original commit against that commit's exported tree (tiny shape, CPU) must show the sleep on the
second only.
"""
import pathlib
import shutil
import subprocess

import ab_commits as ab  # bench/ is on pytest's pythonpath
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SLEEP_S = 0.3


def git(*args, cwd):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def test_each_commit_is_timed_with_its_own_code(tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and the repository's history")
    clone = tmp_path / "repo"
    git("clone", "--quiet", "--shared", str(ROOT), str(clone), cwd=tmp_path)
    base = git("rev-parse", "HEAD", cwd=clone)
    init = clone / "kernels" / "__init__.py"
    init.write_text(init.read_text() + (
        "\n\nimport time as _time\n_loss = va_opd_loss\n\n\n"
        f"def va_opd_loss(*args, **kwargs):\n    _time.sleep({SLEEP_S})\n    return _loss(*args, **kwargs)\n"
    ))
    git("commit", "--quiet", "-am", "slow loss", cwd=clone)
    spec = dict(method="opd", tokens=64, vocab=1031, hidden=[32, 48], dtype="fp32", chunk_size=None, warmup=1)

    # The slow commit as an exported tree, as a machine without the history gets it.
    (slow_tree,) = ab.export(["HEAD"], tmp_path / "exported", repo=clone)
    assert sorted(p.name for p in slow_tree.iterdir()) == ["kernels", "vaopd"]

    times = ab.compare([base, str(slow_tree)], spec, rounds=3, repo=clone)

    (label_a, fast), (label_b, slow) = times.items()
    assert label_a == base[:7] and label_b == str(slow_tree)
    assert len(fast) == len(slow) == 3
    assert min(slow) >= SLEEP_S
    assert sorted(fast)[1] < SLEEP_S / 2
    assert "per round: median" in ab.summary(times)


def test_rounds_alternate_which_commit_goes_first():
    calls = []

    class Fake:
        def __init__(self, label):
            self.label = label

        def time_once(self):
            calls.append(self.label)
            return 1.0

    times = ab.alternate([Fake("A"), Fake("B")], rounds=3)
    assert calls == ["A", "B", "B", "A", "A", "B"]
    assert times == {"A": [1.0] * 3, "B": [1.0] * 3}
