"""Compares pocket draft training runs: acceptance on the benchmark prompts by epoch, as a table and a plot.

A run is the `bench_acceptance.jsonl` a `specvlm pocket train-draft` run writes into its work folder (one row per
evaluation point: `{"epoch", "step", "T0": {...}, "T1": {...}}`, see
[`~specvlm_hf.pocket.train_draft.bench_acceptance`]), or a `draft_provenance.json` that holds those rows under
`"bench_acceptance"`. `specvlm pocket draft-report --run LABEL=PATH ... --out DIR` writes `acceptance.md` and
`acceptance.png` into `DIR`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserFileNotFoundError, UserValueError

__all__ = ["acceptance_table", "load_run", "plot_runs", "write_report"]


def load_run(path: str | Path) -> list[dict[str, Any]]:
    """The evaluation rows of one run (from `bench_acceptance.jsonl` or a `draft_provenance.json`)."""
    path = Path(path)
    if not path.is_file():
        raise UserFileNotFoundError(f"no run file at {path} (a bench_acceptance.jsonl or a draft_provenance.json)")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        rows = json.loads(text).get("bench_acceptance")
        if not rows:
            raise UserValueError(f"{path} has no 'bench_acceptance' rows")
        return rows
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _temperatures(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    keys = {key for rows in runs.values() for row in rows for key in row if key.startswith("T")}
    return sorted(keys, key=lambda key: float(key[1:]))


def acceptance_table(runs: dict[str, list[dict[str, Any]]], max_depth: int = 4) -> str:
    """
    A Markdown table: one line per run and evaluation point with the mean acceptance length (bonus token included)
    at every temperature, and the acceptance per depth (share of cycles reaching depth d) at the lowest temperature.
    """
    temperatures = _temperatures(runs)
    if not temperatures:
        raise UserValueError("the runs hold no acceptance measurements")
    first = temperatures[0]
    header = ["Run", "Epoch"] + [f"Accept len, T={key[1:]}" for key in temperatures]
    header += [f"Depth {depth} ({first})" for depth in range(1, max_depth + 1)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, rows in runs.items():
        for row in rows:
            cells = [label, f"{row['epoch']:g}"]
            cells += [f"{row[key]['mean_accept_len']:.2f}" if key in row else "–" for key in temperatures]
            depths = row.get(first, {}).get("acceptance_per_depth", [])
            cells += [f"{depths[d]:.2f}" if d < len(depths) else "0.00" for d in range(max_depth)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_runs(runs: dict[str, list[dict[str, Any]]], path: str | Path, title: str = "") -> Path:
    """Mean acceptance length against training epoch, one line per run and temperature (solid T=0, dashed T>0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    for index, (label, rows) in enumerate(runs.items()):
        color = f"C{index}"
        for key in _temperatures(runs):
            points = [(row["epoch"], row[key]["mean_accept_len"]) for row in rows if key in row]
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            style = "-" if float(key[1:]) == 0 else "--"
            axis.plot(xs, ys, style, marker="o", color=color, label=f"{label}, T={key[1:]}")
    axis.set_xlabel("training epoch")
    axis.set_ylabel("mean acceptance length (incl. bonus)")
    if title:
        axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)


def write_report(runs: dict[str, str | Path], out_dir: str | Path, title: str = "") -> tuple[Path, Path]:
    """Loads every `LABEL -> path` run and writes `acceptance.md` and `acceptance.png` into `out_dir`."""
    loaded = {label: load_run(path) for label, path in runs.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "acceptance.md"
    table.write_text(acceptance_table(loaded))
    return table, plot_runs(loaded, out_dir / "acceptance.png", title)
