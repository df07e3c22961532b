"""dspt_jax.files: atomic writes on a local disk and in a (fake) bucket, paths that stay URLs."""

import errno
import os
import zipfile

import numpy as np
import pytest
from etils import epath
from fake_bucket import fake_gcs

from dspt_jax import files


def test_a_failed_local_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / "results.json")
    files.write_json(path, {"a": 1})

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError) as e:
        files.write_json(path, {"a": 2})
    assert e.value.errno == errno.ENOSPC and e.value.filename == path
    assert files.read_json(path) == {"a": 1}
    assert os.listdir(tmp_path) == ["results.json"]


def test_local_writes_make_parents_and_round_trip(tmp_path):
    path = str(tmp_path / "a" / "b" / "x.npz")
    files.write_npz(path, ctx=np.arange(6, dtype=np.float32).reshape(2, 3), names=np.asarray(["p", "q"]))
    back = files.read_npz(path)
    np.testing.assert_array_equal(back["ctx"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert back["ctx"].dtype == np.float32 and list(back["names"]) == ["p", "q"]
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])  # a truncated file is an error, never half the arrays
    with pytest.raises((zipfile.BadZipFile, ValueError, OSError)):
        files.read_npz(path)
    assert files.listdir(str(tmp_path / "a")) == ["b"] and files.listdir(str(tmp_path / "none")) == []


def test_a_bucket_write_is_one_upload_and_never_an_append(tmp_path):
    with fake_gcs(tmp_path) as calls:
        files.write_text("gs://bucket/w/metrics.jsonl", "1\n")
        files.write_text("gs://bucket/w/metrics.jsonl", "1\n2\n")  # rewritten whole: buckets cannot append
        assert files.read_bytes("gs://bucket/w/metrics.jsonl") == b"1\n2\n"
        assert files.exists("gs://bucket/w/metrics.jsonl") and files.isdir("gs://bucket/w")
        assert files.listdir("gs://bucket/w") == ["metrics.jsonl"]
        with pytest.raises(OSError, match="cannot append"):  # the fake is an object store
            epath.Path("gs://bucket/w/metrics.jsonl").open("a")
    assert calls["rename"] == calls["replace"] == 0  # no temporary object copied over the final one
    assert os.listdir(tmp_path / "bucket" / "w") == ["metrics.jsonl"]


def test_paths_that_are_urls_stay_urls(tmp_path):
    assert files.is_remote("gs://b/x") and not files.is_remote(str(tmp_path))
    assert files.join("gs://b/runs", "p", "results.json") == "gs://b/runs/p/results.json"
    assert files.absolute("gs://b/runs") == "gs://b/runs"
    assert files.absolute("runs") == os.path.abspath("runs")
    assert files.relative_to("gs://b/runs/x/noise/r.json", "gs://b/runs/x") == "noise/r.json"
    assert files.relative_to("gs://b/runs/x/noise/r.json", "gs://b/runs/x/") == "noise/r.json"
    assert files.relative_to("gs://b/other/r.json", "gs://b/runs/x") == "gs://b/other/r.json"
    assert files.relative_to("/data/r.json", "gs://b/runs/x") == "/data/r.json"
    assert files.relative_to(str(tmp_path / "w" / "n.json"), str(tmp_path / "w")) == "n.json"
    assert files.relative_to("/elsewhere/n.json", str(tmp_path / "w")) == "/elsewhere/n.json"
    assert files.relative_to(None, "gs://b") is None
