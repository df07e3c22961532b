"""How fast is a prompt-tuning step here: `python -m dspt_jax.bench`.

Times the trainer's own jitted train step (`train.make_train_step`: prompt assembly, the text tower over the
K class prompts, the image tower or cached image features, the loss, the SGD update) on real-size backbone
shapes with random weights, so it needs no checkpoint and no data:

  python -m dspt_jax.bench --backbone=vit_b16 --num_classes=100 --image_features=cached,computed
  python -m dspt_jax.bench --reference            # also the PyTorch CoOp step, same shapes and weights
  python -m dspt_jax.bench --estimate=caltech101  # wall time of a whole CoOp run in each feature mode
  python -m dspt_jax.bench --text=shared_prefix,full --dtype=float32,bfloat16   # effect of each option
  python -m dspt_jax.bench --backbone=rn50 --image_tower   # OpenAI's RN50 shapes; image tower alone too
  python -m dspt_jax.bench --runs=1,36 --estimate=caltech101  # also 36 runs in one step (a sweep's grid)

Per case it prints steps/s and images/s (median over `--repeats` timed windows of `--steps` steps, after a
warm-up step; compilation timed apart), the step's FLOPs per device from XLA's cost analysis, the achieved
FLOP/s and its fraction of the device's peak (a large matmul timed in the same process), and memory. The
last line printed is one JSON object: every case, and `steps_per_s` of the last one.

Options of the step (each a comma-separated list; the cases are their product):
  --image_features computed | cached     computed: the image tower runs on the batch every step (CoOp);
                                         cached: precomputed features (`config.image_features`)
  --text shared_prefix | full            the text tower on [SOS] + context once and the K class suffixes
                                         against it, or on K full (cut) sequences
  --dtype float32 | bfloat16             compute dtype of the towers; the loss is float32 either way
  --runs R                               runs trained together by one step (`train.make_runs_step`, as
                                         `sweep --vectorize` does): R prompts, alternately CE and DSPT,
                                         reading `--run_streams` input streams (a grid's seeds)
With several devices the batch is sharded over them and, unless --noshard_classes, so are the K prompts.
`--image_tower` also times the image tower alone (forward, batch `--image_tower_batch`): the cost per image
of feature caches and evaluation, and of every step in `computed` mode.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dspt_jax import losses, methods, sharding, train
from dspt_jax.config import default_config
from dspt_jax.data import classnames as classnames_lib
from dspt_jax.models import prompt as prompt_lib
from dspt_jax.models.clip import PRESETS, CLIPModule
from dspt_jax.models.loading import CLIP, _check_and_unflatten, init_clip, torch_to_flax

# CoOp's datasets for whole-run estimates: classes, test images (CoOp's split), epochs at 16 shots.
ESTIMATES = {
    "caltech101": (100, 2465, 200),
    "oxford_pets": (37, 3669, 200),
    "stanford_cars": (196, 8041, 200),
    "oxford_flowers": (102, 2463, 200),
    "food101": (101, 30300, 200),
    "fgvc_aircraft": (100, 3333, 200),
    "sun397": (397, 19850, 200),
    "dtd": (47, 1692, 200),
    "eurosat": (10, 8100, 200),
    "ucf101": (101, 3783, 200),
    "imagenet": (1000, 50000, 50),
}
SHOTS = 16

FLAGS = flags.FLAGS
flags.DEFINE_string("backbone", "vit_b16", f"one of {sorted(PRESETS)} (OpenAI's shapes, random weights)")
flags.DEFINE_list("num_classes", ["100"], "class counts (e.g. 10,100,1000)")
flags.DEFINE_integer("batch_size", 32, "training batch (CoOp: 32)")
flags.DEFINE_list("image_features", ["cached", "computed"], "computed | cached")
flags.DEFINE_list("text", ["shared_prefix"], "shared_prefix | full")
flags.DEFINE_list("dtype", ["float32"], "float32 | bfloat16")
flags.DEFINE_string("loss", "dspt", "dspt | ce (the reference knows these two)")
flags.DEFINE_list("runs", ["1"], "runs trained together by one step (e.g. 1,36: a 6 rates x 3 seeds x 2 "
                  "losses grid); R > 1 alternates CE and DSPT")
flags.DEFINE_integer("run_streams", 3, "input streams of R > 1 runs (a sweep's seeds: runs of one seed "
                     "share their images), at most R")
flags.DEFINE_integer("n_ctx", 16, "context vectors (CoOp: 16)")
flags.DEFINE_integer("steps", 3, "steps per timed window")
flags.DEFINE_integer("repeats", 3, "timed windows per case (the median is reported)")
flags.DEFINE_bool("remat_text", False, "recompute text activations in the backward pass")
flags.DEFINE_bool("shard_classes", True, "shard the class prompts over the devices (with several)")
flags.DEFINE_bool("reference", False, "also time the PyTorch CoOp step (benchmarks/torch_coop_step.py)")
flags.DEFINE_bool("compile_only", False, "FLOPs and memory of the compiled step only: nothing runs "
                  "(shapes that would not fit, per-device costs of a mesh)")
flags.DEFINE_string("estimate", "", f"whole-run wall time of a 16-shot CoOp run on one of {sorted(ESTIMATES)}")
flags.DEFINE_bool("image_tower", False, "also time the image tower alone (forward): ms per image")
flags.DEFINE_integer("image_tower_batch", 32, "images per forward pass of --image_tower")
flags.DEFINE_integer("peak_size", 0, "matmul size for the peak (0: 2048 on CPU, 8192 on accelerators)")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
IMAGE_FEATURE_MODES = ("computed", "cached")
TEXT_PATHS = ("shared_prefix", "full")



def class_names(k: int) -> list[str]:
    """K real class names (Caltech101's up to 100, ImageNet's beyond), so prompts have real lengths."""
    pool = classnames_lib.CALTECH101 if k <= len(classnames_lib.CALTECH101) else classnames_lib.IMAGENET
    return [pool[i % len(pool)] + ("" if i < len(pool) else f" {i // len(pool)}") for i in range(k)]


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_flops(dtype, size: int = 0) -> float:
    """FLOP/s of a jitted [n, n] @ [n, n] matmul on the default device: the practical peak."""
    n = size or (2048 if jax.default_backend() == "cpu" else 8192)
    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    return 2 * n**3 / _median_seconds(lambda: mm(a).block_until_ready(), 5)


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost or {}


def _memory(compiled) -> dict:
    out = {}
    try:
        m = compiled.memory_analysis()
        out["compiled_temp_mb"] = m.temp_size_in_bytes / 2**20
        out["compiled_args_mb"] = m.argument_size_in_bytes / 2**20
    except Exception:  # not every backend reports it
        pass
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
    return out


def make_batch(clip_config, k: int, batch_size: int, image_features: str, seed: int = 0, runs: int = 0,
               streams: int = 1) -> dict:
    """A random training batch: labels, mask, and images (`computed`) or image features (`cached`). With
    `runs` > 0, the batch of that many runs trained together: labels and mask [runs, B], the images of
    `streams` input streams [streams, B, ...] (`train.make_runs_step`)."""
    if image_features not in IMAGE_FEATURE_MODES:
        raise ValueError(f"--image_features: {image_features!r} is not one of {IMAGE_FEATURE_MODES}")
    rng = np.random.default_rng(seed)
    lead, images = ((runs,), (streams,)) if runs else ((), ())
    batch = {"label": rng.integers(0, k, (*lead, batch_size)).astype(np.int32),
             "mask": np.ones((*lead, batch_size), bool)}
    if image_features == "computed":
        size = clip_config.vision.image_size
        batch["image"] = rng.normal(size=(*images, batch_size, size, size, 3)).astype(np.float32)
    else:
        batch["image_features"] = rng.normal(size=(*images, batch_size, clip_config.projection_dim)).astype(
            np.float32)
    return batch


def _initial_state(clip: CLIP, tx, ctx) -> train.TrainState:
    prompt = {"ctx": jnp.asarray(ctx, jnp.float32)}
    return train.TrainState(
        step=jnp.zeros((), jnp.int32),
        prompt=prompt,
        opt_state=tx.init({"prompt": prompt, "clip": clip.params}),
        first_bad_step=jnp.full((), -1, jnp.int32),
    )


def make_case(clip: CLIP, batch: dict, k: int, text: str, *, n_ctx: int = 16, loss: str = "dspt",
              remat_text: bool = False, shard_classes: bool = True, ctx=None, seed: int = 0):
    """The trainer's step, jitted with its shardings, and its arguments: (step, args, spec).

    A batch of several runs (`make_batch(runs=R)`: labels [R, B]) gives the step of R runs trained together
    instead (`train.make_runs_step`, jitted as `train.jit_runs_step` does): each run its own initial context,
    alternately CE and DSPT (one program, the loss picked per run; `loss` and `ctx` are for one run), run r
    reading input stream r % S of the batch's S."""
    if text not in TEXT_PATHS:
        raise ValueError(f"--text: {text!r} is not one of {TEXT_PATHS}")
    mesh = sharding.make_mesh()
    sharding.check_batch_size(batch["label"].shape[-1], mesh)
    repl, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    spec = prompt_lib.build_prompt_spec(class_names(k), n_ctx)
    module = CLIPModule(clip.config, dtype=clip.dtype, remat_text=remat_text)
    tx, _ = train.make_optimizer(default_config(), steps_per_epoch=50)
    text_options = dict(shared_prefix=text == "shared_prefix",
                        class_sharding=data if shard_classes and mesh.devices.size > 1 else None)
    clip_args = (jax.device_put(clip.params, repl), jax.device_put(clip.token_embeddings(spec.token_ids), repl))

    def context(s):
        return prompt_lib.init_context(jax.random.key(s), spec, clip.config.text.hidden_size)["ctx"]

    if batch["label"].ndim == 1:
        state = _initial_state(clip, tx, context(seed) if ctx is None else ctx)
        step = jax.jit(train.make_train_step(module, spec, losses.get_loss_fn(loss), tx, **text_options),
                       in_shardings=(repl, repl, repl, data), out_shardings=(repl, repl), donate_argnums=(0,))
        return step, (jax.device_put(state, repl), *clip_args, sharding.to_global(batch, mesh)), spec
    runs = len(batch["label"])
    streams = len(batch["image" if "image" in batch else "image_features"])
    objectives = [methods.plain(losses.get_loss_fn(name)) for name in ("ce", "dspt")]
    state = train.stack_runs([_initial_state(clip, tx, context(seed + r)) for r in range(runs)])
    examples = sharding.run_batch_sharding(mesh)
    step = jax.jit(train.make_runs_step(module, spec, objectives, tx, **text_options),
                   in_shardings=(repl, repl, repl, repl, examples, repl), out_shardings=(repl, repl),
                   donate_argnums=(0,))
    args = (
        jax.device_put(state, repl),
        *clip_args,
        jax.device_put(jnp.arange(runs, dtype=jnp.int32) % len(objectives), repl),
        sharding.to_global(batch, mesh, examples),
        jax.device_put(jnp.arange(runs, dtype=jnp.int32) % streams, repl),
    )
    return step, args, spec


def time_case(step, args, steps: int, repeats: int, compile_only: bool = False) -> dict:
    """Compiles (timed), runs one warm-up step, then times `repeats` windows of `steps` steps. With
    `compile_only`, only the compiled program's FLOPs and memory: no step runs."""
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    flops = float(_cost(compiled).get("flops", float("nan")))
    if compile_only:
        nan = float("nan")
        return {"compile_s": compile_s, "step_s": nan, "steps_per_s": nan, "flops_per_device": flops,
                "first_loss": nan, **_memory(compiled)}
    state, rest = args[0], args[1:]
    state, m = compiled(state, *rest)
    first_loss = float(np.ravel(m["loss"])[0])  # of the first run, with several

    def window():
        nonlocal state
        for _ in range(steps):
            state, _ = compiled(state, *rest)
        state.step.block_until_ready()

    seconds = _median_seconds(window, repeats) / steps
    return {
        "compile_s": compile_s,
        "step_s": seconds,
        "steps_per_s": 1 / seconds,
        "flops_per_device": flops,
        "first_loss": first_loss,
        **_memory(compiled),
    }


def image_encode_rate(clip: CLIP, batch_size: int = 100) -> float:
    """Images/s of the image tower alone (forward, evaluation batch): feature caches and evaluation."""
    mesh = sharding.make_mesh()
    n = -(-batch_size // mesh.devices.size) * mesh.devices.size
    size = clip.config.vision.image_size
    pixels = sharding.to_global({"x": np.zeros((n, size, size, 3), np.float32)}, mesh)["x"]
    enc = jax.jit(lambda p, x: clip.module.apply({"params": p}, x, method="encode_image"))
    params = jax.device_put(clip.params, sharding.replicated(mesh))
    enc(params, pixels).block_until_ready()
    return n / _median_seconds(lambda: enc(params, pixels).block_until_ready(), 3)


def load_reference():
    """benchmarks/torch_coop_step.py of this checkout (it needs torch and transformers)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                        "torch_coop_step.py")
    if not os.path.exists(path):
        raise SystemExit(f"--reference needs {path}: run the bench from a checkout of the repository.")
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"--reference needs torch and transformers ({e}): pip install -e '.[test]'") from e
    spec = importlib.util.spec_from_file_location("torch_coop_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_case(ref_module, clip_config, k: int, batch: dict, image_features: str, dtype: str,
                   steps: int, repeats: int, loss: str, n_ctx: int, seed: int = 0):
    """The PyTorch CoOp step on the same shapes: (timings, its CLIP as our params, its initial context)."""
    import torch

    from dspt_jax import tokenizer as tok_lib

    prompts = [" ".join(["X"] * n_ctx) + f" {name}." for name in class_names(k)]
    ctx = 0.02 * np.random.default_rng(seed).normal(size=(n_ctx, clip_config.text.hidden_size))
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    # On a GPU the reference runs on it too (when torch sees one).
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    ref = ref_module.CoOpStep(clip_config.to_hf_dict(), tok_lib.tokenize(prompts), ctx.astype(np.float32),
                              loss=loss, dtype=torch_dtype, seed=seed, device=device)
    params = _check_and_unflatten(torch_to_flax(ref.state_dict_numpy()), clip_config, "the reference")
    kwargs = {"labels": batch["label"]}
    if image_features == "computed":
        kwargs["images"] = batch["image"]
    else:
        kwargs["image_features"] = batch["image_features"]
    first_loss = ref.step(**kwargs)  # warm-up; its loss is checked against ours
    seconds = _median_seconds(lambda: [ref.step(**kwargs) for _ in range(steps)], repeats) / steps
    return {"step_s": seconds, "steps_per_s": 1 / seconds, "first_loss": first_loss, "device": device}, params, ctx


def _fmt(x, spec=".3g"):
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def main(argv):
    del argv
    if FLAGS.backbone not in PRESETS:
        raise app.UsageError(f"--backbone={FLAGS.backbone!r}: one of {sorted(PRESETS)}")
    for name in FLAGS.dtype:
        if name not in DTYPES:
            raise app.UsageError(f"--dtype={name!r}: one of {sorted(DTYPES)}")
    if FLAGS.reference and PRESETS[FLAGS.backbone].is_resnet:
        raise app.UsageError(
            f"--reference is transformers' CLIPModel, which has no ResNet image tower: it times ViT backbones "
            f"only (--backbone={FLAGS.backbone})")
    if FLAGS.compile_only and (FLAGS.reference or FLAGS.estimate):
        raise app.UsageError("--compile_only times nothing: it goes with neither --reference nor --estimate")
    if FLAGS.estimate and FLAGS.estimate not in ESTIMATES:
        raise app.UsageError(f"--estimate={FLAGS.estimate!r}: one of {sorted(ESTIMATES)}")
    run_counts = [int(r) for r in FLAGS.runs]
    if min(run_counts) < 1 or FLAGS.run_streams < 1:
        raise app.UsageError(f"--runs={FLAGS.runs} and --run_streams={FLAGS.run_streams} must be >= 1")
    if FLAGS.estimate and 1 not in run_counts:
        run_counts = [1, *run_counts]  # the whole-run estimate is of one run
    ref_module = load_reference() if FLAGS.reference else None
    nums = [int(k) for k in FLAGS.num_classes]
    modes = list(FLAGS.image_features)
    if FLAGS.estimate:  # the estimate needs both modes at the dataset's class count
        nums = [ESTIMATES[FLAGS.estimate][0]]
        modes = list(IMAGE_FEATURE_MODES)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} x{jax.device_count()} ({jax.default_backend()}), jax {jax.__version__}, "
          f"backbone {FLAGS.backbone} (random weights), batch {FLAGS.batch_size}, n_ctx {FLAGS.n_ctx}, "
          f"loss {FLAGS.loss}", flush=True)
    peaks = {name: peak_flops(DTYPES[name], FLAGS.peak_size) for name in FLAGS.dtype}
    for name, p in peaks.items():
        print(f"matmul peak ({name}): {p / 1e9:.1f} GFLOP/s per device", flush=True)

    cases, clips, references = [], {}, {}
    header = ("| classes | runs | image features | text | dtype | steps/s | images/s | compile s | GFLOP/step/dev "
              "| GFLOP/s | % of peak | temp MB | reference steps/s | ours / reference |")
    rows = []
    for k, runs, mode, text, dtype in itertools.product(nums, run_counts, modes, FLAGS.text, FLAGS.dtype):
        ref_result, ctx = None, None
        clip = _random_clip(clips, dtype)
        streams = run_streams(runs)
        batch = make_batch(clip.config, k, FLAGS.batch_size, mode, runs=runs if runs > 1 else 0, streams=streams)
        if ref_module is not None and runs == 1:
            # Its random CLIP and context become ours, so both steps start from the same loss. Timed once
            # per (classes, image features, dtype): our text options do not change it.
            if (k, mode, dtype) not in references:
                references[k, mode, dtype] = reference_case(ref_module, clip.config, k, batch, mode, dtype,
                                                            FLAGS.steps, FLAGS.repeats, FLAGS.loss, FLAGS.n_ctx)
            ref_result, params, ctx = references[k, mode, dtype]
            clip = CLIP(clip.config, params, DTYPES[dtype], source="reference")
        step, args, spec = make_case(clip, batch, k, text, n_ctx=FLAGS.n_ctx, loss=FLAGS.loss,
                                     remat_text=FLAGS.remat_text, shard_classes=FLAGS.shard_classes, ctx=ctx)
        r = time_case(step, args, FLAGS.steps, FLAGS.repeats, FLAGS.compile_only)
        achieved = r["flops_per_device"] * r["steps_per_s"]
        case = {
            "backbone": FLAGS.backbone, "num_classes": k, "batch_size": FLAGS.batch_size,
            "image_features": mode, "text": text, "dtype": dtype, "devices": jax.device_count(),
            "runs": runs, "input_streams": streams,
            "text_tokens": runs * prompt_lib.text_tokens(spec, shared_prefix=text == "shared_prefix"),
            **r,
            "run_steps_per_s": runs * r["steps_per_s"],
            "images_per_s": r["steps_per_s"] * FLAGS.batch_size * streams,
            "flops_per_s_per_device": achieved,
            "fraction_of_peak": achieved / peaks[dtype],
        }
        if ref_result is not None:
            case["reference"] = ref_result
            case["speedup_vs_reference"] = r["steps_per_s"] / ref_result["steps_per_s"]
            case["first_loss_difference"] = abs(r["first_loss"] - ref_result["first_loss"])
        cases.append(case)
        rows.append(
            f"| {k} | {runs} | {mode} | {text} | {dtype} | {_fmt(case['steps_per_s'])} | {_fmt(case['images_per_s'])} "
            f"| {_fmt(r['compile_s'])} | {_fmt(r['flops_per_device'] / 1e9)} | {_fmt(achieved / 1e9)} "
            f"| {_fmt(100 * case['fraction_of_peak'], '.1f')} | {_fmt(r.get('compiled_temp_mb'), '.0f')} "
            f"| {_fmt(ref_result and ref_result['steps_per_s'])} "
            f"| {_fmt(case.get('speedup_vs_reference'), '.2f')} |"
        )
        print(rows[-1] if len(rows) > 1 else header + "\n|" + "---|" * 14 + "\n" + rows[-1], flush=True)
        if ref_result is not None:
            print(f"  first-step loss: ours {r['first_loss']:.6f}, reference {ref_result['first_loss']:.6f}",
                  flush=True)

    image_tower = {}
    if FLAGS.image_tower and not FLAGS.compile_only:
        for dtype in FLAGS.dtype:
            rate = image_encode_rate(_random_clip(clips, dtype), FLAGS.image_tower_batch)
            image_tower[dtype] = {"images_per_s": rate, "ms_per_image": 1e3 / rate}
            print(f"image tower alone ({FLAGS.backbone}, {dtype}, batch {FLAGS.image_tower_batch}): "
                  f"{1e3 / rate:.1f} ms per image, {rate:.2f} images/s", flush=True)

    # JSON has no NaN: what was not measured (--compile_only) is null.
    cases = [{k: None if isinstance(v, float) and np.isnan(v) else v for k, v in c.items()} for c in cases]
    summary = {"device": device.device_kind, "platform": jax.default_backend(), "devices": jax.device_count(),
               "peak_flops_per_device": peaks, "cases": cases, "steps_per_s": cases[-1]["steps_per_s"]}
    if image_tower:
        summary["image_tower"] = image_tower
    if FLAGS.estimate:
        summary["estimate"] = estimate(FLAGS.estimate, cases, _random_clip(clips, FLAGS.dtype[-1]))
    print(json.dumps(summary))


def run_streams(runs: int) -> int:
    """Input streams of `runs` runs trained together (1 for one run)."""
    return min(runs, FLAGS.run_streams)


def _random_clip(clips: dict, dtype: str) -> CLIP:
    if dtype not in clips:
        clips[dtype] = init_clip(PRESETS[FLAGS.backbone], rng=0, dtype=DTYPES[dtype])
    return clips[dtype]


def estimate(name: str, cases: list[dict], clip: CLIP) -> dict:
    """Wall time of a whole 16-shot CoOp run (train + zero-shot, final and train-set evaluation) in each
    image-feature mode, from the measured steps and the image tower's throughput."""
    k, test, epochs = ESTIMATES[name]
    train_size = k * SHOTS
    steps = epochs * (train_size // FLAGS.batch_size)
    rate = image_encode_rate(clip)

    def wall_times(runs: int) -> dict:
        # The step times of the first --text and --dtype given, for `runs` runs per step.
        step_s = {c["image_features"]: c["step_s"] for c in cases
                  if (c["text"], c["dtype"], c["runs"]) == (FLAGS.text[0], FLAGS.dtype[0], runs)}
        # Evaluation encodes the test split once (zero-shot and final share it, and so do runs trained
        # together) and each input stream's training set once (the `cached` features are those very ones).
        streams = run_streams(runs)
        return {
            "computed": steps * step_s["computed"] + (test + streams * train_size) / rate,
            "cached": steps * step_s["cached"] + (test + streams * train_size) / rate,
            **{f"views:{n}": steps * step_s["cached"] + (test + streams * (n + 1) * train_size) / rate
               for n in (10, 50)},
        }

    out = {"dataset": name, "classes": k, "train_images": train_size, "test_images": test, "epochs": epochs,
           "steps": steps, "image_encode_per_s": rate,
           "wall_time_s": wall_times(1)}
    print(f"\nWhole {epochs}-epoch {SHOTS}-shot CoOp run on {name} ({k} classes, {steps} steps of "
          f"{FLAGS.batch_size}, {test} test images; image tower {rate:.1f} images/s), {FLAGS.text[0]}, "
          f"{FLAGS.dtype[0]}:")
    for mode, seconds in out["wall_time_s"].items():
        print(f"  {mode:10s} {seconds / 60:8.2f} min")
    grids = sorted({c["runs"] for c in cases} - {1})
    if grids:
        out["grid_wall_time_s"] = {}
    for runs in grids:
        # A sweep's grid of `runs` points in one program (`sweep --vectorize`), against one after another.
        together = wall_times(runs)
        out["grid_wall_time_s"][str(runs)] = together
        print(f"A grid of {runs} such runs ({run_streams(runs)} input streams) in one program, against one "
              "after another:")
        for mode, seconds in together.items():
            print(f"  {mode:10s} {seconds / 60:8.2f} min  ({runs * out['wall_time_s'][mode] / 60:.2f} min)")
    return out


if __name__ == "__main__":
    app.run(main)
