"""Dataset registry: CoOp's class names and templates, their mapping onto tfds labels, split files.

References are independent of the code under test: CoOp's templates and renaming rules typed from
CoOp's source (trainers/zsclip.py, datasets/*.py), and tfds' own label lists (builder metadata, no
data needed).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dspt_jax.data import classnames as cn
from dspt_jax.data import datasets as D

# CoOp's CUSTOM_TEMPLATES (trainers/zsclip.py), keyed by our registry names.
COOP_TEMPLATES = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
}
COOP_NUM_CLASSES = {
    "caltech101": 100, "oxford_pets": 37, "stanford_cars": 196, "oxford_flowers": 102,
    "food101": 101, "fgvc_aircraft": 100, "sun397": 397, "dtd": 47, "eurosat": 10,
    "ucf101": 101, "imagenet": 1000,
}


def test_coop_eleven_registered_with_templates_and_class_counts():
    for name, template in COOP_TEMPLATES.items():
        info = D.get_dataset_info(name)
        assert info.template == template, name
        assert info.num_classes == COOP_NUM_CLASSES[name], name
        assert info.prompts()[0] == template.format(info.classnames[0])
    # Prompt-ready: CoOp replaces "_" by " " before prompting; nothing of it may be left.
    for name in COOP_TEMPLATES:
        assert not any("_" in c for c in D.get_dataset_info(name).classnames), name


def test_spot_checked_coop_names():
    # Hand-picked from CoOp's sources: renames, order quirks and the year-first car names.
    cal = D.get_dataset_info("caltech101").classnames
    assert cal[:5] == ("face", "leopard", "motorbike", "accordion", "airplane")
    assert "background google" not in cal and "faces easy" not in cal
    assert D.get_dataset_info("stanford_cars").classnames[0] == "2000 AM General Hummer SUV"
    assert D.get_dataset_info("sun397").classnames[27] == "shop bakery"
    assert D.get_dataset_info("eurosat").classnames[-1] == "Sea or Lake"
    assert D.get_dataset_info("ucf101").classnames[:2] == ("Apply Eye Makeup", "Apply Lipstick")
    assert D.get_dataset_info("food101").classnames[16:18] == ("cheese plate", "cheesecake")
    assert D.get_dataset_info("oxford_flowers").classnames[77] == "lotus"
    assert D.get_dataset_info("imagenet").classnames[0] == "tench"


def test_coop_renaming_rules():
    assert D.caltech101_name("Faces_easy") is None and D.caltech101_name("BACKGROUND_Google") is None
    assert D.caltech101_name("Faces") == "face" and D.caltech101_name("car_side") == "car side"
    assert D.stanford_cars_name("Ram C/V Cargo Van Minivan 2012") == "2012 Ram C/V Cargo Van Minivan"
    assert D.sun397_name("/t/theater/indoor_procenium") == "indoor procenium theater"
    assert D.sun397_name("/a/abbey") == "abbey"
    assert D.ucf101_folder("HandstandPushups") == "Handstand_Pushups"
    assert D.ucf101_name("YoYo") == "Yo Yo" and D.ucf101_name("Apply_Eye_Makeup") == "Apply Eye Makeup"


_TFDS_BUILDERS = ["caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                  "sun397", "dtd", "eurosat", "imagenet"]


@pytest.fixture(scope="module")
def tfds_label_names(tmp_path_factory):
    """Label names of the real tfds builders (their metadata ships with tfds; no data needed)."""
    import tensorflow_datasets as tfds

    empty = str(tmp_path_factory.mktemp("empty_tfds"))
    out = {n: tfds.builder(D.get_dataset_info(n).tfds_name, data_dir=empty).info.features["label"].names
           for n in _TFDS_BUILDERS}
    out["ucf101_video"] = tfds.builder("ucf101", data_dir=empty).info.features["label"].names
    return out


@pytest.mark.parametrize("name", _TFDS_BUILDERS)
def test_class_names_map_onto_tfds_label_order(name, tfds_label_names):
    info = D.get_dataset_info(name)
    source = tfds_label_names[name]
    mapping = info.map_source_labels(source)
    kept = mapping[mapping >= 0]
    # Every CoOp class is hit by exactly one tfds label.
    assert sorted(kept.tolist()) == list(range(info.num_classes))
    dropped = sorted(s for s, m in zip(source, mapping) if m < 0)
    assert dropped == (["background_google", "faces_easy"] if name == "caltech101" else [])


def test_tfds_mapping_hand_checked(tfds_label_names):
    def cls(name, tfds_label):
        info = D.get_dataset_info(name)
        idx = tfds_label_names[name].index(tfds_label)
        return info.classnames[info.map_source_labels(tfds_label_names[name])[idx]]

    assert cls("caltech101", "faces") == "face"
    assert cls("caltech101", "airplanes") == "airplane"
    assert cls("oxford_pets", "Abyssinian") == "abyssinian"
    assert cls("stanford_cars", "Acura TL Type-S 2008") == "2008 Acura TL Type-S"
    assert cls("oxford_flowers", "lotus") == "lotus"
    assert cls("oxford_flowers", "pink-yellow dahlia?") == "pink-yellow dahlia"
    assert cls("sun397", "/c/car_interior/backseat") == "backseat car interior"
    assert cls("eurosat", "HerbaceousVegetation") == "Herbaceous Vegetation Land"
    assert cls("imagenet", "n01440764") == "tench"
    # tfds keeps Food-101's meta order, CoOp sorts the folders: the two swap places.
    food = tfds_label_names["food101"]
    assert food.index("cheesecake") < food.index("cheese_plate")
    m = D.get_dataset_info("food101").map_source_labels(food)
    assert m[food.index("cheese_plate")] == 16 and m[food.index("cheesecake")] == 17


def test_ucf101_names_follow_coop_rule_on_classind(tfds_label_names):
    # tfds' video builder lists classInd.txt's actions; CoOp splits them at capitals.
    assert tuple(D.ucf101_name(a) for a in tfds_label_names["ucf101_video"]) == cn.UCF101


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown dataset 'caltech102'.*caltech101"):
        D.get_dataset_info("caltech102")
    assert D.get_dataset_info("oxford_iiit_pet").name == "oxford_pets"
    assert D.get_dataset_info("CIFAR10_N").name == "cifar10n"
    with pytest.raises(ValueError, match="your own data"):
        D.get_dataset_info("folder")


def test_register_array_dataset_validates_and_refuses_duplicates():
    images = np.zeros((4, 8, 8, 3), np.uint8)
    info = D.register_array_dataset(
        "test_arrays_registry", ["a", "b"], (images, [0, 1, 0, 1]), (images, [1, 1, 0, 0]),
        template="a {} thing.")
    try:
        assert D.get_dataset_info("test_arrays_registry") is info
        assert info.kind == "arrays" and not info.real_noise and info.prompts() == ["a a thing.", "a b thing."]
        with pytest.raises(ValueError, match="already registered"):
            D.register_array_dataset("test_arrays_registry", ["a", "b"], (images, [0] * 4), (images, [0] * 4))
        noisy = D.register_array_dataset(
            "test_arrays_registry", ["a", "b"], (images, [0, 1, 0, 1], [0, -1, 1, 1]),
            (images, [0] * 4), overwrite=True)
        assert noisy.real_noise
    finally:
        D.DATASETS.pop("test_arrays_registry", None)
    with pytest.raises(ValueError, match="labels must lie in"):
        D.register_array_dataset("bad_arrays", ["a", "b"], (images, [0, 2, 0, 1]), (images, [0] * 4))
    with pytest.raises(ValueError, match="uint8"):
        D.register_array_dataset("bad_arrays", ["a", "b"], (images.astype(np.float32), [0] * 4),
                                 (images, [0] * 4))
    with pytest.raises(ValueError, match="exactly one"):
        D.register_dataset(D.DatasetInfo("bad_template", ("a", "b"), template="no slot"))
    assert "bad_arrays" not in D.DATASETS


def test_split_file_reader(tmp_path):
    from dspt_jax.data import sources

    good = {"train": [["x/1.jpg", 1, "cat_b"], ["y/2.jpg", 0, "dog"]], "val": [], "test": [["z.jpg", 1, "cat_b"]]}
    path = tmp_path / "split_zhou_X.json"
    path.write_text(json.dumps(good))
    entries, names = sources.read_split_file(str(path))
    assert entries["train"] == [("x/1.jpg", 1), ("y/2.jpg", 0)] and entries["test"] == [("z.jpg", 1)]
    assert names == {0: "dog", 1: "cat b"}
    bad = dict(good, train=[["x/1.jpg", 1, "cat_b"], ["y/2.jpg", 1, "dog"]])
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="named both"):
        sources.read_split_file(str(path))
    path.write_text(json.dumps({"train": []}))
    with pytest.raises(ValueError, match="missing"):
        sources.read_split_file(str(path))


def test_coop_carve_rule():
    from dspt_jax.data import sources

    labels = np.repeat(np.arange(3), [10, 7, 5])
    tr, va, te = sources.coop_carve(labels, 3, seed=0)
    for c, n in enumerate([10, 7, 5]):
        # CoOp: round(0.5 n) train, round(0.2 n) val (Python's round), the rest test.
        assert (labels[tr] == c).sum() == round(0.5 * n)
        assert (labels[va] == c).sum() == round(0.2 * n)
        assert (labels[te] == c).sum() == n - round(0.5 * n) - round(0.2 * n)
    assert np.array_equal(np.sort(np.concatenate([tr, va, te])), np.arange(labels.size))
    again = sources.coop_carve(labels, 3, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip((tr, va, te), again))
    assert not np.array_equal(tr, sources.coop_carve(labels, 3, seed=1)[0])


def test_ucf101_listing_follows_coop(tmp_path):
    from dspt_jax.data import builders

    lists = tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 ApplyLipstick\n37 HandstandPushups\n")
    (lists / "trainlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nHandstandPushups/v_HandStandPushups_g08_c01.avi 37\n")
    (lists / "testlist01.txt").write_text("ApplyLipstick/v_ApplyLipstick_g01_c01.avi\n")
    out = builders.list_ucf101(str(tmp_path))
    # CoOp: folder = action split at capitals, frame = video name with .jpg, label = classInd - 1.
    assert out["train"] == [("Apply_Eye_Makeup/v_ApplyEyeMakeup_g08_c01.jpg", 0),
                            ("Handstand_Pushups/v_HandStandPushups_g08_c01.jpg", 36)]
    assert out["test"] == [("Apply_Lipstick/v_ApplyLipstick_g01_c01.jpg", 1)]
    assert cn.UCF101[36] == "Handstand Pushups"
    split = {"train": [["Archery/v_a.jpg", 2, "Archery"]], "val": [], "test": [["Biking/v_b.jpg", 10, "Biking"]]}
    (tmp_path / "split_zhou_UCF101.json").write_text(json.dumps(split))
    assert builders.list_ucf101(str(tmp_path)) == {"train": [("Archery/v_a.jpg", 2)], "val": [],
                                                   "test": [("Biking/v_b.jpg", 10)]}


def test_fgvc_listing_checks_variant_order(tmp_path):
    from dspt_jax.data import builders

    (tmp_path / "variants.txt").write_text("\n".join(cn.FGVC_AIRCRAFT) + "\n")
    for split in ("train", "val", "test"):
        (tmp_path / f"images_variant_{split}.txt").write_text("1025794 BAE 146-200\n0056978 707-320\n")
    out = builders.list_fgvc_aircraft(str(tmp_path))
    assert out["val"] == [("1025794.jpg", cn.FGVC_AIRCRAFT.index("BAE 146-200")), ("0056978.jpg", 0)]
    (tmp_path / "variants.txt").write_text("727-200\n707-320\n")
    with pytest.raises(ValueError, match="not CoOp's variant #1"):
        builders.list_fgvc_aircraft(str(tmp_path))


def test_package_imports_without_tensorflow():
    code = ("import sys; from dspt_jax.data import noise, fewshot, datasets, config; "
            "import dspt_jax.data as d; d.get_dataset_info('dtd'); d.default_data_config(); "
            "assert 'tensorflow' not in sys.modules, 'TF imported'")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_default_config_fields():
    from dspt_jax.data import config

    cfg = config.default_data_config()
    assert (cfg.name, cfg.shots, cfg.seed, cfg.image_size, cfg.download) == ("caltech101", 16, 1, 224, False)
    assert tuple(cfg.crop_scale) == (0.08, 1.0) and cfg.noise.kind == "none" and cfg.noise.rate == 0.0
    cfg.folder = "/data/mine"  # typed placeholders accept their type later
    cfg.noise.num_flips = 4
    assert cfg.folder == "/data/mine" and cfg.noise.num_flips == 4
