"""The trainer's rollout log and the inspect page rendered from a tiny run."""
import json
import math

import pytest

from trainer_utils import tiny_config

from vaopd.inspect import main as inspect_main
from vaopd.inspect import visible_token
from vaopd.train import train


@pytest.mark.slow
def test_rollout_log_and_inspect_page(tmp_path):
    for method in ("opd", "va_opd"):
        cfg = tiny_config(tmp_path, f"loss.method={method}", "train.max_steps=3", "log.rollouts_every=2",
                          "log.rollouts_per_log=3", name=method)
        train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "va_opd" / "rollouts.jsonl").read_text().splitlines()]
    # Steps 1 and 3 are logged (every 2 steps, from the first), 3 rollouts each.
    assert [r["step"] for r in lines] == [1, 1, 1, 3, 3, 3]
    for r in lines:
        n = len(r["tokens"])
        assert n > 0 and all(len(r[k]) == n for k in ("teacher_va", "high", "student_va", "teacher_logp", "student_logp"))
        for va, lt, lta in zip(r["teacher_va"], r["teacher_logp"], r["teacher_ablated_logp"]):
            assert math.isclose(va, max(lt - lta, 0.0), abs_tol=2e-5)
        for va, ls, lsa in zip(r["student_va"], r["student_logp"], r["student_ablated_logp"]):
            assert math.isclose(va, ls - lsa, abs_tol=2e-5)
        assert sum(r["high"]) == max(1, math.ceil(0.2 * n))
        # The high group holds the largest VAs.
        assert min(v for v, h in zip(r["teacher_va"], r["high"]) if h) >= max([v for v, h in zip(r["teacher_va"], r["high"]) if not h], default=0)
    assert (tmp_path / "opd" / "rollouts.jsonl").read_text().count("\n") == 6

    assert inspect_main([str(tmp_path), "--out", str(tmp_path / "page")]) == 0
    page = (tmp_path / "page" / "index.html").read_text()
    assert (tmp_path / "page" / "curves.png").stat().st_size > 1000
    assert "opd (opd)" in page and "va_opd (va_opd)" in page
    last = lines[-1]
    for i, tok in enumerate(last["tokens"]):
        assert visible_token(tok) in page
    assert f"{last['teacher_va'][0]:.4f}" in page and f"{last['student_va'][-1]:.4f}" in page
    # Both runs' steps 1 and 3 are their first and last logged steps: every rollout is on the page.
    opd_lines = [json.loads(x) for x in (tmp_path / "opd" / "rollouts.jsonl").read_text().splitlines()]
    assert page.count('class="tok high"') == sum(sum(r["high"]) for r in lines + opd_lines)


def test_visible_token_escapes_control_bytes():
    assert visible_token("\x00") == "\\x00" and visible_token("\n") == "\\x0a"
    assert visible_token("<b>") == "&lt;b&gt;" and visible_token("") == "&nbsp;"


def test_inspect_without_runs_is_an_error(tmp_path):
    assert inspect_main([str(tmp_path)]) == 2


def test_a_curve_panel_without_data_says_so(tmp_path, monkeypatch):
    import matplotlib.axes

    from vaopd.inspect import plot_curves

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "kl": 0.5 / s}) + "\n"
                                               for s in (1, 2, 3)))
    written = []
    real = matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "text",
                        lambda self, x, y, s, *a, **k: written.append((self.get_title(), s)) or real(self, x, y, s, *a, **k))
    assert plot_curves([run], tmp_path / "curves.png").stat().st_size > 1000
    said = {title.split("\n")[0]: text.split("\n")[0] for title, text in written}
    assert said == {"validation accuracy": "no validation recorded", "teacher VA share of high group": "no rollouts recorded",
                    "student visual reliance": "no rollouts recorded"}
