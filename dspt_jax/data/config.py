"""Defaults of the data config (the trainer's ``config.data``).

Every field is documented here and in docs/DATA.md. Fields that may stay unset are typed placeholders,
so a command-line override such as ``--config.data.folder=/data/mine`` keeps its type.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

# CLIP's input normalization (OpenAI's), shared by the tf.data pipeline and the synthetic world's pretraining.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def default_data_config() -> ml_collections.ConfigDict:
    """The full data config with CoOp's defaults (Caltech101, 16 shots, seed 1, 224 px)."""
    return ml_collections.ConfigDict(
        {
            # Registry name (see dspt_jax.data.datasets.DATASETS), or "folder" / "csv" for your own data.
            "name": "caltech101",
            # tfds data_dir; None means tfds' default (~/tensorflow_datasets or $TFDS_DATA_DIR).
            "data_dir": config_dict.placeholder(str),
            # Only when True may tfds download and prepare a missing dataset (never the default:
            # a missing dataset fails fast and says how to prepare it offline).
            "download": False,
            # K images per class (CoOp: 1, 2, 4, 8, 16); -1 keeps the whole training split.
            "shots": 16,
            # Seed of the few-shot sample, the validation sample and the label noise (0 is a seed too).
            "seed": 1,
            # Side of the square CLIP input.
            "image_size": 224,
            # Train-time random resized crop + horizontal flip (CoOp's); False: resize + center crop.
            "augment": True,
            # Area range of the random resized crop (CoOp/Dassl default (0.08, 1.0)).
            "crop_scale": (0.08, 1.0),
            # CoOp's split_zhou_<Name>.json: train/val/test become exactly CoOp's. "auto": CoOp's file where
            # CoOp's layout puts it, <coop_root>/<dataset folder>/split_zhou_<Name>.json, when it exists (with
            # CoOp's image folder beside it, when data.folder is unset); else the dataset's own splits.
            # None: never a split file.
            "split_file": "auto",
            # CoOp's data root ($DATA in CoOp's DATASETS.md) where split_file="auto" looks; None: the
            # environment variable DATA.
            "coop_root": config_dict.placeholder(str),
            # Image root: CoOp's image folder (with split_file), your own class folders (name="folder"),
            # the Food-101N root (name="food101n"), or the base of relative CSV paths (name="csv").
            "folder": config_dict.placeholder(str),
            # How logs, results.json and sweep tables name your own data (name="folder" / "csv"); None: the
            # folder's name / the CSV's file name without extension.
            "display_name": config_dict.placeholder(str),
            # CSV of path,label[,clean_label][,split] for your own data with its own noisy labels.
            "csv": config_dict.placeholder(str),
            # Noisy label column of CIFAR-10N / CIFAR-100N (e.g. "worse_label", "aggre_label",
            # "random_label1"; "noise_label" for CIFAR-100N). None: the dataset's default column.
            "label_column": config_dict.placeholder(str),
            # Seed of the fixed train/val/test carve for data without a test split (CoOp's 50/20/30 rule).
            "split_seed": 0,
            # Image files of your own data (name="folder" / "csv") that cannot be read (missing, empty,
            # truncated, not an image): "fail" stops the run before it writes anything, naming each file;
            # "skip" leaves them out and logs each one with the count. Either way every file is decoded
            # once by the start-up check (the result is cached by file name, size and mtime). Grey-scale,
            # CMYK, 16-bit and palette images are readable: they are converted to 8-bit RGB.
            "bad_images": "fail",
            "noise": {
                # none | sym | asym | sym_incl | symflip | pairflip | matrix | real
                "kind": "none",
                "rate": 0.0,
                # F flipped shots per class for symflip / pairflip (default int(rate * shots)).
                "num_flips": config_dict.placeholder(int),
                # [K, K] row-stochastic matrix for kind "matrix".
                "transition": config_dict.placeholder(object),
                # A dataset with its own noisy labels (cifar10n, cifar100n, food101n, csv, arrays with
                # clean labels) refuses the synthetic kinds unless this is True: then they start from its
                # clean labels (known for every training example) instead of its noisy ones.
                "use_clean_labels": False,
            },
        }
    )
