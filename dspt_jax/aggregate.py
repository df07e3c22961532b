"""Turns the `results.json` files of many runs into the papers' tables and the robustness curve.

Command line (also called by `dspt_jax.sweep` at the end of a sweep):

  python -m dspt_jax.aggregate runs/sweep [--out DIR]

writes into DIR (default: the searched directory)

* `results_table.md`   one section per (dataset, noise kind, shots, model): a table of test accuracy (%)
                       and one of the fraction (%) of flipped training examples the tuned prompt fits;
                       rows = methods (zero-shot CLIP first), columns = noise rates, cells "mean ± std";
* `results_table.csv`  the same tables as CSV, one row per (section, metric, method), same cell strings;
* `results_long.csv`   one row per (section, method, rate, metric) with full-precision numbers;
* `results_paper.md`, `.csv`, `.tex`  NLPrompt's Table 1 layout: one table of test accuracy per (dataset,
                       shots, model) whose columns are every noise kind at each of its rates (sym 25%, ...,
                       asym 75%), rows = zero-shot CLIP then the methods; markdown, CSV and LaTeX (booktabs);
* `robustness_curve.png`  test accuracy against noise rate per loss with std error bars and zero-shot CLIP
                       as a dashed horizontal line, one panel per section (like DSPT's Figure 1).

Statistics: the mean over seeds and the *sample* standard deviation (ddof=1), as CoOp-style papers
report "mean ± std over 3 seeds"; with one seed only the mean is shown. Everything is in percent.

Python: `collect(root)` -> rows, `aggregate(rows)` -> groups, `write_tables(groups, out_dir)`,
`write_paper_tables(groups, out_dir)`, `plot_curve(groups, path)`; `aggregate_dir(root, out_dir)` does them all.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import os
import sys
from typing import Any, Iterable, Sequence

import numpy as np
from etils import epath

from dspt_jax import files

log = logging.getLogger("dspt_jax")

# Readable method names, in the papers' order: the baselines, then DSPT (the method) last. Losses not
# listed here keep their own name in upper case and go between the baselines and DSPT.
LOSS_NAMES = {"ce": "CoOp (CE)", "gce": "GCE", "mae": "MAE", "sce": "SCE", "nce_rce": "NCE+RCE",
              "taylor_ce": "Taylor CE", "elr": "ELR", "joapr": "JoAPR", "nlprompt": "NLPrompt", "dspt": "DSPT"}
_BASELINE_ORDER = ("ce", "gce", "mae", "sce", "nce_rce", "taylor_ce", "elr", "joapr", "nlprompt")
ZERO_SHOT_NAME = "Zero-shot CLIP"

METRICS = {
    "accuracy": "Test accuracy (%)",
    "fitted_flipped": "Flipped training examples fitted (%)",
}

# Settings that must agree between the seeds of one table cell; if they differ, averaging would mix
# two experiments, so `aggregate` refuses.
_CELL_INVARIANTS = ("epochs", "steps", "gce_q", "prompt", "num_flips")

_KIND_ORDER = ("none", "sym", "asym", "sym_incl", "symflip", "pairflip", "matrix", "real")
PAPER_MD = "results_paper.md"
PAPER_CSV = "results_paper.csv"
PAPER_TEX = "results_paper.tex"
TABLE_MD = "results_table.md"
TABLE_CSV = "results_table.csv"
LONG_CSV = "results_long.csv"
CURVE_PNG = "robustness_curve.png"
MISSING = "-"


# ---------------------------------------------------------------------------------------------------------
# Reading.


def _require(results: dict, path: str, *keys: str) -> Any:
    """results[k1][k2]..., or a ValueError naming the file and the missing field."""
    node: Any = results
    for i, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            raise ValueError(
                f"{path}: not a dspt_jax results file, it has no field {'.'.join(keys[: i + 1])!r}"
            )
        node = node[key]
    return node


def column_rate(kind: str, rate: float, num_flips: int | None, shots: int) -> float:
    """The noise rate a run is tabulated under: its `rate`, or F/shots for symflip/pairflip runs that
    gave `num_flips` = F explicitly (their `rate` is then not what was applied)."""
    if num_flips is not None and shots and shots > 0:
        return num_flips / shots
    return float(rate)


def _features_suffix(mode: str) -> str:
    """What a run's section name adds for its image features: nothing for CoOp's `computed`."""
    return "" if mode == "computed" else f", image features {mode}"


def flatten_results(results: dict, path: str = "<results>") -> dict:
    """One results.json (as written by `dspt_jax.train.train_and_evaluate`) -> one flat row."""
    noise = _require(results, path, "noise")
    shots = _require(results, path, "shots")
    kind = _require(results, path, "noise", "kind")
    rate = float(_require(results, path, "noise", "rate"))
    num_flips = noise.get("num_flips")
    zero_shot = results.get("zero_shot") or {}
    train = results.get("train") or {}
    return {
        "path": path,
        "dataset": _require(results, path, "dataset"),
        "kind": kind,
        "rate": column_rate(kind, rate, num_flips, shots),
        "num_flips": num_flips,
        "loss": _require(results, path, "loss"),
        "gce_q": results.get("gce_q"),
        "seed": _require(results, path, "seed"),
        "shots": shots,
        # A run on cached image features is another protocol: it gets its own table (and says so).
        "model": results.get("model", "") + _features_suffix(results.get("image_features", "computed")),
        "epochs": results.get("epochs"),
        "steps": results.get("steps"),
        "prompt": json.dumps(results.get("prompt"), sort_keys=True),
        "accuracy": float(_require(results, path, "final", "accuracy")),
        "macro_f1": _require(results, path, "final").get("macro_f1"),
        "zero_shot_accuracy": zero_shot.get("accuracy"),
        "fitted_flipped_fraction": train.get("fitted_flipped_fraction"),
        "fitted_flipped": train.get("fitted_flipped"),
        "num_flipped": train.get("num_flipped"),
        "wall_time_s": results.get("wall_time_s"),
    }


def collect(root: str) -> list[dict]:
    """Every `results.json` under `root` (recursively, in sorted path order) as a flat row (see
    `flatten_results`); each row's "path" is the file's path."""
    if not files.isdir(root):
        raise FileNotFoundError(f"{root!r} is not a directory")
    rows = []
    for dirpath, dirnames, filenames in epath.Path(root).walk():
        dirnames.sort()
        # Checkpoints and noise records hold no results files; skipping them keeps big sweeps fast.
        dirnames[:] = [d for d in dirnames if d not in ("checkpoints", "tensorboard", "noise", "jax_cache")]
        if "results.json" in filenames:
            path = files.join(os.fspath(dirpath), "results.json")
            try:
                results = files.read_json(path)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
            rows.append(flatten_results(results, path))
    return rows


# ---------------------------------------------------------------------------------------------------------
# Statistics.


@dataclasses.dataclass(frozen=True)
class Stat:
    """Mean and sample std (ddof=1) in percent over the seeds of one cell; std is None for one seed."""

    mean: float | None
    std: float | None
    n: int
    seeds: tuple = ()

    @classmethod
    def of(cls, fractions: Sequence[float | None], seeds: Sequence = ()) -> "Stat":
        """From fractions in [0, 1]; None entries (metric not defined for that run) are left out."""
        kept = [
            (float(v), s) for v, s in zip(fractions, list(seeds) or [None] * len(fractions)) if v is not None
        ]
        if not kept:
            return cls(None, None, 0, ())
        values = 100.0 * np.asarray([v for v, _ in kept], np.float64)
        std = float(np.std(values, ddof=1)) if len(values) > 1 else None
        return cls(float(np.mean(values)), std, len(values), tuple(s for _, s in kept if s is not None))

    def cell(self, decimals: int = 1) -> str:
        """ "mean ± std" with `decimals` decimals; just the mean for one seed; "-" for no value."""
        if self.mean is None:
            return MISSING
        if self.std is None:
            return f"{self.mean:.{decimals}f}"
        return f"{self.mean:.{decimals}f} ± {self.std:.{decimals}f}"


@dataclasses.dataclass
class Group:
    """One section of the tables (one panel of the plot): the runs of one dataset, noise kind, shots and
    model. `accuracy` and `fitted_flipped` map (loss, rate) to the Stat over seeds."""

    dataset: str
    kind: str
    shots: int
    model: str
    rates: tuple[float, ...]
    losses: tuple[str, ...]
    accuracy: dict
    fitted_flipped: dict
    zero_shot: Stat

    @property
    def title(self) -> str:
        noise = {"none": "no noise", "real": "real noise"}.get(self.kind, f"{self.kind} noise")
        shots = "all shots" if self.shots == -1 else f"{self.shots}-shot"
        return (
            f"{self.dataset}, {noise}, {shots}, {self.model}"
            if self.model
            else f"{self.dataset}, {noise}, {shots}"
        )

    def stat(self, metric: str, loss: str, rate: float) -> Stat:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; valid: {sorted(METRICS)}")
        return getattr(self, metric).get((loss, rate), Stat(None, None, 0))


def loss_sort_key(loss: str) -> tuple:
    """Baselines in the papers' order, then unknown losses alphabetically, then DSPT."""
    if loss in _BASELINE_ORDER:
        return (0, _BASELINE_ORDER.index(loss), "")
    if loss == "dspt":
        return (2, 0, "")
    return (1, 0, loss)


def method_name(loss: str) -> str:
    return LOSS_NAMES.get(loss, loss.upper())


def _rate_key(rate: float) -> float:
    # Rates come from configs (0.125, 0.25, ...) or F/shots; rounding makes 1/3 from two runs one column.
    return round(float(rate), 9)


def aggregate(rows: Iterable[dict]) -> list[Group]:
    """Groups flat rows by (dataset, kind, shots, model) and, inside, by (loss, rate) over seeds.

    Raises ValueError for a duplicate (two results for the same cell and seed) and for a mismatch (seeds of
    one cell that differ in epochs, steps, gce_q, prompt or num_flips): both would corrupt the mean.
    The zero-shot row is the mean over every run of the dataset and model that evaluated zero-shot CLIP
    (it depends on neither seed, noise nor loss).
    """
    rows = list(rows)
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["dataset"], row["kind"], row["shots"], row["model"], row["loss"], _rate_key(row["rate"]))
        cells.setdefault(key, []).append(row)

    for key, members in cells.items():
        by_seed: dict[Any, str] = {}
        for row in members:
            if row["seed"] in by_seed:
                raise ValueError(
                    f"duplicate results for dataset={key[0]} kind={key[1]} shots={key[2]} loss={key[4]} "
                    f"rate={key[5]} seed={row['seed']}: {by_seed[row['seed']]} and {row['path']}; "
                    "aggregate the directories separately or remove one."
                )
            by_seed[row["seed"]] = row["path"]
        for field in _CELL_INVARIANTS:
            values = {json.dumps(row.get(field), sort_keys=True) for row in members}
            if len(values) > 1:
                detail = ", ".join(f"{row['path']}: {row.get(field)!r}" for row in members)
                raise ValueError(
                    f"mismatched {field!r} among the seeds of dataset={key[0]} kind={key[1]} "
                    f"shots={key[2]} loss={key[4]} rate={key[5]} ({detail}); these are different "
                    "experiments, aggregate them separately."
                )

    zero_shot: dict[tuple, list] = {}
    for row in rows:
        if row["zero_shot_accuracy"] is not None:
            zero_shot.setdefault((row["dataset"], row["model"]), []).append(row["zero_shot_accuracy"])
    for (dataset, model), values in zero_shot.items():
        if max(values) - min(values) > 1e-9:
            log.warning(
                "zero-shot accuracy of %s with %s differs between runs (%.4f to %.4f): different test "
                "splits or templates? The table shows their mean.",
                dataset,
                model,
                min(values),
                max(values),
            )

    groups: dict[tuple, dict] = {}
    for (dataset, kind, shots, model, loss, rate), members in cells.items():
        members = sorted(members, key=lambda r: r["seed"])
        g = groups.setdefault((dataset, kind, shots, model), {"accuracy": {}, "fitted_flipped": {}})
        seeds = [r["seed"] for r in members]
        g["accuracy"][(loss, rate)] = Stat.of([r["accuracy"] for r in members], seeds)
        g["fitted_flipped"][(loss, rate)] = Stat.of([r["fitted_flipped_fraction"] for r in members], seeds)

    out = []
    for (dataset, kind, shots, model), g in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        keys = g["accuracy"].keys()
        out.append(
            Group(
                dataset=dataset,
                kind=kind,
                shots=shots,
                model=model,
                rates=tuple(sorted({rate for _, rate in keys})),
                losses=tuple(sorted({loss for loss, _ in keys}, key=loss_sort_key)),
                accuracy=g["accuracy"],
                fitted_flipped=g["fitted_flipped"],
                zero_shot=Stat.of(zero_shot.get((dataset, model), [])),
            )
        )
    return out


# ---------------------------------------------------------------------------------------------------------
# Tables.


def rate_label(rate: float) -> str:
    """0.125 -> "12.5%", 0.5 -> "50%"."""
    return f"{100 * rate:g}%"


def table_rows(group: Group, metric: str) -> list[list[str]]:
    """The table of one group and metric as strings: a header row ("Method", rate labels...), then the
    zero-shot row (accuracy only; the same value in every column) and one row per loss."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {sorted(METRICS)}")
    rows = [["Method"] + [rate_label(r) for r in group.rates]]
    if metric == "accuracy" and group.zero_shot.n:
        # Zero-shot CLIP is deterministic given dataset and model: the mean alone, no std.
        rows.append([ZERO_SHOT_NAME] + [f"{group.zero_shot.mean:.1f}"] * len(group.rates))
    for loss in group.losses:
        rows.append([method_name(loss)] + [group.stat(metric, loss, r).cell() for r in group.rates])
    return rows


def _seed_note(group: Group) -> str:
    counts = sorted({s.n for s in group.accuracy.values() if s.n})
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return (
        f"Cells: mean ± sample std (ddof=1) over seeds, n = {n} seed(s) per cell; one seed: mean only. "
        f"{MISSING}: no run (or metric undefined, e.g. nothing flipped at rate 0)."
    )


def format_markdown(groups: Sequence[Group]) -> str:
    """All groups as markdown: a `## title` per group with the accuracy and the fitted-flipped tables."""
    lines = ["# Results", ""]
    for group in groups:
        lines += [f"## {group.title}", ""]
        for metric, caption in METRICS.items():
            rows = table_rows(group, metric)
            lines += [f"**{caption}**", ""]
            lines.append("| " + " | ".join(rows[0]) + " |")
            lines.append("|" + "---|" + "---:|" * (len(rows[0]) - 1))
            lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
            lines.append("")
        lines += [_seed_note(group), ""]
    return "\n".join(lines)


@contextlib.contextmanager
def _csv_file(path: str):
    """A csv.writer whose rows are written to `path` (a local path or a bucket URL) whole, at the end."""
    text = io.StringIO(newline="")
    yield csv.writer(text)
    files.write_text(path, text.getvalue())


def write_tables(groups: Sequence[Group], out_dir: str) -> dict[str, str]:
    """Writes results_table.md, results_table.csv and results_long.csv into `out_dir`; returns their paths.

    results_table.csv: columns dataset, noise, shots, model, metric, method, then one column per noise rate
    (the union over groups; "-" where a group has no run), cells as in the markdown.
    results_long.csv: dataset, noise, shots, model, method, loss, rate, metric, n, mean, std, seeds.
    """
    paths = {
        "md": files.join(out_dir, TABLE_MD),
        "csv": files.join(out_dir, TABLE_CSV),
        "long_csv": files.join(out_dir, LONG_CSV),
    }
    files.write_text(paths["md"], format_markdown(groups))

    all_rates = sorted({r for g in groups for r in g.rates})
    with _csv_file(paths["csv"]) as writer:
        writer.writerow(
            ["dataset", "noise", "shots", "model", "metric", "method"] + [rate_label(r) for r in all_rates]
        )
        for g in groups:
            for metric in METRICS:
                rows = table_rows(g, metric)
                column = {label: i for i, label in enumerate(rows[0])}
                for row in rows[1:]:
                    cells = [
                        row[column[rate_label(r)]] if rate_label(r) in column else MISSING for r in all_rates
                    ]
                    writer.writerow([g.dataset, g.kind, g.shots, g.model, metric, row[0]] + cells)

    with _csv_file(paths["long_csv"]) as writer:
        writer.writerow(
            [
                "dataset",
                "noise",
                "shots",
                "model",
                "method",
                "loss",
                "rate",
                "metric",
                "n",
                "mean",
                "std",
                "seeds",
            ]
        )
        for g in groups:
            for metric in METRICS:
                for loss in g.losses:
                    for rate in g.rates:
                        s = g.stat(metric, loss, rate)
                        writer.writerow(
                            [
                                g.dataset,
                                g.kind,
                                g.shots,
                                g.model,
                                method_name(loss),
                                loss,
                                repr(rate),
                                metric,
                                s.n,
                                "" if s.mean is None else repr(s.mean),
                                "" if s.std is None else repr(s.std),
                                " ".join(map(str, s.seeds)),
                            ]
                        )
    return paths


def paper_tables(groups: Sequence[Group], metric: str = "accuracy") -> list[tuple[str, list[list[str]]]]:
    """NLPrompt's Table 1 layout: per (dataset, shots, model) a title and the table as strings. Columns:
    every noise kind of those groups (sym first, as the papers) at each of its rates ("sym 25%"); rows: the header,
    zero-shot CLIP (accuracy only), then one per method, cells as in `table_rows`."""
    sections: dict[tuple, list[Group]] = {}
    for g in groups:
        sections.setdefault((g.dataset, g.shots, g.model), []).append(g)
    out = []
    for (dataset, shots, model), members in sections.items():
        members = sorted(members, key=lambda g: (_KIND_ORDER.index(g.kind) if g.kind in _KIND_ORDER else 99, g.kind))
        columns = [(g, rate) for g in members for rate in g.rates]
        rows = [["Method"] + [f"{g.kind} {rate_label(rate)}" for g, rate in columns]]
        zero_shot = next((g.zero_shot for g in members if g.zero_shot.n), None)
        if metric == "accuracy" and zero_shot is not None:
            rows.append([ZERO_SHOT_NAME] + [f"{zero_shot.mean:.1f}"] * len(columns))
        for loss in sorted({loss for g in members for loss in g.losses}, key=loss_sort_key):
            rows.append([method_name(loss)] + [g.stat(metric, loss, rate).cell() for g, rate in columns])
        shots_label = "all shots" if shots == -1 else f"{shots}-shot"
        out.append((", ".join(str(x) for x in (dataset, shots_label, model) if x), rows))
    return out


def _latex_cell(text: str) -> str:
    text = text.replace("\\", "\\textbackslash{}")
    for char in "&%$#_{}":
        text = text.replace(char, "\\" + char)
    return text.replace(" ± ", " $\\pm$ ")


def write_paper_tables(groups: Sequence[Group], out_dir: str) -> dict[str, str]:
    """Writes results_paper.md, .csv and .tex (test accuracy, `paper_tables`); returns their paths."""
    tables = paper_tables(groups)
    paths = {k: files.join(out_dir, name) for k, name in
             (("paper_md", PAPER_MD), ("paper_csv", PAPER_CSV), ("paper_tex", PAPER_TEX))}
    lines = ["# Test accuracy (%), NLPrompt's Table 1 layout", ""]
    for title, rows in tables:
        lines += [f"## {title}", "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" + "---:|" * (len(rows[0]) - 1)]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]] + [""]
    files.write_text(paths["paper_md"], "\n".join(lines))
    with _csv_file(paths["paper_csv"]) as writer:
        for title, rows in tables:
            writer.writerow(["section"] + rows[0])
            writer.writerows([title] + r for r in rows[1:])
    tex = ["% Test accuracy (%), mean $\\pm$ sample std over seeds; written by dspt_jax.aggregate (needs booktabs)"]
    for title, rows in tables:
        tex += ["\\begin{table}[t]", "\\centering", f"\\caption{{{_latex_cell(title)}}}",
                "\\begin{tabular}{l" + "c" * (len(rows[0]) - 1) + "}", "\\toprule",
                " & ".join(_latex_cell(c) for c in rows[0]) + " \\\\", "\\midrule"]
        tex += [" & ".join(_latex_cell(c) for c in r) + " \\\\" for r in rows[1:]]
        tex += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    files.write_text(paths["paper_tex"], "\n".join(tex))
    return paths


# ---------------------------------------------------------------------------------------------------------
# The robustness curve.


def plot_curve(groups: Sequence[Group], path: str) -> str:
    """Test accuracy (%) against noise rate (%), one line with std error bars per loss and zero-shot CLIP
    as a dashed horizontal line, one panel per group; saved as PNG at `path`."""
    if not groups:
        raise ValueError("no results to plot")
    # The object-oriented API renders with Agg and never touches pyplot's global backend or figure list.
    from matplotlib.figure import Figure

    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig = Figure(figsize=(5.0 * ncols, 3.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    # One colour per loss across all panels, in table order.
    all_losses = sorted({loss for g in groups for loss in g.losses}, key=loss_sort_key)
    colors = {loss: f"C{i % 10}" for i, loss in enumerate(all_losses)}
    for ax, g in zip(axes, groups):
        for loss in g.losses:
            points = [(100 * r, g.accuracy[(loss, r)]) for r in g.rates if (loss, r) in g.accuracy]
            points = [(x, s) for x, s in points if s.mean is not None]
            if not points:
                continue
            ax.errorbar(
                [x for x, _ in points],
                [s.mean for _, s in points],
                yerr=[s.std or 0.0 for _, s in points],
                marker="o",
                capsize=3,
                label=method_name(loss),
                color=colors[loss],
            )
        if g.zero_shot.n:
            ax.axhline(g.zero_shot.mean, color="gray", linestyle="--", label=ZERO_SHOT_NAME)
        ax.set_xticks([100 * r for r in g.rates], [f"{100 * r:g}" for r in g.rates])
        ax.set_title(g.title, fontsize=9)
        ax.set_xlabel("Noise rate (%)")
        ax.set_ylabel("Test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    files.write_bytes(path, png.getvalue())
    return path


def aggregate_dir(root: str, out_dir: str | None = None) -> dict[str, str]:
    """collect + aggregate + write_tables + plot_curve; returns the written paths (keys md, csv, long_csv,
    png). Raises ValueError if `root` holds no results.json."""
    rows = collect(root)
    if not rows:
        raise ValueError(f"no results.json under {root!r}")
    groups = aggregate(rows)
    out_dir = root if out_dir is None else out_dir
    paths = write_tables(groups, out_dir)
    paths.update(write_paper_tables(groups, out_dir))
    paths["png"] = plot_curve(groups, files.join(out_dir, CURVE_PNG))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dspt_jax.aggregate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("root", help="directory searched recursively for results.json files")
    parser.add_argument("--out", default=None, help="output directory (default: ROOT)")
    args = parser.parse_args(argv)
    try:
        paths = aggregate_dir(args.root, args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for key in ("md", "csv", "long_csv", "png"):
        print(paths[key])
    return 0


if __name__ == "__main__":
    sys.exit(main())
