"""A local fake of a `gs://` bucket, for tests of runs whose workdir is a bucket URL.

`fake_gcs(root)` serves every `gs://BUCKET/KEY` path from `root/BUCKET/KEY` on the local disk, through the
same layers a real bucket goes through:
  * `etils.epath` (all of the project's workdir I/O, and orbax's directory handling) is given a backend
    that maps the URLs to `root` and, like an object store, refuses to append to an object;
  * orbax's TensorStore arrays go to TensorStore's `file` driver under `root` instead of its `gcs` driver,
    and its bucket metadata query (hierarchical namespace) answers "no" instead of calling Google's API.
Orbax keeps treating the paths as GCS paths (commit files instead of renames, as on a real bucket).
`calls` counts the epath operations that reached the fake, by name.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
from unittest import mock

from etils.epath import gpath
from etils.epath import testing as epath_testing
from orbax.checkpoint._src.path import gcs_utils

PREFIX = "gs://"


@contextlib.contextmanager
def fake_gcs(root):
    root = os.fspath(root)
    calls = collections.Counter()

    def local(path):
        path = os.fspath(path)
        return os.path.join(root, path[len(PREFIX):]) if path.startswith(PREFIX) else path

    def url(path):
        path = os.fspath(path)
        return PREFIX + os.path.relpath(path, root) if path.startswith(root + os.sep) else path

    def on_path(name):
        def fn(original, path, *args, **kwargs):
            if os.fspath(path).startswith(PREFIX):
                calls[name] += 1
            return original(local(path), *args, **kwargs)
        return fn

    def open_(original, path, mode="r"):
        if os.fspath(path).startswith(PREFIX):
            calls["open"] += 1
            if "a" in mode or "+" in mode:
                raise OSError(errno.EOPNOTSUPP, f"an object store cannot append to {path}", os.fspath(path))
        return original(local(path), mode)

    def two_paths(name):
        def fn(original, path, dst, **kwargs):
            if os.fspath(path).startswith(PREFIX):
                calls[name] += 1
            return original(local(path), local(dst), **kwargs)
        return fn

    def glob(original, pattern):
        return [url(p) for p in original(local(pattern))]

    def walk(original, top, **kwargs):
        for dirpath, dirnames, filenames in original(local(top), **kwargs):
            yield url(dirpath), dirnames, filenames

    def kvstore(path):  # TensorStore's spec for a gs:// path, pointed at the local root
        return {"driver": "file", "path": local(path)}

    with contextlib.ExitStack() as stack:
        stack.enter_context(epath_testing.mock_epath(
            open=open_, exists=on_path("exists"), isdir=on_path("isdir"), listdir=on_path("listdir"),
            makedirs=on_path("makedirs"), mkdir=on_path("mkdir"), remove=on_path("remove"),
            rmtree=on_path("rmtree"), stat=on_path("stat"), rename=two_paths("rename"),
            replace=two_paths("replace"), copy=two_paths("copy"), glob=glob, walk=walk,
        ))
        # With TensorFlow installed epath sends gs:// to tf.io.gfile, past the mocked backends.
        stack.enter_context(mock.patch.object(gpath, "_is_tf_installed", lambda: False))
        stack.enter_context(mock.patch.object(gcs_utils, "get_kvstore_for_gcs", kvstore))
        stack.enter_context(mock.patch.object(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False))
        yield calls
