"""Small tfds builders over CoOp's local folders, for datasets that tfds lacks in CoOp's form.

* ``coop_fgvc_aircraft``: FGVC-Aircraft at the variant level, with the official
  train/val/test lists (CoOp reads ``images_variant_{train,val,test}.txt``).
* ``coop_ucf101``: UCF101 middle frames (CoOp's ``UCF-101-midframes`` folder), split by CoOp's
  ``split_zhou_UCF101.json`` when present, else by ``ucfTrainTestlist`` (trainlist01 / testlist01).

Both read a folder laid out as in CoOp's DATASETS.md given as tfds' ``manual_dir``; prepare them once
with ``python -m dspt_jax.data.prepare <fgvc_aircraft|ucf101> --manual_dir=... --data_dir=...``.
The listing functions are plain Python so that they can be tested and reused without tfds.
Importing this module registers the builders with tfds.
"""

from __future__ import annotations

import json
import os

import tensorflow_datasets as tfds

from dspt_jax.data import classnames as cn
from dspt_jax.data import datasets as ds_lib


def _read_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"expected file {path} (CoOp's folder layout, see docs/DATA.md)")
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def list_fgvc_aircraft(root: str) -> dict[str, list[tuple[str, int]]]:
    """{"train"|"val"|"test": [(image file name, class index)]} from CoOp's fgvc_aircraft folder.

    Class indices follow ``variants.txt`` (CoOp's label order); every variant must be one of the
    registry's 100 names, in the registry's order.
    """
    variants = _read_lines(os.path.join(root, "variants.txt"))
    index = {c: i for i, c in enumerate(cn.FGVC_AIRCRAFT)}
    for i, v in enumerate(variants):
        if index.get(v) != i:
            raise ValueError(
                f"{root}/variants.txt line {i + 1}: {v!r} is not CoOp's variant #{i + 1} "
                f"({cn.FGVC_AIRCRAFT[i] if i < len(cn.FGVC_AIRCRAFT) else 'none'!r})"
            )
    out = {}
    for split in ("train", "val", "test"):
        entries = []
        for line in _read_lines(os.path.join(root, f"images_variant_{split}.txt")):
            image_id, _, variant = line.partition(" ")
            if variant not in index:
                raise ValueError(f"images_variant_{split}.txt: unknown variant {variant!r}")
            entries.append((image_id + ".jpg", index[variant]))
        out[split] = entries
    return out


def list_ucf101(root: str) -> dict[str, list[tuple[str, int]]]:
    """{"train"|"val"|"test" or "train"|"test": [(path under UCF-101-midframes, class index)]}."""
    split_file = os.path.join(root, "split_zhou_UCF101.json")
    if os.path.isfile(split_file):
        with open(split_file) as f:
            data = json.load(f)
        return {s: [(p, int(y)) for p, y, _ in data[s]] for s in ("train", "val", "test")}
    lists = os.path.join(root, "ucfTrainTestlist")
    classes = {}
    for line in _read_lines(os.path.join(lists, "classInd.txt")):
        number, action = line.split(" ")
        classes[action] = int(number) - 1
    out = {}
    for split, name in (("train", "trainlist01.txt"), ("test", "testlist01.txt")):
        entries = []
        for line in _read_lines(os.path.join(lists, name)):
            video = line.split(" ")[0]
            action, file_name = video.split("/")
            frame = file_name.replace(".avi", ".jpg")
            entries.append((f"{ds_lib.ucf101_folder(action)}/{frame}", classes[action]))
        out[split] = entries
    return out


class _CoopFolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared body: images under ``manual_dir/<image_dir>``, listed by ``_list``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release (CoOp's folder layout)."}
    _classnames: tuple[str, ...] = ()
    _image_dir = ""
    _homepage = ""

    def _list(self, root: str) -> dict[str, list[tuple[str, int]]]:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(names=list(self._classnames)),
                    # The path CoOp's split files use, so they can be matched to these examples.
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=self._homepage,
        )

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        return {
            split: self._generate_examples(os.path.join(root, self._image_dir), entries)
            for split, entries in self._list(root).items()
        }

    def _generate_examples(self, image_dir, entries):
        for rel, label in entries:
            path = os.path.join(image_dir, rel)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"listed image {path} is missing")
            yield rel, {"image": path, "label": label, "file_name": rel}


class CoopFgvcAircraft(_CoopFolderBuilder):
    """FGVC-Aircraft variants (100 classes) as CoOp reads them, from a local folder."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Extract fgvc-aircraft-2013b.tar.gz, keep its data/ folder and pass it as manual_dir "
        "(it holds images/, variants.txt and images_variant_{train,val,test}.txt)."
    )
    _classnames = cn.FGVC_AIRCRAFT
    _image_dir = "images"
    _homepage = "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/"

    def _list(self, root):
        return list_fgvc_aircraft(root)


class CoopUcf101(_CoopFolderBuilder):
    """UCF101 middle frames (101 actions) as CoOp uses them, from a local folder."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass CoOp's ucf101/ folder as manual_dir: UCF-101-midframes/ (from CoOp's "
        "UCF-101-midframes.zip) and split_zhou_UCF101.json, or ucfTrainTestlist/ instead of the json."
    )
    _classnames = cn.UCF101
    _image_dir = "UCF-101-midframes"
    _homepage = "https://www.crcv.ucf.edu/data/UCF101.php"

    def _list(self, root):
        return list_ucf101(root)


__all__ = ("CoopFgvcAircraft", "CoopUcf101", "list_fgvc_aircraft", "list_ucf101")
