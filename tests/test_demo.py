"""The embedded demo, reduced: pretraining (tiny recipe) -> zero-shot, CE and DSPT -> the printed table."""

import json
import os
import sys

from dspt_jax import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_config():
    sys.path.insert(0, os.path.join(REPO, "configs"))
    try:
        import demo as demo_cfg
    finally:
        sys.path.pop(0)
    return demo_cfg.get_config()


def test_reduced_demo_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPT_JAX_CACHE", str(tmp_path / "cache"))
    config = demo_config()
    assert config.model.source == "synthetic" and list(config.compare_losses) == ["ce", "dspt"]
    config.model.source = "synthetic:small"  # seconds of pretraining instead of minutes
    config.max_steps = 4
    config.data.shots = 4
    config.eval_batch_size = 500
    workdir = str(tmp_path / "demo")
    results = demo.run_demo(config, workdir)

    assert list(results) == ["ce", "dspt"]
    # The pretrained CLIP was written in the HF layout and went through load_clip.
    cached = [d for d in os.listdir(tmp_path / "cache" / "synthetic_clip") if not d.endswith(".lock")]
    assert len(cached) == 1
    assert {"config.json", "flax_model.msgpack"} <= set(
        os.listdir(tmp_path / "cache" / "synthetic_clip" / cached[0])
    )
    table = open(os.path.join(workdir, "demo_table.md")).read()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split(" | ")[0] for r in rows] == ["| zero-shot CLIP", "| CoOp (CE)", "| DSPT"]
    for loss, row in zip(["ce", "dspt"], rows[1:]):
        r = json.load(open(os.path.join(workdir, "sym_r0.500", loss, "seed1", "results.json")))
        assert r["loss"] == loss and r["noise"] == {**r["noise"], "kind": "sym", "rate": 0.5}
        assert r["steps"] == 4 and r["final"]["num_examples"] == 1500  # 30 classes x 50 test images
        cells = row.strip("| ").split(" | ")
        assert cells[1] == f"{100 * r['final']['accuracy']:.1f}"
        assert cells[3] == f"{r['train']['fitted_flipped']}/{r['train']['num_flipped']}"
        assert r["train"]["num_flipped"] == 60  # int(0.5 * 4 shots * 30 classes)
    zs = rows[0].strip("| ").split(" | ")
    assert zs[1] == f"{100 * results['ce']['zero_shot']['accuracy']:.1f}"


def test_format_table_by_hand():
    def result(loss, acc, f1, fitted):
        return {
            "dataset": "synthetic",
            "shots": 16,
            "seed": 1,
            "model": "synthetic",
            "loss": loss,
            "noise": {"kind": "sym", "rate": 0.25},
            "zero_shot": {"accuracy": 0.4, "macro_f1": 0.35},
            "final": {"accuracy": acc, "macro_f1": f1},
            "train": {"fitted_flipped": fitted, "num_flipped": 120},
        }

    table = demo.format_table({"ce": result("ce", 0.5, 0.45, 80), "dspt": result("dspt", 0.55, 0.5, 10)})
    assert table.splitlines()[0] == "synthetic, 16 shots, noise sym 25%, seed 1, model synthetic"
    assert "| zero-shot CLIP | 40.0 | 35.0 | - |" in table
    assert "| CoOp (CE) | 50.0 | 45.0 | 80/120 |" in table
    assert "| DSPT | 55.0 | 50.0 | 10/120 |" in table
