"""A run's files on a local disk or in a bucket: every path `etils.epath` opens (`gs://`, `s3://`, local).

Every file a run writes goes through `write_bytes`, which never leaves half a file under the final name:
  * on a local or network file system, the bytes go to a temporary name in the same directory, are fsynced,
    and are renamed over the final name (a kill leaves the old file or the new one);
  * in an object store (a path with a scheme, `gs://...`), the object is uploaded in one request: the store
    publishes it only once the upload is complete, so readers see the old object or the new one. A rename
    there is a copy and a delete, which would only double the traffic.
Object stores cannot append, so an appended log (`metrics.jsonl`) is rewritten whole there; see
`metrics.MetricWriter`.

On Cloud TPU VMs `gs://` goes through TensorFlow's file system (`tf.io.gfile`, which `etils.epath` picks
when TensorFlow is installed) with the VM's credentials; orbax writes the checkpoints with TensorStore's GCS
driver.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` names an object store (`gs://bucket/...`) rather than a file system."""
    return "://" in os.fspath(path)


def join(path: str, *parts: str) -> str:
    """`os.path.join` that keeps a URL a URL."""
    return os.path.join(os.fspath(path), *parts)


def absolute(path: str | os.PathLike) -> str:
    """An absolute local path; a URL unchanged."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(path)


def relative_to(path: str | None, workdir: str) -> str | None:
    """`path` relative to `workdir` when it lies inside it (files a run writes), else unchanged."""
    if path is None:
        return None
    if is_remote(path) or is_remote(workdir):
        root = os.fspath(workdir).rstrip("/") + "/"
        return path[len(root):] if path.startswith(root) else path
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(workdir))
    return path if rel.startswith(os.pardir) else rel


def exists(path: str | os.PathLike) -> bool:
    return epath.Path(path).exists()


def isdir(path: str | os.PathLike) -> bool:
    return epath.Path(path).is_dir()


def listdir(path: str | os.PathLike) -> list[str]:
    """The names in directory `path`; empty when it does not exist."""
    p = epath.Path(path)
    return sorted(child.name for child in p.iterdir()) if p.is_dir() else []


def makedirs(path: str | os.PathLike) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def read_bytes(path: str | os.PathLike) -> bytes:
    return epath.Path(path).read_bytes()


def read_json(path: str | os.PathLike):
    return json.loads(read_bytes(path))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically (see the module docstring), making the parent directories."""
    path = os.fspath(path)
    parent = epath.Path(path).parent
    parent.mkdir(parents=True, exist_ok=True)
    if is_remote(path):
        with epath.Path(path).open("wb") as f:  # one upload: published whole or not at all
            f.write(data)
        return
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename in (None, tmp):
            e.filename = path  # the file the user knows (disk full and the like)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def json_default(o):
    """`json.dumps`' fallback: numpy values as lists or numbers, anything else as its str."""
    return o.tolist() if hasattr(o, "tolist") else str(o)


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    """`obj` as JSON (numpy values as lists/numbers, anything else as its str), written atomically."""
    write_text(path, json.dumps(obj, indent=indent, default=json_default))


def write_npz(path: str | os.PathLike, **arrays) -> None:
    """`np.savez(path, **arrays)`, written atomically."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(path, buf.getvalue())


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an `.npz` file (no pickles); raises OSError, ValueError or zipfile.BadZipFile for a
    damaged file."""
    with np.load(io.BytesIO(read_bytes(path)), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
