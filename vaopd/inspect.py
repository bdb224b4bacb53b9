"""See what a run did: per-token visual advantage on sampled rollouts, and training curves.

``python -m vaopd.inspect RUN_DIR [--out DIR]`` reads one trainer run directory, or a folder of
them (such as ``python -m vaopd.toy.compare``'s output), and writes into ``--out`` (default
``RUN_DIR/inspect``):

- ``index.html``: for each run, the rollouts recorded at its first and last logged steps. Every
  token is shaded by the teacher's visual advantage (``max(log pT(clean) - log pT(ablated), 0)``),
  tokens of the high-VA group are outlined, and a second line shades the same tokens by the
  student's own visual advantage. Hovering a token shows the numbers; a table per rollout lists them.
- ``curves.png``: loss, KL, validation accuracy, the teacher's high-group VA share and the
  student's visual reliance against the step, OPD and VA-OPD runs in two colours.

The trainer records the rollouts when ``log.rollouts_every`` is set (``rollouts.jsonl``, written
by ``vaopd.rollout_log``); the curves come from ``metrics.jsonl``.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import sys
from pathlib import Path

import yaml

__all__ = ["read_jsonl", "find_runs", "visible_token", "render_page", "plot_curves", "main"]

_METHOD_COLORS = {"opd": "tab:blue", "va_opd": "tab:red"}
# What a curve panel says when no run has its data, and which setting records it.
_EMPTY_PANEL = {
    "val_accuracy": "no validation recorded\n(set data.val and eval.every)",
    "va_share": "no rollouts recorded\n(set log.rollouts_every)",
    "student_va": "no rollouts recorded\n(set log.rollouts_every)",
}


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for n, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if n < len(lines) - 1:  # a torn last line is a write in progress (or cut by a crash): skip it
                raise ValueError(f"{path}: line {n + 1} is not valid JSON") from None
    return records


def find_runs(root: Path) -> list[Path]:
    """Trainer run directories (holding ``metrics.jsonl``): ``root`` itself, or those below it."""
    root = Path(root)
    if (root / "metrics.jsonl").is_file():
        return [root]
    return sorted(p.parent for p in root.rglob("metrics.jsonl"))


def run_method(run: Path) -> str:
    """The run's ``loss.method``, as ``va_opd:<loss.va>`` for a VA-OPD run with a non-paper VA estimator."""
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) if (run / "config.yaml").is_file() else {}
    loss = config.get("loss") or {}
    method, va = loss.get("method", "?"), loss.get("va", "sampled")
    return f"{method}:{va}" if method == "va_opd" and va != "sampled" else method


def _high_share(r: dict) -> float:
    """Share of a rollout's teacher VA carried by its high group."""
    total = sum(r["teacher_va"])
    return sum(v for v, h in zip(r["teacher_va"], r["high"]) if h) / total if total > 0 else 0.0


def _shade(value: float, rgb: tuple[int, int, int]) -> str:
    """Background for a VA in nats: ``1 - exp(-va)`` opacity, the same scale on every rollout
    (0.1 nat is faint, 1 nat clear, 3 nats solid), so rollouts can be compared by eye."""
    alpha = 1.0 - math.exp(-max(0.0, value))
    return f"background: rgba({rgb[0]},{rgb[1]},{rgb[2]},{alpha:.2f})"


def visible_token(token: str) -> str:
    """HTML for a token: escaped, control characters (a sampled raw byte can be one) as ``\\xNN``."""
    shown = "".join(f"\\x{ord(ch):02x}" if ord(ch) < 32 or ord(ch) == 127 else ch for ch in token)
    return html.escape(shown) or "&nbsp;"


def _rollout_html(r: dict) -> str:
    teacher_line, student_line, table = [], [], []
    for i, tok in enumerate(r["tokens"]):
        shown = visible_token(tok)
        tip = (f"teacher VA {r['teacher_va'][i]:.4f} (log p {r['teacher_logp'][i]:.3f} clean, "
               f"{r['teacher_ablated_logp'][i]:.3f} ablated); student VA {r['student_va'][i]:.4f}")
        cls = "tok high" if r["high"][i] else "tok"
        teacher_line.append(f'<span class="{cls}" style="{_shade(r["teacher_va"][i], (220, 60, 30))}" '
                            f'title="{html.escape(tip)}">{shown}</span>')
        student_line.append(f'<span class="tok" style="{_shade(r["student_va"][i], (30, 90, 220))}" '
                            f'title="{html.escape(tip)}">{shown}</span>')
        table.append(f"<tr><td>{i}</td><td><code>{shown}</code></td><td>{r['teacher_va'][i]:.4f}</td>"
                     f"<td>{'yes' if r['high'][i] else ''}</td><td>{r['teacher_logp'][i]:.3f}</td>"
                     f"<td>{r['teacher_ablated_logp'][i]:.3f}</td><td>{r['student_va'][i]:.4f}</td>"
                     f"<td>{r['student_logp'][i]:.3f}</td><td>{r['student_ablated_logp'][i]:.3f}</td></tr>")
    verdict = "correct" if r["correct"] else "wrong"
    return (
        f'<div class="rollout"><div class="meta">{html.escape(r["id"])} (response {r["row"]}): '
        f'{html.escape(r["question"])} gold {html.escape(r["answer"])}, <b>{verdict}</b>; '
        f'teacher high-group VA share {_high_share(r):.2f}</div>'
        f'<div class="line"><span class="label">teacher VA</span>{"".join(teacher_line)}</div>'
        f'<div class="line"><span class="label">student VA</span>{"".join(student_line)}</div>'
        '<details><summary>per-token values</summary><table><tr><th>#</th><th>token</th><th>teacher VA</th>'
        '<th>high</th><th>log pT clean</th><th>log pT ablated</th><th>student VA</th><th>log pS clean</th>'
        f'<th>log pS ablated</th></tr>{"".join(table)}</table></details></div>'
    )


_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 70em; }
.rollout { margin: 0.8em 0; padding: 0.4em; border-bottom: 1px solid #ddd; }
.meta { font-size: 0.85em; color: #444; margin-bottom: 0.3em; }
.line { font-family: monospace; white-space: pre; margin: 0.15em 0; }
.label { display: inline-block; width: 7em; color: #666; font-family: sans-serif; font-size: 0.8em; }
.tok { padding: 0 1px; }
.tok.high { outline: 2px solid #a00; }
table { border-collapse: collapse; font-size: 0.8em; } td, th { padding: 0 0.6em; text-align: right; }
"""


def render_page(runs: list[Path], out: Path, curves: str | None = None) -> Path:
    """Write ``out/index.html`` for ``runs``; returns its path."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>vaopd inspect</title><style>{_STYLE}</style></head><body>",
             "<h1>Visual advantage on sampled rollouts</h1>",
             "<p>Red shading: the teacher's visual advantage of each sampled token (clean minus ablated "
             "log-probability, floored at 0; opacity 1 - exp(-VA), the same scale everywhere); outlined tokens form the high-VA group the "
             "VA-OPD loss gives half of the response's weight. Blue shading: the student's own clean minus "
             "ablated log-probability of the same token (negative values unshaded). Hover a token for its numbers.</p>"]
    if curves:
        parts.append(f'<h2>Training curves</h2><img src="{html.escape(curves)}" style="max-width:100%">')
    for run in runs:
        rollouts = read_jsonl(run / "rollouts.jsonl")
        parts.append(f"<h2>{html.escape(run.name)} ({html.escape(run_method(run))})</h2>")
        if not rollouts:
            parts.append("<p>No rollouts recorded (set <code>log.rollouts_every</code>).</p>")
            continue
        steps = sorted({r["step"] for r in rollouts})
        for step in dict.fromkeys([steps[0], steps[-1]]):
            at = [r for r in rollouts if r["step"] == step]
            share = sum(_high_share(r) for r in at) / len(at)
            parts.append(f"<h3>step {step}: {len(at)} rollouts, mean high-group VA share {share:.2f}</h3>")
            parts.extend(_rollout_html(r) for r in at)
    parts.append("</body></html>")
    out.mkdir(parents=True, exist_ok=True)
    page = out / "index.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return page


def _rollout_curve(rollouts: list[dict], value) -> tuple[list[int], list[float]]:
    steps = sorted({r["step"] for r in rollouts})
    return steps, [sum(value(r) for r in rollouts if r["step"] == s) / sum(1 for r in rollouts if r["step"] == s) for s in steps]


def _moving_average(xs: list, ys: list, window: int) -> tuple[list, list]:
    """Trailing mean over ``window`` points, from the first full window on."""
    out = [sum(ys[i - window + 1:i + 1]) / window for i in range(window - 1, len(ys))]
    return xs[window - 1:], out


def plot_curves(runs: list[Path], path: Path) -> Path | None:
    """Plot the runs' curves into ``path`` (PNG); None when no run has metrics."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("vaopd.inspect draws curves.png with matplotlib, which is missing: pip install matplotlib "
                          "(or reinstall vaopd, which requires it)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "loss"), ("kl", "KL (student || teacher)"), ("val_accuracy", "validation accuracy"),
              ("va_share", "teacher VA share of high group\n(logged rollouts)"),
              ("student_va", "student visual reliance\n(mean clean - ablated log p)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    filled: set[str] = set()  # panels with at least one point
    labelled = set()
    for run in runs:
        method = run_method(run)
        color = _METHOD_COLORS.get(method, "gray")
        metrics = read_jsonl(run / "metrics.jsonl")
        rollouts = read_jsonl(run / "rollouts.jsonl")
        label = method if method not in labelled else None
        labelled.add(method)
        for ax, (key, title) in zip(axes, panels):
            if key == "va_share":
                xs, ys = _rollout_curve(rollouts, _high_share) if rollouts else ([], [])
            elif key == "student_va":
                xs, ys = _rollout_curve(rollouts, lambda r: sum(r["student_va"]) / max(1, len(r["student_va"]))) if rollouts else ([], [])
            else:
                rows = [m for m in metrics if m.get(key) is not None]
                xs, ys = [m["step"] for m in rows], [m[key] for m in rows]
            if xs:
                if len(xs) > 60:  # per-step curves: faint raw values under a moving average
                    ax.plot(xs, ys, color=color, alpha=0.15, lw=0.6)
                    xs, ys = _moving_average(xs, ys, max(2, len(xs) // 25))
                ax.plot(xs, ys, color=color, alpha=0.8, marker="o" if len(xs) < 30 else None, ms=3, label=label)
                filled.add(key)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
    if not filled:
        plt.close(fig)
        return None
    for ax, (key, _) in zip(axes, panels):
        if key not in filled:  # say so rather than draw empty axes
            ax.text(0.5, 0.5, _EMPTY_PANEL.get(key, "no data"), ha="center", va="center", fontsize=8, color="dimgray",
                    transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vaopd.inspect", description="HTML page and curves for a run.")
    parser.add_argument("run_dir", help="a trainer run directory, or a folder of them")
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/inspect)")
    args = parser.parse_args(argv)
    runs = find_runs(Path(args.run_dir))
    if not runs:
        print(f"error: no run directory (with metrics.jsonl) in {args.run_dir}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.run_dir) / "inspect"
    curves = plot_curves(runs, out / "curves.png")
    page = render_page(runs, out, curves.name if curves else None)
    print(f"wrote {page}" + (f" and {curves}" if curves else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
