"""The run axis: R runs advanced by one jitted step equal the same R runs stepped alone (each with its own
prompt, optimizer state, batch and loss), on one device and on 8 fake devices; and whole runs trained together
by `train.train_runs` (their own few-shot draws, noise, losses and workdirs) equal the same runs trained one by
one, also after an interruption."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspt_jax import losses, methods, train
from dspt_jax.data import toy
from dspt_jax.models import load_clip
from dspt_jax.models import prompt as prompt_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSSES = ("ce", "dspt", "gce", "mae")


def _setting(image_features: bool, runs: int = 3, batch_size: int = 8):
    """A tiny CLIP, R initial states (prompts of different seeds) and R batches of their own."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_train import smoke_config

    config = smoke_config(**{"optim.warmup_epochs": 0, "optim.lr": 0.05})
    clip = load_clip("random:tiny")
    spec = prompt_lib.build_prompt_spec(toy.classnames(4), n_ctx=4)
    tx, _ = train.make_optimizer(config, steps_per_epoch=5)
    states, batches = [], []
    rng = np.random.default_rng(0)
    for r in range(runs):
        prompt = prompt_lib.init_context(jax.random.key(r), spec, clip.config.text.hidden_size)
        states.append(train.TrainState(
            step=jnp.zeros((), jnp.int32),
            prompt=prompt,
            opt_state=tx.init({"prompt": prompt, "clip": clip.params}),
            first_bad_step=jnp.full((), -1, jnp.int32),
        ))
        batch = {"label": rng.integers(0, 4, size=batch_size).astype(np.int32),
                 "mask": np.arange(batch_size) < batch_size - r}  # different padding per run
        if image_features:
            batch["image_features"] = rng.normal(size=(batch_size, clip.config.projection_dim)).astype(np.float32)
        else:
            batch["image"] = rng.normal(size=(batch_size, 32, 32, 3)).astype(np.float32)
        batches.append(batch)
    return clip, spec, tx, states, batches


def _alone(clip, spec, tx, states, batches, loss_names, steps):
    """Each run by the single-run step with its own loss: final ctx [R, ...] and per-step losses [steps, R]."""
    frozen = clip.token_embeddings(spec.token_ids)
    ctx, step_losses, steps_by_loss = [], [], {}
    for state, batch, name in zip(states, batches, loss_names):
        if name not in steps_by_loss:  # one compile per loss
            steps_by_loss[name] = jax.jit(train.make_train_step(clip.module, spec, losses.get_loss_fn(name), tx))
        step = steps_by_loss[name]
        run_losses = []
        for _ in range(steps):
            state, m = step(state, clip.params, frozen, batch)
            run_losses.append(float(m["loss"]))
        ctx.append(np.asarray(state.prompt["ctx"]))
        step_losses.append(run_losses)
    return np.stack(ctx), np.asarray(step_losses).T


def _together(clip, spec, tx, states, batches, loss_names, steps, stream_ids=None):
    """The runs stepped together; `stream_ids`: run r reads the images of `batches[stream_ids[r]]` (each
    distinct one passed once, as the trainer passes one input stream's images)."""
    frozen = clip.token_embeddings(spec.token_ids)
    runs = train.stack_runs(states)  # one step counter for all
    loss_ids = jnp.asarray([LOSSES.index(n) for n in loss_names], jnp.int32)
    step = jax.jit(train.make_runs_step(clip.module, spec, [methods.plain(losses.get_loss_fn(n)) for n in LOSSES],
                                        tx))
    batch = train._stack(batches)
    if stream_ids is not None:
        streams = sorted(set(stream_ids))
        batch["image"] = batch["image"][jnp.asarray(streams)]
        stream_ids = jnp.asarray([streams.index(s) for s in stream_ids], jnp.int32)
    step_losses = []
    for _ in range(steps):
        runs, m = step(runs, clip.params, frozen, loss_ids, batch, stream_ids)
        assert m["loss"].shape == (len(states),)
        step_losses.append(np.asarray(m["loss"]))
    assert int(runs.step) == steps and runs.first_bad_step.tolist() == [-1] * len(states)
    return np.asarray(runs.prompt["ctx"]), np.asarray(step_losses)


def _assert_close_ctx(got, want):
    """Contexts to 1e-5 of their largest entry: batched and unbatched matmuls round differently (measured:
    3.4e-7 with images, 2.8e-7 with a feature bank, on entries up to 0.30 after 2 steps at lr 0.05); a wrong
    loss or a mixed-up run is off by 1e-3 or more."""
    err, scale = float(np.max(np.abs(got - want))), float(np.max(np.abs(want)))
    assert err <= 1e-5 * scale, (err, scale)


def test_runs_together_equal_runs_alone_with_feature_bank_and_the_same_loss_twice():
    """Four runs (MAE twice, DSPT, CE; different prompts, features, labels and padding) stepped twice together
    equal each stepped alone: losses to rtol 1e-5, contexts to 1e-5 of their scale. (With images, and whole
    runs, in test_train_runs_equal_each_run_alone.)"""
    clip, spec, tx, states, batches = _setting(image_features=True, runs=4)
    names = ("mae", "dspt", "mae", "ce")
    ctx_alone, loss_alone = _alone(clip, spec, tx, states, batches, names, steps=2)
    ctx_together, loss_together = _together(clip, spec, tx, states, batches, names, steps=2)
    np.testing.assert_allclose(loss_together, loss_alone, rtol=1e-5)
    _assert_close_ctx(ctx_together, ctx_alone)


def test_runs_sharing_an_input_stream_equal_runs_alone():
    """Runs 0 and 2 read the same images (one stream, its image tower run once) with their own labels,
    padding and losses; run 1 has its own: stepped together with stream ids [0, 1, 0] they equal each run
    stepped alone on its images, to the tolerances of the test above."""
    clip, spec, tx, states, batches = _setting(image_features=False, runs=3)
    batches[2]["image"] = batches[0]["image"]
    names = ("dspt", "ce", "gce")
    ctx_alone, loss_alone = _alone(clip, spec, tx, states, batches, names, steps=2)
    ctx_together, loss_together = _together(clip, spec, tx, states, batches, names, steps=2, stream_ids=[0, 1, 0])
    np.testing.assert_allclose(loss_together, loss_alone, rtol=1e-5)
    _assert_close_ctx(ctx_together, ctx_alone)
    assert abs(loss_alone[0, 0] - loss_alone[0, 2]) > 1e-3  # the runs sharing images still differ


# On 8 fake CPU devices: the runs' batches split over the devices (their example axis), the R x K prompts'
# classes split too, against the same runs stepped alone on one device in the same process.
SCRIPT = r"""
import json, sys
sys.path.insert(0, "tests")
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from dspt_jax import losses, methods, sharding, train
import test_runs as T

assert jax.device_count() == 8
clip, spec, tx, states, batches = T._setting(image_features=True, runs=3, batch_size=16)
names = ("dspt", "ce", "gce")
ctx_alone, loss_alone = T._alone(clip, spec, tx, states, batches, names, steps=2)
mesh = sharding.make_mesh()
repl = sharding.replicated(mesh)
examples = NamedSharding(mesh, P(None, "data"))
step = jax.jit(
    train.make_runs_step(clip.module, spec, [methods.plain(losses.get_loss_fn(n)) for n in T.LOSSES], tx,
                         class_sharding=sharding.batch_sharding(mesh)),
    in_shardings=(repl, repl, repl, repl, examples), out_shardings=(repl, repl))
runs = train.stack_runs(states)
batch = jax.device_put(train._stack(batches), examples)
loss_ids = jnp.asarray([T.LOSSES.index(n) for n in names], jnp.int32)
frozen = clip.token_embeddings(spec.token_ids)
got = []
for _ in range(2):
    runs, m = step(runs, clip.params, frozen, loss_ids, batch)
    got.append(np.asarray(m["loss"]).tolist())
print(json.dumps({"loss": got, "loss_alone": loss_alone.tolist(),
                  "ctx_err": float(np.max(np.abs(np.asarray(runs.prompt["ctx"]) - ctx_alone))),
                  "ctx_scale": float(np.max(np.abs(ctx_alone)))}))
"""


def test_runs_together_on_eight_devices_equal_runs_alone():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, check=True, capture_output=True,
                         text=True, timeout=600).stdout
    got = json.loads(out.strip().splitlines()[-1])
    np.testing.assert_allclose(got["loss"], got["loss_alone"], rtol=1e-5)
    assert got["ctx_err"] <= 1e-5 * got["ctx_scale"]


# ---------------------------------------------------------------------------------------------------------
# Whole runs: train_runs == train_and_evaluate one by one.

POINTS = [  # (seed, noise kind, rate, loss): what a sweep varies
    (1, "sym", 0.25, "dspt"),
    (2, "sym", 0.5, "ce"),
    (1, "pairflip", 0.25, "gce"),
    (1, "sym", 0.5, "ce"),  # seed 1's sym draw again, other labels: it shares the first point's input stream
]
STREAMS = 3  # seed 1 sym, seed 2 sym, seed 1 pairflip (per-class flips draw other examples)


def _point_config(seed, kind, rate, loss, **overrides):
    sys.path.insert(0, os.path.dirname(__file__))
    from test_train import smoke_config

    return smoke_config(seed=seed, loss=loss, **{"noise.kind": kind, "noise.rate": rate, "zero_shot": False,
                                                 "log_every_steps": 3, **overrides})


def _outputs(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return results, lines, np.load(os.path.join(workdir, "prompt.npz"))["ctx"]


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    base = tmp_path_factory.mktemp("alone")
    out = []
    for i, point in enumerate(POINTS):
        train.train_and_evaluate(_point_config(*point), str(base / f"p{i}"))
        out.append(_outputs(str(base / f"p{i}")))
    return out


def _assert_same_runs(together, alone):
    for (r_t, lines_t, ctx_t), (r_a, lines_a, ctx_a) in zip(together, alone):
        assert r_t["runs_together"] == len(POINTS) and r_a["runs_together"] == 1
        assert r_t["input_streams"] == STREAMS and r_a["input_streams"] == 1
        for key in ("steps", "epochs", "batch_size", "seed", "loss", "dataset"):
            assert r_t[key] == r_a[key], key
        # The same noise setting, and a noise record of the same name (the same labels: its name hashes them).
        noise_t, noise_a = dict(r_t["noise"]), dict(r_a["noise"])
        assert os.path.basename(noise_t.pop("record")) == os.path.basename(noise_a.pop("record"))
        assert noise_t == noise_a
        assert r_t["train"]["num_flipped"] == r_a["train"]["num_flipped"]  # the same noisy labels
        np.testing.assert_allclose([l["loss"] for l in lines_t], [l["loss"] for l in lines_a], rtol=1e-5)
        _assert_close_ctx(ctx_t, ctx_a)
        # Accuracy: the same predictions unless a float-rounding tie flips one test example.
        assert abs(r_t["final"]["accuracy"] - r_a["final"]["accuracy"]) <= 1 / r_a["final"]["num_examples"]


def test_train_runs_equal_each_run_alone_also_after_an_interruption(alone, tmp_path):
    """The four points trained together, stopped at step 6 of 12 and rerun, end as each trained alone."""
    workdirs = [str(tmp_path / f"p{i}") for i in range(len(POINTS))]
    first = train.train_runs([_point_config(*p, max_steps=6) for p in POINTS], workdirs)
    assert [r["steps"] for r in first] == [6] * len(POINTS)
    train.train_runs([_point_config(*p) for p in POINTS], workdirs)
    _assert_same_runs([_outputs(w) for w in workdirs], alone)


def test_runs_that_differ_in_more_than_seed_noise_and_loss_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"run 1 differs from run 0 in optim.lr"):
        train.train_runs([_point_config(*POINTS[0]), _point_config(*POINTS[1], **{"optim.lr": 0.1})],
                         [str(tmp_path / "a"), str(tmp_path / "b")])
