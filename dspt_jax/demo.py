"""Several losses on one setting, side by side: what `configs/demo.py` runs.

A config with a non-empty `compare_losses` makes `python -m dspt_jax.main` run one training per loss (as
sub-workdirs of a one-point sweep, so an interrupted demo resumes and finished losses are skipped), then
print a small table: zero-shot CLIP, then each loss, with clean-test accuracy, macro-F1 and how many of the
flipped (mislabeled) training examples the tuned prompt has fitted.
"""

from __future__ import annotations

import logging

import ml_collections

from dspt_jax import aggregate, files, sweep

log = logging.getLogger("dspt_jax")


class DemoRunsFailed(RuntimeError):
    """Some of the demo's trainings failed. Each failure was logged with its traceback as it happened, so
    the command line prints this message alone (a project error: `dspt_jax.cli.is_refusal`)."""


def format_table(results: dict[str, dict]) -> str:
    """Markdown table from {loss: results.json dict} (all of one setting)."""
    first = next(iter(results.values()))
    noise = first["noise"]
    lines = [
        f"{first['dataset']}, {first['shots']} shots, noise {noise['kind']} {100 * noise['rate']:g}%, "
        f"seed {first['seed']}, model {first['model']}",
        "",
        "| method | clean test accuracy | macro-F1 | flipped training examples fitted |",
        "|---|---|---|---|",
    ]
    zs = first.get("zero_shot")
    if zs:
        lines.append(f"| zero-shot CLIP | {100 * zs['accuracy']:.1f} | {100 * zs['macro_f1']:.1f} | - |")
    for loss, r in results.items():
        train = r.get("train") or {}
        fitted = f"{train['fitted_flipped']}/{train['num_flipped']}" if train.get("num_flipped") else "-"
        lines.append(
            f"| {aggregate.LOSS_NAMES.get(loss, loss)} | {100 * r['final']['accuracy']:.1f} | "
            f"{100 * r['final']['macro_f1']:.1f} | {fitted} |"
        )
    return "\n".join(lines) + "\n"


def run_demo(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
    losses = list(config.compare_losses)
    base = ml_collections.ConfigDict(config.to_dict())
    base.compare_losses = ()
    report = sweep.run_sweep(
        base,
        workdir,
        kinds=[config.noise.kind],
        rates=[config.noise.rate],
        losses=losses,
        seeds=[config.seed],
        aggregate=False,
    )
    if report.failed:
        names = ", ".join(name for name, _ in report.failed)
        raise DemoRunsFailed(f"demo runs failed: {names} (errors above; the same command retries them)")
    points = sweep.make_grid([config.noise.kind], [config.noise.rate], losses, [config.seed])
    results = {p.loss: files.read_json(files.join(workdir, p.name, "results.json")) for p in points}
    table = format_table(results)
    files.write_text(files.join(workdir, "demo_table.md"), table)
    log.info("Results (also in %s):\n\n%s", files.join(workdir, "demo_table.md"), table)
    return results
