"""Summary of the loss benchmarks: ratios, a markdown table, JSON, and PNG plots.

The ``products`` column is the LM-head products each implementation performs, student + teacher
(``2 N V D`` FLOPs each; its TFLOP/s count them): VA-OPD's floor is 3+2, OPD's 3+1 (Liger's
reverse KL does OPD's 3+1, TRL's 4+2: it recomputes both models' logits in backward). ``x floor``
compares each implementation with the floor of the loss it computes, whatever products it does.

``python bench/report.py RESULTS.json [OUT_DIR]`` re-renders the table and plots from a saved run
(the GPU machine may lack matplotlib: plot its JSON here).
"""
from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

COLUMNS = ("impl", "shape", "products", "ms", "x floor", "x liger", "TFLOP/s", "extra MiB")


def add_ratios(records: list[dict]) -> list[dict]:
    """Ratio of each timing to the floor of the loss it computes (its record's ``floor``: ``floor``,
    VA-OPD's 5 products, or ``floor-opd``, OPD's 4) and to Liger (compiled when measured) at the
    same shape. Records saved without a ``floor`` are compared with the floor of equal products."""
    by_shape = defaultdict(dict)
    floors = defaultdict(dict)
    for r in records:
        if r.get("seconds"):
            by_shape[r["shape_id"]][r["impl"]] = r["seconds"]
            if r["impl"].startswith("floor"):
                floors[r["shape_id"]][tuple(r.get("products", ()))] = r["seconds"]
    for r in records:
        times = by_shape[r["shape_id"]]
        liger = times.get("liger-compiled") or times.get("liger")
        s = r.get("seconds")
        floor = times.get(r["floor"]) if "floor" in r else floors[r["shape_id"]].get(tuple(r.get("products", ())))
        r["x_floor"] = s / floor if s and floor else None
        r["x_liger"] = s / liger if s and liger else None
        r["tflops"] = r["flops"] / s / 1e12 if s else None
    return records


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(records: list[dict], title: str) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in sorted(records, key=lambda r: (r["shape"]["dtype"], r["shape"]["vocab"], r["shape"]["student_hidden"], r["shape"]["tokens"], r["impl"])):
        ms = "OOM" if r.get("oom") else _fmt(r.get("seconds") and r["seconds"] * 1e3, ".2f")
        extra = _fmt(r.get("peak_extra") and r["peak_extra"] / 2**20, ".0f") if r.get("peak_extra") is not None else "-"
        products = "+".join(map(str, r["products"])) if r.get("products") else "-"
        lines.append(
            f"| {r['impl']} | {r['shape_id']} | {products} | {ms} | {_fmt(r['x_floor'], '.2f')} | {_fmt(r['x_liger'], '.2f')} "
            f"| {_fmt(r['tflops'], '.1f')} | {extra} |"
        )
    return "\n".join(lines) + "\n"


def plots(records: list[dict], out_dir: str) -> list[str]:
    """``time.png`` and ``memory.png``: one panel per (vocab, hidden, dtype), a line per impl."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    panels = defaultdict(lambda: defaultdict(list))
    for r in records:
        s = r["shape"]
        panels[(s["vocab"], s["student_hidden"], s["teacher_hidden"], s["dtype"])][r["impl"]].append(r)
    written = []
    for metric, label, scale, name in (("seconds", "time (ms)", 1e3, "time.png"), ("peak_extra", "peak extra memory (MiB)", 2**-20, "memory.png")):
        keys = sorted(panels)
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
        for ax, key in zip(axes[0], keys):
            for impl, rs in sorted(panels[key].items()):
                pts = sorted((r["shape"]["tokens"], r[metric] * scale) for r in rs if r.get(metric) is not None)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"V {key[0]}, D {key[1]}/{key[2]}, {key[3]}")
            ax.set_xlabel("tokens")
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def write(records: list[dict], out_dir: str, title: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    records = add_ratios(records)
    table = markdown(records, title)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"title": title, "records": records}, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table)
    plots(records, out_dir)
    return table


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        data = json.load(f)
    print(write(data["records"], sys.argv[2] if len(sys.argv) > 2 else os.path.dirname(sys.argv[1]), data["title"]))
