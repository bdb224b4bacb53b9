"""Where the teacher's visual advantage lands on the digits a student reads, right or wrong.

In a detail response ("The digits are A and B. ...") the tokens after " are" and " and" are the
student's readings of the two digits. Comparing them with the digits drawn (from the split's
reference responses) splits those tokens into correct and wrong readings; for each group this
reports how many there are, their mean teacher VA, and how often they fall in the VA-OPD high
group. It reads the trainer's ``rollouts.jsonl`` files (``log.rollouts_every``).

``python -m vaopd.toy.digits RUN_DIR [RUN_DIR ...] --data SPLIT.jsonl``
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from vaopd.inspect import find_runs, read_jsonl, run_method

__all__ = ["reading_positions", "reading_digits", "digit_token_stats", "main"]


def reading_positions(tokens: list[str]) -> list[int]:
    """Indices of the two digit readings: the tokens right after " are" and the next " and"."""
    try:
        first = tokens.index(" are") + 1
        second = tokens.index(" and", first) + 1
    except ValueError:
        return []
    return [i for i in (first, second) if i < len(tokens)]


def reading_digits(response: str) -> list[str]:
    """The two digits of a detail reference response ("The digits are A and B. ...")."""
    return response.split(" are ")[1].split(".")[0].split(" and ")


def digit_token_stats(runs: list[Path], rows: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """Per method: ``{"correct"|"wrong": {"tokens", "mean_va", "high_rate"}}`` over the runs' detail rollouts."""
    acc: dict[str, dict[str, list[tuple[float, bool]]]] = {}
    for run in runs:
        groups = acc.setdefault(run_method(run), {"correct": [], "wrong": []})
        for r in read_jsonl(run / "rollouts.jsonl"):
            row = rows.get(r["id"])
            if row is None or row["kind"] != "detail":
                continue
            truth = reading_digits(row["response"])
            for pos, digit in zip(reading_positions(r["tokens"]), truth):
                key = "correct" if r["tokens"][pos].strip() == digit else "wrong"
                groups[key].append((r["teacher_va"][pos], bool(r["high"][pos])))
    return {
        method: {key: {"tokens": len(v), "mean_va": sum(a for a, _ in v) / len(v) if v else float("nan"),
                       "high_rate": sum(h for _, h in v) / len(v) if v else float("nan")}
                 for key, v in groups.items()}
        for method, groups in sorted(acc.items())
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vaopd.toy.digits", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", help="trainer run directories, or folders of them")
    parser.add_argument("--data", required=True, help="the toy split the runs trained on (train.jsonl)")
    args = parser.parse_args(argv)
    rows = {r["id"]: r for r in read_jsonl(Path(args.data))}
    runs = [run for d in args.run_dirs for run in find_runs(Path(d))]
    print(json.dumps(digit_token_stats(runs, rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
