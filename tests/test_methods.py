"""Training methods (`config.method`): NLPrompt end to end, its loss by hand, exact resume of its per-epoch
selection, and the refusal of unknown methods."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from dspt_jax import losses, methods, train
from dspt_jax.methods import nlprompt
from test_train import read_jsonl, smoke_config


def test_nlprompt_loss_is_ce_on_the_kept_examples_and_mae_on_the_rest():
    logits = jnp.asarray([[2.0, 0.0, -1.0], [0.5, 0.2, 0.1], [-3.0, 4.0, 0.0]])
    labels = jnp.asarray([0, 2, 1])
    kept = jnp.asarray([True, False, True])
    got = np.asarray(nlprompt.loss(logits, labels, {"ot_clean": kept}))
    p = np.exp(np.asarray(logits, np.float64))
    p /= p.sum(-1, keepdims=True)
    py = p[np.arange(3), np.asarray(labels)]
    np.testing.assert_allclose(got, [-np.log(py[0]), 1 - py[1], -np.log(py[2])], rtol=1e-6)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="config.method must be one of"):
        train.validate_config(smoke_config(method="promptmix"))
    coop = methods.get_method(smoke_config(loss="gce", gce_q=0.7))
    assert coop.key == ("coop", "gce", 0.7) and coop.select is None


NLPROMPT = {"method": "nlprompt", "num_epochs": 3, "noise.rate": 0.5, "log_every_steps": 1,
            "checkpoint_every_steps": 100000}


@pytest.fixture(scope="module")
def nlprompt_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("nlprompt") / "straight")
    return workdir, train.train_and_evaluate(smoke_config(**NLPROMPT), workdir)


def test_nlprompt_runs_end_to_end(nlprompt_run):
    workdir, results = nlprompt_run
    assert results["method"] == "nlprompt" and results["loss"] == "nlprompt"
    selections = results["selections"]
    assert [s["epoch"] for s in selections] == [1, 2, 3]
    flipped = 32 // 2  # toy: 32 training examples, half of them flipped (sym, rate 0.5)
    for s in selections:
        assert s["examples"] == 32 and 0 <= s["selected"] <= 32
        assert s["precision"] is None or 0 <= s["precision"] <= 1
        assert 0 <= s["recall"] <= 1
    assert sorted(os.listdir(os.path.join(workdir, "method"))) == [f"epoch_{e:04d}.npz" for e in range(3)]
    saved = np.load(os.path.join(workdir, "method", "epoch_0000.npz"))
    assert saved["ot_clean"].shape == (32,) and saved["ot_clean"].sum() == selections[0]["selected"]
    # The selection's precision and recall, by hand from the saved mask and the task's labels.
    lines = [l for l in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "selection_selected" in l]
    assert [l["selection_selected"] for l in lines] == [s["selected"] for s in selections]
    assert results["train"]["num_flipped"] == flipped


def test_nlprompt_resumes_exactly_in_the_middle_of_an_epoch(nlprompt_run, tmp_path):
    """Stopped at step 6 (epoch 2 of 4-step epochs) and resumed: the same selections and final prompt as
    the straight run. Epoch 2's selection is read back, not recomputed from the step-6 prompt."""
    straight, results = nlprompt_run
    workdir = str(tmp_path / "resumed")
    first = train.train_and_evaluate(smoke_config(**NLPROMPT, max_steps=6), workdir)
    assert first["steps"] == 6 and len(first["selections"]) == 2
    again = train.train_and_evaluate(smoke_config(**NLPROMPT), workdir)
    assert again["selections"] == results["selections"]
    np.testing.assert_allclose(
        np.load(os.path.join(workdir, "prompt.npz"))["ctx"], np.load(os.path.join(straight, "prompt.npz"))["ctx"],
        rtol=1e-6, atol=1e-7,
    )
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["final"] == results["final"]


def test_the_sweeps_third_axis_takes_methods():
    from dspt_jax import sweep

    assert sweep.objectives(["ce", "dspt"], ["coop", "nlprompt"]) == ["ce", "dspt", "nlprompt"]
    assert sweep.objectives(["ce"], ["nlprompt"]) == ["nlprompt"]
    with pytest.raises(ValueError, match="--methods"):
        sweep.objectives(["ce"], ["coop", "joint"])
    point = sweep.make_grid(["sym"], [0.5], ["nlprompt"], [1])[0]
    config = sweep.point_config(smoke_config(loss="gce"), point)
    assert (point.method, point.name, config.method, config.loss) == (
        "nlprompt", os.path.join("sym_r0.500", "nlprompt", "seed1"), "nlprompt", "gce")
    assert sweep.point_config(smoke_config(method="nlprompt"), sweep.make_grid(["sym"], [0.5], ["ce"], [1])[0]
                              ).method == "coop"


def test_a_vectorized_sweep_of_losses_and_methods(tmp_path):
    """CE and NLPrompt in one vectorized sweep: trained in two programs (runs trained together share a
    method), each point with its own results; the table has a row per method."""
    from dspt_jax import sweep

    base = smoke_config(num_epochs=1, log_every_steps=4)
    report = sweep.run_sweep(base, str(tmp_path), ["sym"], [0.5], sweep.objectives(["ce"], ["coop", "nlprompt"]),
                             [1, 2], vectorize=True)
    assert report.ok and len(report.ran) == 4
    for name in ("ce", "nlprompt"):
        with open(tmp_path / "sym_r0.500" / name / "seed1" / "results.json") as f:
            results = json.load(f)
        assert results["method"] == ("coop" if name == "ce" else "nlprompt") and results["runs_together"] == 2
    table = (tmp_path / "results_table.md").read_text()
    assert "NLPrompt" in table and "CoOp (CE)" in table
