"""The trainer: step arithmetic, freezing, end-to-end runs, resume, multi-device equivalence, config errors."""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspt_jax import config as config_lib
from dspt_jax import losses, metrics, train
from dspt_jax.config import default_config
from dspt_jax.data import toy
from dspt_jax.models import load_clip
from dspt_jax.models import prompt as prompt_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(**overrides):
    sys.path.insert(0, os.path.join(REPO, "configs"))
    try:
        import smoke
    finally:
        sys.path.pop(0)
    config = smoke.get_config()
    for key, value in overrides.items():
        node = config
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return config


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------------------
# Step level.


def _step_setup(loss="dspt", warmup_epochs=0):
    config = smoke_config(loss=loss, **{"optim.warmup_epochs": warmup_epochs})
    clip = load_clip("random:tiny")
    spec = prompt_lib.build_prompt_spec(toy.classnames(4), n_ctx=4)
    prompt = prompt_lib.init_context(jax.random.key(0), spec, clip.config.text.hidden_size)
    tx, schedule = train.make_optimizer(config, steps_per_epoch=5)
    state = train.TrainState(
        step=jnp.zeros((), jnp.int32),
        prompt=prompt,
        opt_state=tx.init({"prompt": prompt, "clip": clip.params}),
        first_bad_step=jnp.full((), -1, jnp.int32),
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(6, 32, 32, 3)).astype(np.float32),
        "label": np.array([0, 1, 2, 3, 0, 1], np.int32),
        "mask": np.array([1, 1, 1, 1, 1, 0], bool),
    }  # the last row is padding
    frozen = clip.token_embeddings(spec.token_ids)
    step = jax.jit(train.make_train_step(clip.module, spec, losses.get_loss_fn(loss), tx), donate_argnums=0)
    return config, clip, spec, state, batch, frozen, step, schedule


def test_train_step_is_sgd_on_the_prompt_only():
    config, clip, spec, state, batch, frozen, step, schedule = _step_setup()
    ctx0 = np.array(state.prompt["ctx"])
    clip_before = jax.tree.map(np.array, clip.params)
    # CLIP has no optimizer state: the leaves are the prompt's momentum trace and the schedule's step count.
    shapes = sorted(x.shape for x in jax.tree.leaves(state.opt_state))
    assert shapes == [(), ctx0.shape]

    # Reference gradient of the masked mean DSPT loss, from the model's public entry points.
    def reference_loss(ctx):
        emb = prompt_lib.assemble(frozen, ctx, spec.ctx_positions)
        txt = clip.module.apply({"params": clip.params}, emb, spec.eot_index, method="encode_text_embeddings")
        img = clip.module.apply({"params": clip.params}, batch["image"], method="encode_image")
        img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
        txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
        logits = jnp.exp(clip.params["logit_scale"]) * img @ txt.T
        per_example = losses.double_softmax_cross_entropy(logits, batch["label"])
        return jnp.sum(per_example * batch["mask"]) / batch["mask"].sum()

    grad = np.asarray(jax.jit(jax.grad(reference_loss))(jnp.asarray(ctx0)))
    new_state, step_metrics = step(state, clip.params, frozen, batch)

    lr = 0.002  # epoch 0 without warmup: cosine at its start
    assert float(schedule(0)) == pytest.approx(lr)
    expected = ctx0 - lr * (grad + config.optim.weight_decay * ctx0)  # first SGD step: momentum trace = g
    np.testing.assert_allclose(new_state.prompt["ctx"], expected, rtol=1e-5, atol=1e-9)
    assert not np.allclose(new_state.prompt["ctx"], ctx0)
    assert float(step_metrics["loss"]) == pytest.approx(float(reference_loss(jnp.asarray(ctx0))), rel=1e-5)
    assert int(new_state.step) == 1 and int(new_state.first_bad_step) == -1
    # CLIP bit-identical.
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, clip.params), clip_before)


def test_nonfinite_loss_is_recorded_with_its_step():
    _, clip, spec, state, batch, frozen, _, _ = _step_setup()
    tx, _ = train.make_optimizer(smoke_config(), steps_per_epoch=5)
    nan_loss = lambda logits, labels: jnp.full(labels.shape, jnp.nan)
    step = jax.jit(train.make_train_step(clip.module, spec, nan_loss, tx))
    state, _ = step(state, clip.params, frozen, batch)
    state, _ = step(state, clip.params, frozen, batch)
    assert int(state.first_bad_step) == 0 and int(state.step) == 2


def test_coop_schedule():
    """Dassl's ConstantWarmupScheduler + CosineAnnealingLR stepped per epoch, with the warmup recount:
    the first epoch after warmup trains at the full lr and the cosine restarts there."""
    config = default_config()
    schedule = train.coop_lr_schedule(config.optim, num_epochs=200, steps_per_epoch=10)
    assert float(schedule(0)) == pytest.approx(1e-5)
    assert float(schedule(9)) == pytest.approx(1e-5)
    assert float(schedule(10)) == pytest.approx(0.002)
    assert float(schedule(29)) == pytest.approx(0.5 * 0.002 * (1 + np.cos(np.pi / 200)))
    assert float(schedule(1999)) == pytest.approx(0.5 * 0.002 * (1 + np.cos(np.pi * 198 / 200)), rel=1e-3)


def test_classification_metrics_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 1, 1, 1, 0, 2])
    m = metrics.classification_metrics(labels, preds, num_classes=4)  # class 3 absent everywhere
    assert m["accuracy"] == pytest.approx(4 / 6)
    # F1: class 0: p=1/2 r=1/2 -> 1/2; class 1: p=2/3 r=1 -> 4/5; class 2: p=1 r=1/2 -> 2/3.
    assert m["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert m["per_class_accuracy"] == [0.5, 1.0, 0.5, None]
    d = metrics.train_set_diagnostics(
        preds=[0, 1, 2, 2], noisy=[0, 1, 2, 0], clean=[0, 2, 2, 2], flipped=[False, True, False, True]
    )
    assert d["fitted_flipped"] == 1 and d["corrected_flipped"] == 1 and d["accuracy_clean_labels"] == 0.75


# ---------------------------------------------------------------------------------------------------------
# End to end.


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("straight"))
    start = time.time()
    results = train.train_and_evaluate(smoke_config(), workdir)
    return workdir, results, time.time() - start


def test_smoke_run_outputs(straight_run):
    workdir, results, _ = straight_run
    on_disk = json.load(open(os.path.join(workdir, "results.json")))
    assert on_disk["final"] == results["final"]
    for field in ("zero_shot", "final", "train", "loss", "noise", "seed", "wall_time_s", "dataset", "steps"):
        assert field in on_disk, field
    assert on_disk["loss"] == "dspt" and on_disk["seed"] == 1 and on_disk["steps"] == 12
    assert on_disk["noise"]["kind"] == "sym" and on_disk["noise"]["rate"] == 0.25
    assert on_disk["final"]["num_examples"] == 40  # every test example, once
    assert len(on_disk["final"]["per_class_accuracy"]) == 4
    assert on_disk["train"]["num_examples"] == 32 and on_disk["train"]["num_flipped"] == 8  # int(0.25 * 32)
    assert json.load(open(os.path.join(workdir, "config.json")))["loss"] == "dspt"
    lines = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [l["step"] for l in lines] == [2, 4, 6, 8, 10, 12]
    assert on_disk["batch_size"] == 8 and on_disk["epochs_completed"] == 3
    assert on_disk["epochs"] == 3 and on_disk["epochs_rule"] == "config.num_epochs"
    assert on_disk["splits"] == {"source": "the splits of toy", "test_as_coop": None, "skipped_images": 0}
    assert on_disk["prompt"]["n_ctx"] == 4 and on_disk["prompt"]["ctx_init_mode"] == "coop"
    assert all({"loss", "lr", "steps_per_sec"} <= set(l) for l in lines)
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    record = os.listdir(os.path.join(workdir, "noise"))
    assert len(record) == 1 and record[0].startswith("toy_train_8shot_sym_r0.250_seed1")
    assert on_disk["noise"]["record"] == os.path.join("noise", record[0])  # relative: the workdir can move
    # Checkpoints hold the prompt, optimizer state and step only: kilobytes.
    ckpt_bytes = sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, fs in os.walk(os.path.join(workdir, "checkpoints"))
        for f in fs
    )
    assert ckpt_bytes < 200_000
    # The prompt moved away from its initialisation.
    spec = prompt_lib.build_prompt_spec(toy.classnames(4), n_ctx=4)
    init = prompt_lib.init_context(jax.random.key(1), spec, 32)["ctx"]
    ctx = np.load(os.path.join(workdir, "prompt.npz"))["ctx"]
    assert ctx.shape == init.shape and not np.allclose(ctx, init)


def test_resume_reaches_the_same_prompt(straight_run, tmp_path):
    straight_dir, _, _ = straight_run
    workdir = str(tmp_path / "resumed")
    first = train.train_and_evaluate(smoke_config(max_steps=6), workdir)  # "interrupted" at step 6
    assert first["steps"] == 6
    resumed = train.train_and_evaluate(smoke_config(), workdir)
    assert resumed["steps"] == 12
    np.testing.assert_allclose(
        np.load(os.path.join(workdir, "prompt.npz"))["ctx"],
        np.load(os.path.join(straight_dir, "prompt.npz"))["ctx"],
        rtol=1e-5,
        atol=1e-7,
    )
    straight = {l["step"]: l["loss"] for l in read_jsonl(os.path.join(straight_dir, "metrics.jsonl"))}
    resumed_lines = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [l["step"] for l in resumed_lines] == sorted(straight)  # each step logged once across the restart
    for line in resumed_lines:
        assert line["loss"] == pytest.approx(straight[line["step"]], rel=1e-5)
    assert resumed["final"]["accuracy"] == pytest.approx(
        json.load(open(os.path.join(straight_dir, "results.json")))["final"]["accuracy"]
    )


@pytest.mark.parametrize("loss", ["ce", "dspt", "gce", "mae"])
def test_every_loss_trains_on_a_separable_problem(tmp_path, loss):
    config = smoke_config(
        loss=loss,
        **{
            "noise.kind": "none",
            "noise.rate": 0.0,
            "prompt.csc": True,
            "data.shots": 16,
            "data.augment": False,
            "batch_size": 16,
            "num_epochs": 8,
            "optim.lr": 0.05,
            "log_every_steps": 4,
            "zero_shot": False,
        },
    )
    results = train.train_and_evaluate(config, str(tmp_path))
    lines = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    first, last = lines[0], lines[-1]  # the first window is the warmup epoch at lr 1e-5
    assert last["loss"] < first["loss"] - 0.01, (loss, first["loss"], last["loss"])
    assert last["train_accuracy"] > first["train_accuracy"] + 0.2, (loss, first, last)
    assert results["train"]["accuracy_clean_labels"] > 0.5  # chance is 0.25


def _run_in_subprocess(workdir, devices, setup="", overrides=None):
    """The smoke config (with `overrides`, after running `setup`) trained on `devices` fake CPU devices."""
    script = (
        "import sys; sys.path.insert(0, 'configs'); sys.path.insert(0, 'tests'); import smoke, jax\n"
        f"assert jax.device_count() == {devices}, jax.devices()\n"
        "from dspt_jax import train\n"
        f"{setup}\n"
        "from test_train import smoke_config\n"
        f"train.train_and_evaluate(smoke_config(**{overrides or {}!r}), {workdir!r})\n"
    )
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=600
    )
    return proc.stdout


def test_eight_devices_match_one(straight_run, tmp_path):
    """Batch sharded over 8 fake CPU devices: the same losses and final prompt as the 1-device run."""
    straight_dir, _, _ = straight_run
    workdir = str(tmp_path / "eight")
    _run_in_subprocess(workdir, 8)
    one = read_jsonl(os.path.join(straight_dir, "metrics.jsonl"))
    eight = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    np.testing.assert_allclose([l["loss"] for l in eight], [l["loss"] for l in one], rtol=1e-5)
    np.testing.assert_allclose(
        np.load(os.path.join(workdir, "prompt.npz"))["ctx"],
        np.load(os.path.join(straight_dir, "prompt.npz"))["ctx"],
        rtol=1e-4,
        atol=1e-6,
    )
    r1 = json.load(open(os.path.join(straight_dir, "results.json")))
    r8 = json.load(open(os.path.join(workdir, "results.json")))
    assert r8["final"]["num_examples"] == r1["final"]["num_examples"] == 40


def test_a_training_set_smaller_than_the_batch_is_padded_not_cut(tmp_path):
    """10 examples, batch 32: one step of all 10 per epoch. 8 devices pad the step to 16 rows and mask 6 out
    (they used to cut it to 8 and drop 2 examples each epoch), so they train exactly as 1 device does."""
    setup = "from dspt_jax.data import toy; toy.register(num_classes=5, name='toy5')"
    overrides = {"data.name": "toy5", "data.shots": 2, "batch_size": 32, "num_epochs": 3, "log_every_steps": 1,
                 "zero_shot": False, "optim.warmup_epochs": 0, "optim.lr": 0.05}
    runs = {}
    for devices in (1, 8):
        workdir = str(tmp_path / f"d{devices}")
        stdout = _run_in_subprocess(workdir, devices, setup, overrides)
        # Called from Python with no logging set up, the trainer still reports its progress.
        assert "step 3/3" in stdout and "Tuned prompt" in stdout, stdout
        runs[devices] = (
            read_jsonl(os.path.join(workdir, "metrics.jsonl")),
            np.load(os.path.join(workdir, "prompt.npz"))["ctx"],
            json.load(open(os.path.join(workdir, "results.json"))),
        )
    (m1, ctx1, r1), (m8, ctx8, r8) = runs[1], runs[8]
    assert r1["batch_size"] == r8["batch_size"] == 10 and r1["steps"] == r8["steps"] == 3
    np.testing.assert_allclose([l["loss"] for l in m8], [l["loss"] for l in m1], rtol=1e-5)
    np.testing.assert_allclose([l["train_accuracy"] for l in m8], [l["train_accuracy"] for l in m1])
    np.testing.assert_allclose(ctx8, ctx1, rtol=1e-4, atol=1e-6)
    assert r8["train"]["num_examples"] == 10


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"loss": "focal"}, "focal"),
        ({"data.name": "imagenet3000"}, "unknown dataset 'imagenet3000'"),
        ({"noise.rate": 1.5}, "1.5"),
        ({"noise.rate": -0.1}, "-0.1"),
        ({"noise.kind": "symmetric"}, "symmetric"),
        ({"prompt.n_ctx": 0}, "n_ctx must be >= 1"),
        (
            {"prompt.ctx_init": "a photo of a very nice", "prompt.ctx_init_mode": "pad"},
            "more than config.prompt.n_ctx=4",
        ),
        ({"prompt.ctx_init": "a photo of a", "prompt.ctx_init_mode": "words"}, "ctx_init_mode must be one of"),
        ({"num_epochs": 0}, "num_epochs must be >= 1"),
        ({"prompt.class_token_position": "start"}, "class_token_position"),
        ({"model.compute_dtype": "float16"}, "compute_dtype"),
    ],
)
def test_bad_config_fails_at_startup(tmp_path, overrides, message):
    workdir = tmp_path / "never"
    start = time.time()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        train.train_and_evaluate(smoke_config(**overrides), str(workdir))
    assert time.time() - start < 5
    assert not workdir.exists()  # failed before writing anything or loading data/weights


def test_missing_model_and_data_are_reported_together(tmp_path, monkeypatch):
    """configs/caltech.py as shipped, on a machine with neither the weights nor the dataset: one error names
    both, with how to get each, before anything is written."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("DATA", raising=False)
    sys.path.insert(0, os.path.join(REPO, "configs"))
    try:
        import caltech
    finally:
        sys.path.pop(0)
    config = caltech.get_config()
    config.data.data_dir = str(tmp_path / "tfds")
    workdir = tmp_path / "never"
    start = time.time()
    with pytest.raises(train.InputsNotFoundError) as err:
        train.train_and_evaluate(config, str(workdir))
    assert time.time() - start < 10
    message = str(err.value)
    assert "2 input(s)" in message
    assert "hf download openai/clip-vit-base-patch16" in message
    assert f"python -m dspt_jax.data.prepare caltech101 --data_dir={tmp_path / 'tfds'}" in message
    assert not workdir.exists()


def test_resuming_a_different_setting_is_refused(straight_run):
    workdir, _, _ = straight_run
    with pytest.raises(ValueError, match=r"different setting \(loss: workdir has 'dspt', this run 'ce'"):
        train.train_and_evaluate(smoke_config(loss="ce"), workdir)


def test_a_bucket_workdir_runs_and_resumes_as_a_local_one(straight_run, tmp_path, monkeypatch):
    """A gs:// workdir through a local fake of the bucket (tests/fake_bucket.py: epath's backend and orbax's
    TensorStore driver mapped to a directory; appending refused, as an object store does). The run,
    interrupted at step 6 and resumed, leaves every file a local run does, with the same prompt and
    metrics as the uninterrupted local run."""
    from fake_bucket import fake_gcs

    monkeypatch.chdir(tmp_path)  # a path mistaken for a local one would appear here as ./gs:/...
    straight_dir, straight_results, _ = straight_run
    with fake_gcs(tmp_path / "gcs") as calls:
        first = train.train_and_evaluate(smoke_config(max_steps=6), "gs://bucket/runs/x")
        resumed = train.train_and_evaluate(smoke_config(), "gs://bucket/runs/x")
    assert first["steps"] == 6 and resumed["steps"] == 12
    assert calls["open"] > 0 and calls["exists"] > 0
    assert sorted(os.listdir(tmp_path)) == ["gcs"]
    bucket = tmp_path / "gcs" / "bucket" / "runs" / "x"
    assert {"config.json", "zero_shot.json", "metrics.jsonl", "prompt.npz", "results.json", "noise",
            "checkpoints"} <= set(os.listdir(bucket))
    assert sorted(os.listdir(bucket / "checkpoints")) == ["12", "8"]
    assert (bucket / "checkpoints" / "12" / "commit_success.txt").exists()  # orbax's commit on a bucket
    np.testing.assert_allclose(np.load(bucket / "prompt.npz")["ctx"],
                               np.load(os.path.join(straight_dir, "prompt.npz"))["ctx"], rtol=1e-5, atol=1e-7)
    straight = read_jsonl(os.path.join(straight_dir, "metrics.jsonl"))
    lines = read_jsonl(bucket / "metrics.jsonl")
    assert [l["step"] for l in lines] == [l["step"] for l in straight]
    for line, want in zip(lines, straight):
        assert line["loss"] == pytest.approx(want["loss"], rel=1e-5)
    on_disk = json.load(open(bucket / "results.json"))
    assert on_disk["final"]["accuracy"] == pytest.approx(straight_results["final"]["accuracy"])
    assert on_disk["noise"]["record"] == straight_results["noise"]["record"]  # relative to the workdir


def test_epochs_follow_the_shots_as_coop():
    """CoOp's configs: rn50_ep50 for 1 shot, rn50_ep100 for 2 and 4, rn50 (200 epochs) for 8 and 16."""
    assert [config_lib.epochs_for_shots(k) for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert [config_lib.epochs_for_shots(k) for k in (3, 5, 32, -1)] == [100, 200, 200, 200]
    config = default_config()
    assert config.num_epochs is None  # the default follows the shots
    config.data.shots = 2
    assert config_lib.resolve_epochs(config) == (100, "CoOp's rule for data.shots=2")
    config.num_epochs = 7  # an explicit number wins
    assert config_lib.resolve_epochs(config) == (7, "config.num_epochs")


def test_training_set_smaller_than_the_batch(tmp_path):
    """1 shot x 4 classes < batch 8: one batch of the whole set per epoch (CoOp's drop_last rule), and
    CoOp's 50 epochs for 1 shot when num_epochs is unset."""
    results = train.train_and_evaluate(
        smoke_config(**{"data.shots": 1, "noise.kind": "none", "noise.rate": 0.0, "zero_shot": False,
                        "num_epochs": None, "max_steps": 3}),
        str(tmp_path),
    )
    assert results["batch_size"] == 4 and results["steps"] == 3  # 3 of the 50 epochs of 1 step
    assert results["epochs"] == 50 and results["epochs_rule"] == "CoOp's rule for data.shots=1"


def test_ctrl_c_saves_a_checkpoint_and_the_run_resumes(tmp_path):
    import signal

    workdir = str(tmp_path / "run")
    cmd = [
        sys.executable,
        "-m",
        "dspt_jax.main",
        "--config=configs/smoke.py",
        f"--workdir={workdir}",
        "--config.num_epochs=400",
        "--config.log_every_steps=1",
        "--config.zero_shot=False",
        "--config.eval_train=False",
        "--config.checkpoint_every_steps=100000",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    for line in proc.stdout:  # wait until training is under way
        if " step 5/" in line:
            break
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=300)[0]
    # The message alone, no traceback, and the exit status of a Ctrl-C.
    assert proc.returncode == 130 and "checkpoint saved" in out and "Traceback" not in out, out[-2000:]
    # Orbax keeps its first step; the other is the step Ctrl-C stopped at, though no periodic save was due.
    stopped = max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert stopped >= 5
    resumed = train.train_and_evaluate(
        smoke_config(
            **{
                "num_epochs": 400,
                "max_steps": stopped + 2,
                "zero_shot": False,
                "eval_train": False,
                "log_every_steps": 1,
                "checkpoint_every_steps": 100000,
            }
        ),
        workdir,
    )
    assert resumed["steps"] == stopped + 2
    steps = [l["step"] for l in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]
    assert steps == list(range(1, stopped + 3))


def test_training_input_is_shut_down_when_training_ends(tmp_path, monkeypatch):
    # The endless training pipeline is closed by the trainer itself (left to garbage collection, its
    # teardown stalled sweeps for up to half a minute after some runs).
    from dspt_jax.data import pipeline

    real, made = pipeline.train_batches, []

    def recording(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(pipeline, "train_batches", recording)
    train.train_and_evaluate(
        smoke_config(**{"zero_shot": False, "eval_train": False, "num_epochs": 1}), str(tmp_path)
    )
    assert len(made) == 1 and made[0].gi_frame is None  # a closed generator has no frame


class _Logged:
    """The dspt_jax log messages emitted inside the block (the trainer's handler keeps whatever stdout it
    first saw, so pytest's capture fixtures may miss them)."""

    def __enter__(self):
        import logging

        self.messages = []
        self._handler = logging.Handler()
        self._handler.emit = lambda record: self.messages.append(record.getMessage())
        logging.getLogger("dspt_jax").addHandler(self._handler)
        return self

    def __exit__(self, *exc):
        import logging

        logging.getLogger("dspt_jax").removeHandler(self._handler)

    @property
    def text(self):
        return "\n".join(self.messages)


def _damage(step_dir):
    """Truncates every file of an orbax checkpoint's data (as a write cut short, or a bad disk, leaves it)."""
    for root, _, files in os.walk(os.path.join(step_dir, "default")):
        for name in files:
            open(os.path.join(root, name), "w").close()


def test_an_unreadable_checkpoint_falls_back_to_the_previous_one(straight_run, tmp_path):
    straight_dir, _, _ = straight_run
    workdir = str(tmp_path / "run")
    quiet = {"zero_shot": False, "eval_train": False, "checkpoint_every_steps": 4}
    train.train_and_evaluate(smoke_config(max_steps=8, **quiet), workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    assert sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit())[-2:] == [4, 8]
    _damage(os.path.join(checkpoints, "8"))
    with _Logged() as logged:
        resumed = train.train_and_evaluate(smoke_config(**quiet), workdir)
    out = logged.text
    assert "Checkpoint of step 8" in out and "the previous one, step 4" in out and "at step 4" in out, out
    assert resumed["steps"] == 12
    np.testing.assert_allclose(np.load(os.path.join(workdir, "prompt.npz"))["ctx"],
                               np.load(os.path.join(straight_dir, "prompt.npz"))["ctx"], rtol=1e-5, atol=1e-7)


def test_no_readable_checkpoint_starts_over(tmp_path):
    workdir = str(tmp_path / "run")
    quiet = {"zero_shot": False, "eval_train": False, "checkpoint_every_steps": 4, "num_epochs": 1}
    train.train_and_evaluate(smoke_config(max_steps=4, **quiet), workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    for step in (d for d in os.listdir(checkpoints) if d.isdigit()):
        _damage(os.path.join(checkpoints, step))
    with _Logged() as logged:
        resumed = train.train_and_evaluate(smoke_config(**quiet), workdir)
    out = logged.text
    assert "No checkpoint in" in out and "starts over from step 0" in out, out
    assert resumed["steps"] == 4


def test_disk_full_is_a_clear_error_and_the_rerun_resumes(tmp_path, monkeypatch):
    """A write that fails with ENOSPC (here the metrics log at step 6, after the step-4 checkpoint) stops the
    run with a message naming the file, the cause and the intact checkpoint; the same command then resumes
    from that checkpoint and finishes."""
    import errno

    from dspt_jax import metrics

    workdir = str(tmp_path / "run")
    quiet = {"zero_shot": False, "eval_train": False, "checkpoint_every_steps": 4, "num_epochs": 2,
             "log_every_steps": 2}
    write = metrics.MetricWriter.write

    def full_disk(self, step, scalars):
        if step >= 6:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(workdir, "metrics.jsonl"))
        return write(self, step, scalars)

    monkeypatch.setattr(metrics.MetricWriter, "write", full_disk)
    with pytest.raises(train.WorkdirNotWritableError) as err:
        train.train_and_evaluate(smoke_config(**quiet), workdir)
    message = str(err.value)
    assert "metrics.jsonl" in message and "No space left on device" in message, message
    assert "last checkpoint, step 4, is intact" in message and "rerun the same command" in message, message
    monkeypatch.setattr(metrics.MetricWriter, "write", write)
    with _Logged() as logged:
        resumed = train.train_and_evaluate(smoke_config(**quiet), workdir)
    assert "at step 4" in logged.text and resumed["steps"] == 8


def test_an_unwritable_workdir_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(train.WorkdirNotWritableError, match="not a writable directory"):
        train.train_and_evaluate(smoke_config(), str(blocker / "run"))


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    """Preemption: SIGTERM stops after the current step, saves it, and exits with 128 + SIGTERM, which the
    launch scripts rerun on; the same command then resumes."""
    import signal

    workdir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "dspt_jax.main", "--config=configs/smoke.py", f"--workdir={workdir}",
           "--config.num_epochs=400", "--config.log_every_steps=1", "--config.zero_shot=False",
           "--config.eval_train=False", "--config.checkpoint_every_steps=100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if " step 3/" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 143 and "Preempted at step" in out and "Traceback" not in out, out[-2000:]
    assert max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()) >= 3


def test_a_checkpoint_with_a_smaller_vocabulary_is_refused(tmp_path):
    """Token ids beyond the checkpoint's vocabulary would read NaN embeddings: a clear error instead."""
    import dataclasses

    from dspt_jax.models import init_clip, save_clip
    from dspt_jax.models.clip import PRESETS

    tiny = PRESETS["tiny"]
    small = dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, vocab_size=500, eos_token_id=499))
    save_clip(init_clip(small), str(tmp_path / "clip"))
    with pytest.raises(ValueError, match="vocabulary of 500 tokens"):
        train.train_and_evaluate(smoke_config(**{"model.source": str(tmp_path / "clip")}), str(tmp_path / "run"))
