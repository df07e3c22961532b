"""`python -m dspt_jax.data.prepare`: prepares tfds builders (downloaded or from a manual folder) without
tfds' CLI, and stops within seconds, with the command to run elsewhere, when there is no network."""

import json
import time

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")  # noqa: E402 -- a core dependency; see test_pipeline

from dspt_jax.data import pipeline, prepare  # noqa: E402


class FakeDownloaded(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder that "downloads" nothing: four examples made here."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({"x": tfds.features.Scalar(np.int64),
                                                 "label": tfds.features.ClassLabel(num_classes=2)}),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(4)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"x": i, "label": i % 2}


class FakeManual(FakeDownloaded, skip_registration=True):
    """A builder over files downloaded by hand: reads counts.json from manual_dir."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put counts.json (with a key 'n') in manual_dir."

    def _split_generators(self, dl_manager):
        with open(dl_manager.manual_dir / "counts.json") as f:
            return {"train": self._generate_examples(json.load(f)["n"])}


def test_prepares_a_downloaded_builder_after_the_network_check(tmp_path, monkeypatch):
    probed = []
    monkeypatch.setattr(prepare, "download_hosts", lambda builder: ["files.example.org"])
    monkeypatch.setattr(prepare, "_reachable", lambda host, timeout: probed.append(host) or True)
    builder = FakeDownloaded(data_dir=str(tmp_path))
    assert prepare.prepare_builder("fake", builder) is builder
    assert builder.is_prepared() and builder.info.splits["train"].num_examples == 4
    assert probed == ["files.example.org"]


def test_no_network_fails_within_seconds_with_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "download_hosts", lambda builder: ["unreachable.invalid"])
    builder = FakeDownloaded(data_dir=str(tmp_path))
    start = time.time()
    with pytest.raises(prepare.NoNetworkError) as err:
        prepare.prepare_builder("fake", builder, probe_timeout=2.0)
    assert time.time() - start < 5
    assert "python -m dspt_jax.data.prepare fake --data_dir=D" in str(err.value)
    assert not builder.is_prepared()


def test_manual_builder_needs_its_folder_and_never_probes(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "_reachable", lambda host, timeout: pytest.fail("probed the network"))
    builder = FakeManual(data_dir=str(tmp_path / "tfds"))
    with pytest.raises(prepare.ManualDirRequiredError, match=r"(?s)no --manual_dir was given.*counts.json"):
        prepare.prepare_builder("fake", builder)
    with pytest.raises(prepare.ManualDirRequiredError, match="does not exist"):
        prepare.prepare_builder("fake", builder, str(tmp_path / "nope"))
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "counts.json").write_text('{"n": 3}')
    prepare.prepare_builder("fake", builder, str(tmp_path / "manual"))
    assert builder.info.splits["train"].num_examples == 3


def test_registry_builders_name_their_download_hosts():
    # What the network check probes, read offline from tfds' registered checksums.
    import tensorflow_datasets as tfds

    assert prepare.download_hosts(tfds.builder("dtd", data_dir="/nonexistent")) == ["www.robots.ox.ac.uk"]
    assert "data.caltech.edu" in prepare.download_hosts(tfds.builder("caltech101", data_dir="/nonexistent"))


def test_command_line_and_trainer_download_fail_fast_offline(tmp_path, monkeypatch, capsys):
    """Registry names resolve to their tfds builders; without network the command exits 1 within seconds,
    and so does a run with data.download=True, both saying what to run on a machine with internet."""
    monkeypatch.setattr(prepare, "_reachable", lambda host, timeout: False)
    start = time.time()
    assert prepare.main(["dtd", f"--data_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "www.robots.ox.ac.uk" in err and "python -m dspt_jax.data.prepare dtd --data_dir=D" in err
    assert "copy D/dtd" in err
    with pytest.raises(prepare.NoNetworkError, match="prepare dtd"):
        pipeline.load_task({"name": "dtd", "data_dir": str(tmp_path), "download": True, "split_file": None})
    with pytest.raises(prepare.NoNetworkError, match="prepare dtd"):  # the trainer's up-front check
        pipeline.check_data({"name": "dtd", "data_dir": str(tmp_path), "download": True, "split_file": None})
    assert time.time() - start < 10
    assert prepare.main(["imagenet", f"--data_dir={tmp_path}"]) == 1  # manual: says what to download
    assert "ILSVRC2012_img_train.tar" in capsys.readouterr().err
    assert prepare.main(["folder"]) == 1 and "nothing to prepare" in capsys.readouterr().err
