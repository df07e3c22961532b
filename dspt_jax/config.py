"""The trainer's full default config (CoOp's protocol); `configs/*.py` start from it."""

import ml_collections
from ml_collections import config_dict

from dspt_jax.data.config import default_data_config
from dspt_jax.methods import elr, joapr, nlprompt


def default_config() -> ml_collections.ConfigDict:
    """The full config with CoOp's defaults; config files override a few fields."""
    config = ml_collections.ConfigDict()

    # 1, 2, 3 in CoOp's protocol. Drives the few-shot sample, the label noise, the prompt init and the
    # data order. 0 is a seed like any other.
    config.seed = 1
    # dspt (double-softmax CE, the method) | ce (CoOp) | gce | mae | sce | nce_rce | taylor_ce (losses.py)
    config.loss = "dspt"
    # coop: plain prompt tuning with config.loss | nlprompt: NLPrompt's OT purification (config.nlprompt) |
    # joapr: JoAPR's mixture partition, refined labels and mixup (config.joapr) | elr: early-learning
    # regularization (config.elr); see dspt_jax/methods
    config.method = "coop"
    config.nlprompt = nlprompt.default_config()  # used by method=nlprompt only
    config.joapr = joapr.default_config()  # used by method=joapr only
    config.elr = elr.default_config()  # used by method=elr only
    config.gce_q = 0.5

    # Label noise on the few-shot training set (see dspt_jax/data/noise.py and docs/DATA.md):
    # none | sym | asym | sym_incl | symflip | pairflip | matrix | real
    data = default_data_config()
    config.noise = data.noise
    config.data = data
    del config.data["noise"]  # the trainer hands config.noise and config.seed to the data layer
    del config.data["seed"]

    config.model = ml_collections.ConfigDict()
    # The backbone, in one field: an OpenAI model name ("RN50", "RN101", "RN50x4", "ViT-B/16", ...: OpenAI's
    # .pt file in $DSPT_JAX_CLIP_DIR; RN50 is the label-noise papers' backbone), a checkpoint file, a local
    # directory (transformers or open_clip layout), a hub id (read from the local Hugging Face cache),
    # "random:<preset>" (random weights, shapes of `dspt_jax.models.clip.PRESETS`) or "synthetic" (the
    # offline synthetic world's tiny CLIP). See `dspt_jax.model_source` and the README's Backbones.
    config.model.source = "openai/clip-vit-base-patch16"
    config.model.compute_dtype = "float32"  # or "bfloat16": towers only; the loss is always float32
    # How the text tower encodes the K class prompts; none of these changes a result beyond float rounding.
    config.model.shared_prefix = True  # [SOS] + shared context encoded once, class suffixes attend to it
    config.model.shard_classes = True  # with several devices, each encodes about K / devices prompts
    config.model.remat_text = False  # recompute text activations in the backward pass (memory, 1000 classes)

    config.prompt = ml_collections.ConfigDict()
    config.prompt.n_ctx = 16
    config.prompt.csc = False  # class-specific context
    # Words that initialize the context, e.g. "a photo of a". As CoOp ("coop"): the context is exactly those
    # words' tokens (n_ctx becomes their count) and is shared (csc is ignored). "pad": keep n_ctx vectors,
    # the words start the last slots and the others start random; csc makes class-specific copies.
    config.prompt.ctx_init = ""
    config.prompt.ctx_init_mode = "coop"  # coop | pad
    config.prompt.class_token_position = "end"  # end | middle | front

    # CoOp's optimizer: SGD + momentum, L2 weight decay, cosine over epochs after 1 constant warmup epoch.
    config.optim = ml_collections.ConfigDict()
    config.optim.lr = 0.002
    config.optim.momentum = 0.9
    config.optim.weight_decay = 5e-4
    config.optim.warmup_epochs = 1
    config.optim.warmup_lr = 1e-5

    # How training images reach the loss (dspt_jax/features.py): computed (CoOp: the image tower on every
    # augmented batch) | cached (each image encoded once, no augmentation) | views:N (N augmented views of
    # each image encoded once, one drawn per epoch). cached and views:N are protocol changes.
    config.image_features = "computed"

    # None follows CoOp's rule for the shots (`epochs_for_shots`: 50 at 1 shot, 100 at 2 and 4, 200 at 8,
    # 16 and more); a number overrides it. results.json says which rule set it.
    config.num_epochs = config_dict.placeholder(int)
    config.max_steps = config_dict.placeholder(int)  # cut the run short (tests, smoke runs)
    config.batch_size = 32
    config.eval_batch_size = 100

    config.zero_shot = True  # zero-shot CLIP with the dataset's template before training
    config.eval_every_epochs = 0  # 0: only at the end
    config.eval_train = True  # clean-label accuracy and fitted flipped examples on the training set
    config.log_every_steps = 20
    # Non-empty (e.g. ("ce", "dspt")): `dspt_jax.main` trains once per loss on this setting and prints a
    # comparison table (configs/demo.py); `loss` is then ignored.
    config.compare_losses = ()
    config.checkpoint_every_steps = 500
    return config


def epochs_for_shots(shots: int) -> int:
    """CoOp's epochs for a shot count (its `*_ep50` / `*_ep100` / `*_ep200` configs): 50 at 1 shot, 100 at 2
    and 4, 200 at 8 and 16. Shot counts CoOp never used take the rule's next step up (3 -> 100, 5 or more
    -> 200); the whole training split (shots -1) takes 200."""
    if shots == 1:
        return 50
    if 2 <= shots <= 4:
        return 100
    return 200


def resolve_epochs(config: ml_collections.ConfigDict) -> tuple[int, str]:
    """(epochs, rule): config.num_epochs when set, else CoOp's rule for config.data.shots; rule says which."""
    if config.num_epochs is not None:
        return int(config.num_epochs), "config.num_epochs"
    return epochs_for_shots(config.data.shots), f"CoOp's rule for data.shots={config.data.shots}"
