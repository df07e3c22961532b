"""The aggregator on hand-made results.json files: means, sample stds, table layout, CSV, PNG, errors.

The files are written with the field layout of `dspt_jax.train.train_and_evaluate`; every expected number
is computed by hand in the test.
"""

import csv
import json
import math
import os

import pytest

from dspt_jax import aggregate as agg


def results_dict(
    *,
    dataset="toy",
    kind="sym",
    rate=0.5,
    loss="ce",
    seed=1,
    acc=0.5,
    zs=0.4,
    fitted=None,
    num_flipped=None,
    shots=16,
    epochs=200,
    num_flips=None,
    model="random:tiny",
    eval_train=True,
    image_features=None,
):
    """A results.json as train.py writes it (same keys, same nesting)."""
    num_flipped = int(rate * shots * 4) if num_flipped is None else num_flipped
    fitted_count = 0 if fitted is None else round(fitted * num_flipped)
    train = None
    if eval_train:
        train = {
            "num_examples": shots * 4,
            "accuracy_noisy_labels": 0.5,
            "accuracy_clean_labels": 0.5,
            "num_flipped": num_flipped,
            "fitted_flipped": fitted_count,
            "corrected_flipped": 0,
            "fitted_flipped_fraction": fitted_count / num_flipped if num_flipped else None,
        }
    return {
        "dataset": dataset,
        "num_classes": 4,
        "shots": shots,
        "loss": loss,
        "gce_q": 0.5 if loss == "gce" else None,
        "noise": {"kind": kind, "rate": rate, "num_flips": num_flips, "record": "/x/noise/rec.json"},
        "seed": seed,
        "model": model,
        "prompt": {"class_token_position": "end", "csc": False, "ctx_init": "", "n_ctx": 16},
        "steps": 100,
        "epochs": epochs,
        "zero_shot": None
        if zs is None
        else {
            "accuracy": zs,
            "macro_f1": 0.3,
            "per_class_accuracy": [0.4] * 4,
            "num_examples": 40,
            "template": "a photo of a {}.",
        },
        "final": {"accuracy": acc, "macro_f1": 0.4, "per_class_accuracy": [acc] * 4, "num_examples": 40},
        "epoch_evals": [],
        "train": train,
        "wall_time_s": 12.5,
        **({} if image_features is None else {"image_features": image_features}),
    }


def write(root, rel, **kwargs):
    path = os.path.join(str(root), rel, "results.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results_dict(**kwargs), f, indent=2)
    return path


@pytest.fixture
def sweep_dir(tmp_path):
    """sym noise on "toy": CE and DSPT (3 seeds) at rates 0, 0.125, 0.5; GCE and MAE (1 seed) at 0.5.
    Written in scrambled order so that ordering comes from the aggregator, not the file system."""
    ce = {0.0: (0.80, 0.82, 0.84), 0.125: (0.70, 0.72, 0.77), 0.5: (0.50, 0.60, 0.70)}
    dspt = {0.0: (0.81, 0.81, 0.81), 0.125: (0.79, 0.80, 0.81), 0.5: (0.80, 0.82, 0.87)}
    fitted = {0.125: (0.5, 0.25, 0.75), 0.5: (1.0, 0.75, 0.5)}  # CE only; DSPT fits nothing
    for loss in ("dspt", "ce"):
        for rate in (0.5, 0.0, 0.125):
            for i, seed in enumerate((3, 1, 2)):
                accs = (ce if loss == "ce" else dspt)[rate]
                fit = fitted[rate][seed - 1] if (loss == "ce" and rate) else 0.0
                write(
                    tmp_path,
                    f"sym_r{rate:.3f}/{loss}/seed{seed}",
                    rate=rate,
                    loss=loss,
                    seed=seed,
                    acc=accs[seed - 1],
                    fitted=fit if rate else None,
                )
    write(tmp_path, "sym_r0.500/mae/seed1", rate=0.5, loss="mae", seed=1, acc=0.66, fitted=0.125)
    write(tmp_path, "sym_r0.500/gce/seed1", rate=0.5, loss="gce", seed=1, acc=0.75, fitted=0.25)
    return tmp_path


def test_collect_reads_every_results_file_and_flattens_it(sweep_dir):
    rows = agg.collect(str(sweep_dir))
    assert len(rows) == 2 * 3 * 3 + 2
    row = next(
        r for r in rows if r["path"].endswith(os.path.join("sym_r0.500", "ce", "seed2", "results.json"))
    )
    assert (row["dataset"], row["kind"], row["rate"], row["loss"], row["seed"]) == (
        "toy",
        "sym",
        0.5,
        "ce",
        2,
    )
    assert row["accuracy"] == 0.60 and row["zero_shot_accuracy"] == 0.4
    assert row["fitted_flipped_fraction"] == 0.75 and row["num_flipped"] == 32


def test_means_and_sample_stds_by_hand(sweep_dir):
    (group,) = agg.aggregate(agg.collect(str(sweep_dir)))
    assert (group.dataset, group.kind, group.shots, group.model) == ("toy", "sym", 16, "random:tiny")
    assert group.rates == (0.0, 0.125, 0.5)
    # 50, 60, 70 -> mean 60, sample std sqrt((100 + 0 + 100) / 2) = 10.
    s = group.accuracy[("ce", 0.5)]
    assert s.mean == pytest.approx(60.0, abs=1e-12) and s.std == pytest.approx(10.0, abs=1e-12)
    assert s.n == 3 and s.seeds == (1, 2, 3)
    assert s.cell() == "60.0 ± 10.0"
    # 80, 82, 87 -> mean 83, deviations -3, -1, 4 -> sample var (9 + 1 + 16) / 2 = 13.
    s = group.accuracy[("dspt", 0.5)]
    assert s.mean == pytest.approx(83.0, abs=1e-12) and s.std == pytest.approx(math.sqrt(13.0), abs=1e-12)
    assert s.cell() == "83.0 ± 3.6"
    # 70, 72, 77 -> mean 73, deviations -3, -1, 4 again.
    assert group.accuracy[("ce", 0.125)].cell() == "73.0 ± 3.6"
    # Identical values: std 0, still shown for 3 seeds.
    assert group.accuracy[("dspt", 0.0)].cell() == "81.0 ± 0.0"
    # One seed: the mean alone.
    s = group.accuracy[("gce", 0.5)]
    assert (s.mean, s.std, s.n) == (pytest.approx(75.0), None, 1) and s.cell() == "75.0"
    # Fitted flipped: 100, 75, 50 % -> 75 ± 25; undefined at rate 0 (nothing flipped).
    assert group.fitted_flipped[("ce", 0.5)].cell() == "75.0 ± 25.0"
    assert group.fitted_flipped[("ce", 0.0)].cell() == "-" and group.fitted_flipped[("ce", 0.0)].n == 0
    assert group.zero_shot.mean == pytest.approx(40.0)


def test_table_layout_row_order_and_cells(sweep_dir):
    (group,) = agg.aggregate(agg.collect(str(sweep_dir)))
    assert agg.table_rows(group, "accuracy") == [
        ["Method", "0%", "12.5%", "50%"],
        ["Zero-shot CLIP", "40.0", "40.0", "40.0"],
        ["CoOp (CE)", "82.0 ± 2.0", "73.0 ± 3.6", "60.0 ± 10.0"],
        ["GCE", "-", "-", "75.0"],
        ["MAE", "-", "-", "66.0"],
        ["DSPT", "81.0 ± 0.0", "80.0 ± 1.0", "83.0 ± 3.6"],
    ]
    # No zero-shot row for the training-set metric.
    assert agg.table_rows(group, "fitted_flipped") == [
        ["Method", "0%", "12.5%", "50%"],
        ["CoOp (CE)", "-", "50.0 ± 25.0", "75.0 ± 25.0"],
        ["GCE", "-", "-", "25.0"],
        ["MAE", "-", "-", "12.5"],
        ["DSPT", "-", "0.0 ± 0.0", "0.0 ± 0.0"],
    ]
    with pytest.raises(ValueError, match="unknown metric"):
        agg.table_rows(group, "f1")


def test_markdown_layout(sweep_dir):
    md = agg.format_markdown(agg.aggregate(agg.collect(str(sweep_dir))))
    lines = md.splitlines()
    assert "## toy, sym noise, 16-shot, random:tiny" in lines
    i = lines.index("**Test accuracy (%)**")
    assert lines[i + 2 : i + 5] == [
        "| Method | 0% | 12.5% | 50% |",
        "|---|---:|---:|---:|",
        "| Zero-shot CLIP | 40.0 | 40.0 | 40.0 |",
    ]
    assert lines[i + 5] == "| CoOp (CE) | 82.0 ± 2.0 | 73.0 ± 3.6 | 60.0 ± 10.0 |"
    assert lines[i + 8] == "| DSPT | 81.0 ± 0.0 | 80.0 ± 1.0 | 83.0 ± 3.6 |"
    assert "**Flipped training examples fitted (%)**" in lines
    assert any("ddof=1" in line and "n = 1-3 seed(s)" in line for line in lines)


def test_csv_files_parse_back(sweep_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out"))
    paths = agg.write_tables(agg.aggregate(agg.collect(str(sweep_dir))), out)
    assert paths["md"] == os.path.join(out, "results_table.md") and os.path.getsize(paths["md"]) > 0
    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == [
        "dataset",
        "noise",
        "shots",
        "model",
        "metric",
        "method",
        "0%",
        "12.5%",
        "50%",
    ]
    acc = [r for r in rows if r["metric"] == "accuracy"]
    assert [r["method"] for r in acc] == ["Zero-shot CLIP", "CoOp (CE)", "GCE", "MAE", "DSPT"]
    assert acc[1]["50%"] == "60.0 ± 10.0" and acc[4]["12.5%"] == "80.0 ± 1.0" and acc[2]["0%"] == "-"
    assert len(rows) == 5 + 4
    with open(paths["long_csv"], newline="") as f:
        long = list(csv.DictReader(f))
    (ce50,) = [r for r in long if r["loss"] == "ce" and r["rate"] == "0.5" and r["metric"] == "accuracy"]
    assert float(ce50["mean"]) == pytest.approx(60.0) and float(ce50["std"]) == pytest.approx(10.0)
    assert ce50["n"] == "3" and ce50["seeds"] == "1 2 3" and ce50["method"] == "CoOp (CE)"
    (gce50,) = [r for r in long if r["loss"] == "gce" and r["rate"] == "0.5" and r["metric"] == "accuracy"]
    assert gce50["std"] == "" and float(gce50["mean"]) == pytest.approx(75.0)


def test_png_is_written(sweep_dir, tmp_path_factory):
    path = os.path.join(str(tmp_path_factory.mktemp("plot")), "curve.png")
    assert agg.plot_curve(agg.aggregate(agg.collect(str(sweep_dir))), path) == path
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="no results"):
        agg.plot_curve([], path)


def test_groups_per_dataset_and_kind_and_zero_shot_mean(tmp_path):
    # Zero-shot is averaged over every run of the dataset (and model), whatever the kind: (0.40 + 0.42) / 2.
    write(tmp_path, "a", dataset="toy", kind="sym", rate=0.25, acc=0.5, zs=0.40)
    write(tmp_path, "b", dataset="toy", kind="asym", rate=0.25, acc=0.6, zs=0.42)
    write(tmp_path, "c", dataset="dtd", kind="sym", rate=0.25, acc=0.7, zs=0.30)
    write(tmp_path, "d", dataset="dtd", kind="sym", rate=0.25, loss="dspt", acc=0.8, zs=None)
    groups = agg.aggregate(agg.collect(str(tmp_path)))
    assert [(g.dataset, g.kind) for g in groups] == [("dtd", "sym"), ("toy", "asym"), ("toy", "sym")]
    assert groups[1].zero_shot.mean == pytest.approx(41.0) and groups[2].zero_shot.mean == pytest.approx(41.0)
    assert groups[0].zero_shot.mean == pytest.approx(30.0) and groups[0].zero_shot.n == 1
    assert groups[0].losses == ("ce", "dspt")


def test_no_zero_shot_row_without_zero_shot_runs(tmp_path):
    write(tmp_path, "a", zs=None, acc=0.5)
    (group,) = agg.aggregate(agg.collect(str(tmp_path)))
    assert [r[0] for r in agg.table_rows(group, "accuracy")] == ["Method", "CoOp (CE)"]


def test_per_class_flips_are_tabulated_at_flips_over_shots(tmp_path):
    write(tmp_path, "a", kind="symflip", rate=0.0, num_flips=4, shots=16, acc=0.5)
    (group,) = agg.aggregate(agg.collect(str(tmp_path)))
    assert group.rates == (0.25,)


def test_duplicate_seed_is_an_error(tmp_path):
    write(tmp_path, "run1/ce/seed1", seed=1, acc=0.5)
    write(tmp_path, "copy/ce/seed1", seed=1, acc=0.6)
    with pytest.raises(ValueError, match="duplicate results.*seed=1"):
        agg.aggregate(agg.collect(str(tmp_path)))


def test_mismatched_settings_in_one_cell_are_an_error(tmp_path):
    write(tmp_path, "s1", seed=1, epochs=200)
    write(tmp_path, "s2", seed=2, epochs=50)
    with pytest.raises(ValueError, match="mismatched 'epochs'"):
        agg.aggregate(agg.collect(str(tmp_path)))


def test_different_shots_or_models_are_separate_groups(tmp_path):
    write(tmp_path, "a", shots=16, acc=0.5)
    write(tmp_path, "b", shots=4, acc=0.3)
    write(tmp_path, "c", shots=16, model="openai/clip-vit-base-patch16", acc=0.9)
    groups = agg.aggregate(agg.collect(str(tmp_path)))
    assert sorted((g.shots, g.model, g.accuracy[("ce", 0.5)].mean) for g in groups) == [
        (4, "random:tiny", pytest.approx(30.0)),
        (16, "openai/clip-vit-base-patch16", pytest.approx(90.0)),
        (16, "random:tiny", pytest.approx(50.0)),
    ]


def test_runs_on_cached_image_features_are_a_group_of_their_own(tmp_path):
    write(tmp_path, "a", acc=0.5)  # written before the option existed: CoOp's protocol
    write(tmp_path, "b", acc=0.7, image_features="computed", seed=2)
    write(tmp_path, "c", acc=0.9, image_features="views:10")
    groups = agg.aggregate(agg.collect(str(tmp_path)))
    assert sorted((g.model, g.accuracy[("ce", 0.5)].mean) for g in groups) == [
        ("random:tiny", pytest.approx(60.0)),
        ("random:tiny, image features views:10", pytest.approx(90.0)),
    ]
    assert any("image features views:10" in g.title for g in groups)


def test_bad_files_name_the_path(tmp_path):
    path = write(tmp_path, "a")
    with open(path) as f:
        results = json.load(f)
    del results["final"]
    with open(path, "w") as f:
        json.dump(results, f)
    with pytest.raises(ValueError, match=r"a/results.json.*'final'"):
        agg.collect(str(tmp_path))
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        agg.collect(str(tmp_path))


def test_cli(sweep_dir, tmp_path_factory, capsys):
    out = str(tmp_path_factory.mktemp("cli"))
    assert agg.main([str(sweep_dir), "--out", out]) == 0
    assert sorted(os.listdir(out)) == [
        "results_long.csv",
        "results_paper.csv",
        "results_paper.md",
        "results_paper.tex",
        "results_table.csv",
        "results_table.md",
        "robustness_curve.png",
    ]
    empty = str(tmp_path_factory.mktemp("empty"))
    assert agg.main([empty]) == 1
    assert "no results.json" in capsys.readouterr().err


def test_paper_layout_puts_every_kind_and_rate_in_one_table(tmp_path):
    """NLPrompt's Table 1: one table per dataset, sym then asym columns, zero-shot first, as md, CSV, LaTeX."""
    for kind in ("asym", "sym"):
        for rate in (0.25, 0.5):
            for loss, acc in (("dspt", 0.6), ("ce", 0.5), ("nlprompt", 0.55)):
                for seed in (1, 2):
                    write(tmp_path, f"{kind}_r{rate:.3f}/{loss}/seed{seed}", kind=kind, rate=rate, loss=loss,
                          seed=seed, acc=acc + (0.01 if kind == "sym" else 0) + 0.02 * seed)
    paths = agg.aggregate_dir(str(tmp_path))
    ((title, rows),) = agg.paper_tables(agg.aggregate(agg.collect(str(tmp_path))))
    assert rows[0] == ["Method", "sym 25%", "sym 50%", "asym 25%", "asym 50%"]
    assert [r[0] for r in rows[1:]] == ["Zero-shot CLIP", "CoOp (CE)", "NLPrompt", "DSPT"]
    assert rows[2][1] == "54.0 ± 1.4" and rows[2][3] == "53.0 ± 1.4"  # CE: 0.5 + 0.01 + 0.02 s, s = 1, 2
    assert rows[1][1:] == ["40.0"] * 4
    with open(paths["paper_csv"]) as f:
        parsed = list(csv.reader(f))
    assert parsed[0] == ["section"] + rows[0] and parsed[2] == [title] + rows[2]
    tex = open(paths["paper_tex"]).read()
    assert "sym 25\\% & sym 50\\%" in tex and "54.0 $\\pm$ 1.4" in tex and tex.count("\\toprule") == 1
    assert "| CoOp (CE) | 54.0 ± 1.4 |" in open(paths["paper_md"]).read()


def test_a_bucket_root_gives_the_same_tables(sweep_dir, tmp_path_factory):
    """`aggregate_dir("gs://...")` reads and writes through a local fake of the bucket (tests/fake_bucket.py)
    and writes what it writes for a local directory."""
    import shutil

    from fake_bucket import fake_gcs

    local = agg.aggregate_dir(str(sweep_dir), str(tmp_path_factory.mktemp("local")))
    root = tmp_path_factory.mktemp("gcs")
    shutil.copytree(sweep_dir, root / "bucket" / "sweep")
    with fake_gcs(root) as calls:
        remote = agg.aggregate_dir("gs://bucket/sweep")
    assert calls["open"] >= len(agg.collect(str(sweep_dir))) + len(local)
    assert set(remote) == set(local)
    for key, path in remote.items():
        assert path.startswith("gs://bucket/sweep/")
        got = (root / path[len("gs://"):]).read_bytes()
        want = open(local[key], "rb").read()
        assert got == want, key
