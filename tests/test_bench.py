"""The benchmark runs a tiny case end to end: the table, the whole-run estimate, the PyTorch reference on the
same weights (its first loss must equal ours: both steps compute the same thing), and a parsable JSON line."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_bench(*flags: str) -> subprocess.CompletedProcess:
    """`python -m dspt_jax.bench` on the tiny backbone, batch 8, one step, on the CPU (later flags win); must
    succeed."""
    cmd = [sys.executable, "-m", "dspt_jax.bench", "--backbone=tiny", "--batch_size=8", "--steps=1",
           "--repeats=1", "--peak_size=256", *flags]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_tiny_bench_with_reference_and_estimate():
    proc = _tiny_bench("--estimate=eurosat", "--reference", "--text=shared_prefix,full")
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    cases = summary["cases"]
    assert summary["steps_per_s"] > 0 and summary["device"] and summary["peak_flops_per_device"]["float32"] > 0
    assert {(c["image_features"], c["text"]) for c in cases} == {
        (m, t) for m in ("cached", "computed") for t in ("shared_prefix", "full")
    }
    for c in cases:
        assert c["num_classes"] == 10  # EuroSAT's
        assert c["flops_per_device"] > 0 and 0 < c["fraction_of_peak"]
        assert c["reference"]["steps_per_s"] > 0 and c["speedup_vs_reference"] > 0
        assert c["first_loss_difference"] < 1e-5, c  # same weights, context and batch as the reference
    by = {(c["image_features"], c["text"]): c for c in cases}
    # The shared prefix encodes fewer text tokens for the same step.
    assert by["cached", "shared_prefix"]["text_tokens"] < by["cached", "full"]["text_tokens"]
    assert by["cached", "shared_prefix"]["flops_per_device"] < by["cached", "full"]["flops_per_device"]
    assert by["computed", "full"]["flops_per_device"] > by["cached", "full"]["flops_per_device"]
    estimate = summary["estimate"]
    assert estimate["steps"] == 200 * (10 * 16 // 8)
    assert set(estimate["wall_time_s"]) == {"computed", "cached", "views:10", "views:50"}
    assert "| classes | runs | image features |" in proc.stdout and "Whole 200-epoch" in proc.stdout


def test_runs_trained_together_and_the_grid_estimate():
    """--runs=3: the step of 3 runs trained together (`train.make_runs_step`, 2 input streams), and the
    estimate of a grid of 3 runs in one program beside the single run's."""
    proc = _tiny_bench("--estimate=eurosat", "--runs=3", "--run_streams=2")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    by = {(c["runs"], c["image_features"]): c for c in summary["cases"]}
    assert set(by) == {(r, m) for r in (1, 3) for m in ("cached", "computed")}  # --estimate adds the 1
    for mode in ("cached", "computed"):
        one, three = by[1, mode], by[3, mode]
        assert (one["input_streams"], three["input_streams"]) == (1, 2)
        assert three["text_tokens"] == 3 * one["text_tokens"]
        assert three["run_steps_per_s"] == 3 * three["steps_per_s"] > 0
        assert three["flops_per_device"] > one["flops_per_device"]
        assert 0 < three["first_loss"] < 10  # the first run's: CE over 10 classes from a random prompt
    # Two streams of 8 images through the image tower, not three.
    assert by[3, "computed"]["images_per_s"] == 16 * by[3, "computed"]["steps_per_s"]
    grid = summary["estimate"]["grid_wall_time_s"]["3"]
    assert set(grid) == set(summary["estimate"]["wall_time_s"]) and min(grid.values()) > 0
    assert "A grid of 3 such runs (2 input streams) in one program" in proc.stdout


def test_bad_bench_flags_fail_clearly():
    proc = subprocess.run(
        [sys.executable, "-m", "dspt_jax.bench", "--backbone=vit_h14"], cwd=REPO, capture_output=True, text=True,
        timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert proc.returncode != 0 and "vit_h14" in proc.stderr + proc.stdout


def test_compile_only_reports_per_device_flops_as_strict_json():
    proc = _tiny_bench("--num_classes=10", "--image_features=cached", "--compile_only")

    def no_nan(name):
        raise AssertionError(f"{name} in the JSON line")

    summary = json.loads(proc.stdout.strip().splitlines()[-1], parse_constant=no_nan)
    (case,) = summary["cases"]
    assert case["flops_per_device"] > 0 and case["steps_per_s"] is None and summary["steps_per_s"] is None


def test_resnet_bench_times_the_image_tower():
    proc = _tiny_bench("--backbone=tiny_rn", "--num_classes=10", "--image_tower", "--image_tower_batch=4")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {c["image_features"] for c in summary["cases"]} == {"cached", "computed"}
    assert all(c["steps_per_s"] > 0 for c in summary["cases"])
    assert summary["image_tower"]["float32"]["ms_per_image"] > 0
    assert "image tower alone (tiny_rn, float32, batch 4)" in proc.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "dspt_jax.bench", "--backbone=tiny_rn", "--reference"], cwd=REPO,
        capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert refused.returncode != 0 and "no ResNet image tower" in refused.stderr + refused.stdout
