"""Dataset registry: where each dataset comes from, its CoOp class names and prompt template.

Pure metadata, no TensorFlow: the model side (zero-shot prompts, the number of classes) can read it
without the input pipeline. ``pipeline.load_task`` turns an entry into data.

Class names are CoOp's prompt-ready names in CoOp's label order (``classnames.py`` says how each list
was checked). tfds orders and spells labels differently, so each entry also says how a tfds label
name becomes a CoOp class (``DatasetInfo.map_source_labels``); labels CoOp drops map to -1.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from dspt_jax.data import classnames as cn

# Names that are not registry entries but sources built from the config (your own data).
OWN_DATA_NAMES = ("folder", "csv")

_LABEL_RULES = ("identity", "rename", "sorted")


# ---------------------------------------------------------------------------------------------
# CoOp's renaming rules (tfds or folder label name -> CoOp's prompt-ready name; None = dropped)
# ---------------------------------------------------------------------------------------------

_CALTECH_RENAME = {
    "background_google": None,  # CoOp ignores the background class ...
    "faces_easy": None,  # ... and the duplicate face class; "Faces" becomes "face".
    "faces": "face",
    "leopards": "leopard",
    "motorbikes": "motorbike",
    "airplanes": "airplane",
}

_EUROSAT_RENAME = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}

# tfds' flower names differ from CoOp's (split_zhou_OxfordFlowers.json / cat_to_name.json) in one class.
_FLOWERS_RENAME = {"pink-yellow dahlia?": "pink-yellow dahlia"}


def _spaces(name: str) -> str:
    return name.replace("_", " ")


def caltech101_name(label: str) -> str | None:
    """tfds caltech101 label (lowercased folder) -> CoOp name; None for the two classes CoOp drops."""
    key = label.lower()
    if key in _CALTECH_RENAME:
        return _CALTECH_RENAME[key]
    return _spaces(key)


def stanford_cars_name(label: str) -> str:
    """cars_meta.mat name "Audi S4 Sedan 2012" -> CoOp's "2012 Audi S4 Sedan" (year first)."""
    words = label.split(" ")
    return " ".join([words[-1]] + words[:-1])


def sun397_name(label: str) -> str:
    """ClassName.txt entry "/b/bakery/shop" -> CoOp's "shop bakery" (letter dropped, parts reversed)."""
    parts = label.strip("/").split("/")[1:]
    return _spaces(" ".join(reversed(parts)))


def ucf101_folder(action: str) -> str:
    """classInd action "ApplyEyeMakeup" -> CoOp's folder name "Apply_Eye_Makeup" (split at capitals)."""
    return "_".join(re.findall("[A-Z][^A-Z]*", action))


def ucf101_name(action_or_folder: str) -> str:
    """classInd action ("ApplyEyeMakeup") or CoOp folder ("Apply_Eye_Makeup") -> "Apply Eye Makeup"."""
    folder = action_or_folder if "_" in action_or_folder else ucf101_folder(action_or_folder)
    return _spaces(folder)


_RENAMES: dict[str, Callable[[str], str | None]] = {
    "caltech101": caltech101_name,
    "oxford_pets": lambda s: _spaces(s.lower()),
    "stanford_cars": stanford_cars_name,
    "oxford_flowers": lambda s: _FLOWERS_RENAME.get(s, s),
    "food101": _spaces,
    "sun397": sun397_name,
    "dtd": _spaces,
    "eurosat": lambda s: _EUROSAT_RENAME.get(s),
    "ucf101": ucf101_name,
    "fgvc_aircraft": lambda s: s,
}


# ---------------------------------------------------------------------------------------------
# Registry entries
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySplit:
    """One split held in memory: uint8 images [N, H, W, 3] and int labels [N].

    ``labels`` are the labels the data ship with; ``clean`` (optional, -1 where unknown) marks them
    as noisy labels with known truth, i.e. a real-noise dataset.
    """

    images: np.ndarray
    labels: np.ndarray
    clean: np.ndarray | None = None

    def __post_init__(self):
        images = np.asarray(self.images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"images must be uint8 [N, H, W, 3] (RGB pixels 0..255), got {images.dtype} {images.shape}; "
                "convert them first (e.g. grey-scale to 3 channels, floats in [0, 1] times 255 to uint8)"
            )
        labels = np.asarray(self.labels)
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"labels must be int [{images.shape[0]}] (one class index per image), got {labels.dtype} {labels.shape}"
            )
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "labels", labels.astype(np.int64))
        if self.clean is not None:
            clean = np.asarray(self.clean)
            if clean.shape != labels.shape or not np.issubdtype(clean.dtype, np.integer):
                raise ValueError(f"clean must be int {labels.shape}, got {clean.dtype} {clean.shape}")
            object.__setattr__(self, "clean", clean.astype(np.int64))


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetInfo:
    """A registry entry.

    Attributes:
      name: registry key.
      classnames: CoOp's prompt-ready class names, in CoOp's label order.
      template: CoOp's prompt template for the dataset, with one "{}" for the class name.
      kind: "tfds" (a tfds builder), "food101n" (Food-101N folders + Food-101 test from tfds) or
        "arrays" (in-memory images, see ``register_array_dataset``).
      tfds_name: tfds builder name with config, e.g. "sun397/standard-part1-120k".
      train_split, val_split, test_split: tfds split names. val_split None: the validation set is
        drawn from the training split (disjoint from the training sample). test_split None: a fixed
        test (and validation) part is carved out of the training split with CoOp's 50/20/30 rule.
      label_rule: how tfds label names map to classes: "identity" (same order), "rename" (the
        dataset's CoOp rename rule, then by name) or "sorted" (rank among the sorted names: ImageNet
        wnids, whose CLIP names are not unique).
      file_feature, file_key: the tfds feature with the file name and the format of the key that
        matches CoOp's split-file paths ("{label}" tfds label name, "{file}", "{split}").
      coop_dir, coop_image_dir, coop_split_file: CoOp's folder under $DATA, the image root inside
        it (json paths are relative to it) and the split file name.
      prepare: how to prepare the tfds data offline ("{data_dir}" is filled in).
      noisy_columns: real-noise tfds datasets: the features with noisy labels (first = default).
      real_noise: the data ship noisy labels (train on them with noise.kind="real").
      arrays: in-memory splits {"train", "test"[, "val"]} for kind "arrays".
      rename_rule: whose CoOp rename rule ``rename`` applies (default: this entry's name).
      tfds_test_is_coops: without CoOp's split file, the test images are CoOp's too (False where CoOp
        carves its own 50/20/30 split or tfds' test split differs: numbers are then not comparable).
    """

    name: str
    classnames: tuple[str, ...]
    template: str = "a photo of a {}."
    kind: str = "tfds"
    tfds_name: str | None = None
    train_split: str = "train"
    val_split: str | None = None
    test_split: str | None = "test"
    label_rule: str = "rename"
    file_feature: str | None = None
    file_key: str | None = None
    coop_dir: str | None = None
    coop_image_dir: str | None = None
    coop_split_file: str | None = None
    prepare: str = ""
    noisy_columns: tuple[str, ...] = ()
    real_noise: bool = False
    arrays: Mapping[str, ArraySplit] | None = None
    rename_rule: str | None = None
    tfds_test_is_coops: bool = True

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self) -> list[str]:
        """The zero-shot prompts: the template filled with each class name."""
        return [self.template.format(c) for c in self.classnames]

    def rename(self, source_name: str) -> str | None:
        """CoOp's name for a source (tfds / folder) label name; None if CoOp drops that class."""
        rule = _RENAMES.get(self.rename_rule or self.name)
        return rule(source_name) if rule else _spaces(source_name)

    def map_source_labels(self, source_names: Sequence[str]) -> np.ndarray:
        """int64 [len(source_names)]: the class index of each source label (-1 = dropped).

        Raises ValueError when a source label has no class, two labels hit one class, or (identity)
        the counts differ: the tfds version then disagrees with the registry.
        """
        names = [str(s) for s in source_names]
        k = self.num_classes
        # The labels of the data on disk disagree with the registry: another tfds version, or other files.
        fix = (f"the prepared data is not the {self.tfds_name or self.name} this registry entry was written for: "
               f"prepare it again (python -m dspt_jax.data.prepare {self.name}) or use CoOp's split file and "
               "folder (docs/DATA.md)")
        if self.label_rule == "identity":
            if len(names) != k:
                raise ValueError(f"{self.name}: source has {len(names)} labels, registry {k} classes; {fix}")
            return np.arange(k, dtype=np.int64)
        if self.label_rule == "sorted":
            if len(names) != k or len(set(names)) != k:
                raise ValueError(f"{self.name}: source has {len(names)} labels, registry {k} classes; {fix}")
            rank = {s: i for i, s in enumerate(sorted(names))}
            return np.array([rank[s] for s in names], np.int64)
        if self.label_rule != "rename":
            raise ValueError(f"{self.name}: unknown label_rule {self.label_rule!r}; valid: {_LABEL_RULES}")
        index = {c: i for i, c in enumerate(self.classnames)}
        out = np.full(len(names), -1, np.int64)
        for j, s in enumerate(names):
            target = self.rename(s)
            if target is None:
                continue
            if target not in index:
                raise ValueError(
                    f"{self.name}: source label {s!r} (CoOp name {target!r}) is not one of the "
                    f"{k} registry classes; {fix}"
                )
            out[j] = index[target]
        hits = out[out >= 0]
        if np.unique(hits).size != hits.size:
            raise ValueError(f"{self.name}: two source labels map to one class; {fix}")
        return out


def _prepare_command(name: str, manual: str = "") -> str:
    """The command that prepares dataset ``name`` (``dspt_jax.data.prepare``); "{data_dir}" is filled in."""
    cmd = f"python -m dspt_jax.data.prepare {name} --data_dir={{data_dir}}"
    if manual:
        return f"{cmd} --manual_dir={manual}"
    return (f"{cmd}\n(it downloads the files: without network here, run it on a machine with internet and "
            f"copy the prepared folder into {{data_dir}})")


def _coop(name, classnames, template, tfds_name, *, coop_dir, coop_image_dir, coop_split_file,
          prepare=None, **kw) -> DatasetInfo:
    return DatasetInfo(
        name=name,
        classnames=tuple(classnames),
        template=template,
        tfds_name=tfds_name,
        coop_dir=coop_dir,
        coop_image_dir=coop_image_dir,
        coop_split_file=coop_split_file,
        prepare=prepare if prepare is not None else _prepare_command(name),
        **kw,
    )


DATASETS: dict[str, DatasetInfo] = {}


def _builtin() -> list[DatasetInfo]:
    return [
        _coop("caltech101", cn.CALTECH101, "a photo of a {}.", "caltech101",
              coop_dir="caltech-101", coop_image_dir="101_ObjectCategories",
              coop_split_file="split_zhou_Caltech101.json", tfds_test_is_coops=False,
              file_feature="image/file_name", file_key="{label}/{file}"),
        _coop("oxford_pets", cn.OXFORD_PETS, "a photo of a {}, a type of pet.", "oxford_iiit_pet",
              coop_dir="oxford_pets", coop_image_dir="images",
              coop_split_file="split_zhou_OxfordPets.json",
              file_feature="file_name", file_key="{file}"),
        _coop("stanford_cars", cn.STANFORD_CARS, "a photo of a {}.", "cars196",
              coop_dir="stanford_cars", coop_image_dir="",
              coop_split_file="split_zhou_StanfordCars.json",
              file_feature="id", file_key="cars_{split}/{file}.jpg"),
        _coop("oxford_flowers", cn.OXFORD_FLOWERS, "a photo of a {}, a type of flower.",
              "oxford_flowers102", val_split="validation",
              coop_dir="oxford_flowers", coop_image_dir="jpg",
              coop_split_file="split_zhou_OxfordFlowers.json", tfds_test_is_coops=False,
              file_feature="file_name", file_key="{file}"),
        # tfds food101 keeps no file names: CoOp's split file needs CoOp's folder (data.folder).
        _coop("food101", cn.FOOD101, "a photo of {}, a type of food.", "food101",
              test_split="validation", coop_dir="food-101", coop_image_dir="images",
              coop_split_file="split_zhou_Food101.json", tfds_test_is_coops=False),
        # tfds has no FGVC-Aircraft: a local tfds builder over CoOp's folder (builders.py).
        _coop("fgvc_aircraft", cn.FGVC_AIRCRAFT, "a photo of a {}, a type of aircraft.",
              "coop_fgvc_aircraft", val_split="val", label_rule="identity",
              coop_dir="fgvc_aircraft", coop_image_dir="images", coop_split_file=None,
              file_feature="file_name", file_key="{file}",
              prepare=_prepare_command("fgvc_aircraft", "$DATA/fgvc_aircraft")),
        # Partition 1 of the standard SUN397 partitions is CoOp's source (Training_01/Testing_01).
        _coop("sun397", cn.SUN397, "a photo of a {}.", "sun397/standard-part1-120k",
              coop_dir="sun397", coop_image_dir="SUN397", coop_split_file="split_zhou_SUN397.json",
              file_feature="file_name", file_key="{file}"),
        _coop("dtd", cn.DTD, "{} texture.", "dtd", val_split="validation",
              coop_dir="dtd", coop_image_dir="images",
              coop_split_file="split_zhou_DescribableTextures.json", tfds_test_is_coops=False,
              file_feature="file_name", file_key="{file}"),
        # tfds eurosat has a train split only: without CoOp's split file, test is carved (50/20/30).
        _coop("eurosat", cn.EUROSAT, "a centered satellite photo of {}.", "eurosat/rgb",
              test_split=None, coop_dir="eurosat", coop_image_dir="2750",
              coop_split_file="split_zhou_EuroSAT.json", tfds_test_is_coops=False,
              file_feature="filename", file_key="{label}/{file}"),
        # tfds ucf101 is videos; CoOp uses middle frames: a local tfds builder (builders.py).
        _coop("ucf101", cn.UCF101, "a photo of a person doing {}.", "coop_ucf101",
              label_rule="identity", coop_dir="ucf101", coop_image_dir="UCF-101-midframes",
              coop_split_file="split_zhou_UCF101.json",
              file_feature="file_name", file_key="{file}",
              prepare=_prepare_command("ucf101", "$DATA/ucf101")),
        # CoOp evaluates ImageNet on its validation set (and has no split file).
        _coop("imagenet", cn.IMAGENET, "a photo of a {}.", "imagenet2012", test_split="validation",
              label_rule="sorted", coop_dir="imagenet", coop_image_dir="images",
              coop_split_file=None,
              prepare=_prepare_command("imagenet", "<dir with ILSVRC2012_img_train.tar and "
                                       "ILSVRC2012_img_val.tar>")),
        # Real label noise. CIFAR-N: the noisy column is a config choice (data.label_column).
        DatasetInfo(
            name="cifar10n", classnames=cn.CIFAR10, tfds_name="cifar10_n", label_rule="identity",
            noisy_columns=("worse_label", "aggre_label", "random_label1", "random_label2",
                           "random_label3"),
            real_noise=True,
            prepare=_prepare_command("cifar10n", "<dir with CIFAR-10_human_annotations.csv>")),
        DatasetInfo(
            name="cifar100n", classnames=cn.CIFAR100, tfds_name="cifar100_n", label_rule="identity",
            noisy_columns=("noise_label",), real_noise=True,
            prepare=_prepare_command("cifar100n", "<dir with CIFAR-100_human_annotations.csv>")),
        # Food-101N: train = its class folders (data.folder), test = Food-101's test (tfds food101).
        DatasetInfo(
            name="food101n", classnames=cn.FOOD101, template="a photo of {}, a type of food.",
            kind="food101n", tfds_name="food101", test_split="validation", real_noise=True,
            rename_rule="food101", prepare=_prepare_command("food101")),
    ]


ALIASES = {
    "oxford_iiit_pet": "oxford_pets",
    "pets": "oxford_pets",
    "cars196": "stanford_cars",
    "oxford_flowers102": "oxford_flowers",
    "flowers102": "oxford_flowers",
    "imagenet2012": "imagenet",
    "cifar10_n": "cifar10n",
    "cifar100_n": "cifar100n",
    "food101_n": "food101n",
    "fgvcaircraft": "fgvc_aircraft",
}


def _check_info(info: DatasetInfo) -> None:
    if not isinstance(info, DatasetInfo):
        raise ValueError(f"expected a DatasetInfo, got {type(info).__name__}")
    if not info.name or not isinstance(info.name, str):
        raise ValueError(f"dataset name must be a non-empty string, got {info.name!r}")
    if info.name in OWN_DATA_NAMES:
        raise ValueError(f"{info.name!r} is reserved for your own data (data.name='folder' / 'csv'); pick another name")
    if len(set(info.classnames)) < 2:
        raise ValueError(f"{info.name}: need at least 2 distinct class names, got {list(info.classnames)}")
    # CLIP's ImageNet names repeat two names; classes are told apart by index there ("sorted").
    if info.label_rule != "sorted":
        check_distinct_names(info.classnames, f"dataset {info.name!r}", "rename one of them")
    if info.template.count("{}") != 1:
        raise ValueError(f"{info.name}: template must hold exactly one '{{}}', got {info.template!r}")
    if info.kind not in ("tfds", "food101n", "arrays"):
        raise ValueError(f"{info.name}: unknown kind {info.kind!r}; valid: tfds, food101n, arrays")
    if info.label_rule not in _LABEL_RULES:
        raise ValueError(f"{info.name}: unknown label_rule {info.label_rule!r}; valid: {_LABEL_RULES}")


def check_distinct_names(names: Sequence[str], where: str, fix: str) -> None:
    """Raises ValueError naming every class name that ``names`` holds twice: two classes with one name get
    one prompt, so CLIP could never tell them apart. ``where`` says whose names they are, ``fix`` what to do."""
    seen: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        seen.setdefault(name, []).append(i)
    repeated = {name: idx for name, idx in seen.items() if len(idx) > 1}
    if repeated:
        listed = "; ".join(f"{name!r} (classes {', '.join(map(str, idx))})" for name, idx in list(repeated.items())[:5])
        raise ValueError(
            f"{where}: {len(repeated)} class name(s) appear more than once: {listed}. Two classes with one name "
            f"get the same prompt: {fix}"
        )


def register_dataset(info: DatasetInfo, overwrite: bool = False) -> DatasetInfo:
    """Adds ``info`` to ``DATASETS`` (ValueError if the name is taken and not ``overwrite``)."""
    _check_info(info)
    if not overwrite and (info.name in DATASETS or info.name in ALIASES):
        raise ValueError(f"dataset {info.name!r} is already registered (pass overwrite=True, or pick another name)")
    DATASETS[info.name] = info
    return info


def _as_split(value: Any, what: str, num_classes: int) -> ArraySplit:
    if isinstance(value, ArraySplit):
        split = value
    elif isinstance(value, (tuple, list)) and len(value) in (2, 3):
        split = ArraySplit(*value)
    else:
        raise ValueError(f"{what} must be an ArraySplit or (images, labels[, clean]), got {type(value).__name__}")
    for arr, field in ((split.labels, "labels"), (split.clean, "clean")):
        if arr is None or arr.size == 0:
            continue
        low = -1 if field == "clean" else 0
        if arr.min() < low or arr.max() >= num_classes:
            raise ValueError(
                f"{what} {field} must lie in [{low}, {num_classes}), got [{arr.min()}, {arr.max()}]: the class-name "
                f"list has {num_classes} names, label c is classnames[c]; give one name per label value"
            )
    return split


def register_array_dataset(
    name: str,
    classnames: Sequence[str],
    train: Any,
    test: Any,
    val: Any = None,
    template: str = "a photo of a {}.",
    overwrite: bool = False,
) -> DatasetInfo:
    """Registers an in-memory dataset (e.g. a synthetic world) under ``name``.

    Args:
      name: registry key (then ``config.data.name = name``).
      classnames: prompt-ready class names.
      train, test, val: ``ArraySplit`` or ``(images uint8 [N,H,W,3], labels int [N][, clean])``; with
        ``clean`` the labels are the data's own noisy labels (train on them with noise.kind="real").
        Without ``val`` the validation set is drawn from train.
      template: prompt template with one "{}".
    """
    k = len(classnames)
    arrays = {"train": _as_split(train, "train", k), "test": _as_split(test, "test", k)}
    if val is not None:
        arrays["val"] = _as_split(val, "val", k)
    info = DatasetInfo(
        name=name,
        classnames=tuple(str(c) for c in classnames),
        template=template,
        kind="arrays",
        label_rule="identity",
        real_noise=any(s.clean is not None for s in arrays.values()),
        arrays=arrays,
    )
    return register_dataset(info, overwrite=overwrite)


# Datasets generated in memory by a module's ``register()``, registered on first use.
GENERATED = {"toy": "dspt_jax.data.toy", "synthetic": "dspt_jax.data.synthetic"}


def canonical_name(name: str) -> str:
    """Registry key for ``name`` (aliases such as tfds names resolved, case-insensitive)."""
    if not isinstance(name, str):
        raise ValueError(f"dataset name must be a string, got {name!r}")
    key = name.strip()
    if key in DATASETS or key in OWN_DATA_NAMES:
        return key
    low = key.lower()
    low = ALIASES.get(low, low)
    if low in DATASETS or low in OWN_DATA_NAMES:
        return low
    if low in GENERATED:
        importlib.import_module(GENERATED[low]).register()
        return low
    raise ValueError(
        f"unknown dataset {name!r} (data.name); valid names: {sorted(set(DATASETS) | set(GENERATED))} or your own "
        f"data: {list(OWN_DATA_NAMES)} (aliases: {sorted(ALIASES)})"
    )


def get_dataset_info(name: str) -> DatasetInfo:
    """The registry entry for ``name``; ValueError listing the valid names if unknown."""
    key = canonical_name(name)
    if key in OWN_DATA_NAMES:
        raise ValueError(f"{key!r} is your own data, built from the config (data.{key}); no registry entry")
    return DATASETS[key]


for _info in _builtin():
    register_dataset(_info)
del _info

__all__ = (
    "ArraySplit",
    "DatasetInfo",
    "DATASETS",
    "ALIASES",
    "OWN_DATA_NAMES",
    "canonical_name",
    "check_distinct_names",
    "get_dataset_info",
    "register_dataset",
    "register_array_dataset",
    "caltech101_name",
    "stanford_cars_name",
    "sun397_name",
    "ucf101_folder",
    "ucf101_name",
)
