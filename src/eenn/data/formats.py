"""Readers for the standard on-disk formats of the image data sets. Each returns numpy arrays
``images uint8 [N, C, H, W]`` and ``labels int64 [N]`` and turns every failure of the underlying
library (gzip, tarfile, pickle, scipy) into a ``DatasetCorruptError`` that names the file.

* IDX (MNIST, Fashion-MNIST): ``*-idx3-ubyte[.gz]`` images and ``*-idx1-ubyte[.gz]`` labels.
* CIFAR "python version": pickled dicts, read from a folder or straight from the ``.tar.gz``.
  The pickles are loaded with a restricted unpickler that can only rebuild numpy arrays.
* SVHN: MATLAB ``.mat`` files holding ``X`` (32x32x3xN) and ``y`` (Nx1, 10 meaning digit 0).
"""
from __future__ import annotations

import codecs
import io
import gzip
import pickle
import posixpath
import tarfile
import zlib
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import DatasetCorruptError, corrupt

Arrays = tuple[np.ndarray, np.ndarray]  # images [N, C, H, W] uint8, labels [N] int64

# --------------------------------------------------------------------------------------------- IDX

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    """The file's content, transparently gunzipped when the name ends in ``.gz``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise corrupt(path, f"cannot be decompressed ({type(err).__name__}: {err}); "
                            "the file is truncated or damaged") from err


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """One IDX file: magic ``00 00 <type> <ndim>``, ``ndim`` big-endian uint32 sizes, then the data."""
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        magic = raw[:4].hex() if raw else "empty file"
        raise corrupt(path, f"is not an IDX file (magic number {magic})")
    if raw[3] != ndim:
        expect = 0x0800 | ndim
        raise corrupt(path, f"has IDX magic number 0x{int.from_bytes(raw[:4], 'big'):08x}, expected 0x{expect:08x} "
                            f"(a {ndim}-dimensional array); is it the {'labels' if ndim == 3 else 'images'} file?")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise corrupt(path, "is truncated inside its header")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise corrupt(path, f"holds {len(raw) - header} data bytes but its header {dims} announces {expected}")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims)


def read_idx_pair(images_path: Path, labels_path: Path, num_classes: int) -> Arrays:
    """Images [N, 1, H, W] uint8 and labels [N] int64 from an IDX images/labels pair."""
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if images.dtype != np.uint8:
        raise corrupt(images_path, f"holds {images.dtype} pixels, expected unsigned bytes")
    if len(images) != len(labels):
        raise corrupt(labels_path, f"holds {len(labels)} labels but {images_path.name} holds {len(images)} images",
                      "delete both files and obtain them again")
    return images[:, None], check_labels(labels, num_classes, labels_path)


def check_labels(labels: Any, num_classes: int, path: object) -> np.ndarray:
    """Labels as int64, each in ``[0, num_classes)``."""
    arr = np.asarray(labels)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise corrupt(path, f"labels have shape {arr.shape} and dtype {arr.dtype}, expected a list of integers")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise corrupt(path, f"labels range over [{arr.min()}, {arr.max()}], expected [0, {num_classes - 1}]")
    return arr


# ------------------------------------------------------------------------------------------- CIFAR

def _numpy_global(module: str, name: str) -> Any:
    import importlib
    for prefix in ("numpy._core", "numpy.core"):  # numpy 2 renamed core -> _core
        try:
            return getattr(importlib.import_module(f"{prefix}.{module}"), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {module}.{name}")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What Python 3 writes for ``bytes`` in protocol-2 pickles; any other codec is refused."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode called with codec {encoding!r}")
    return text.encode("latin1")


_RECONSTRUCT = _numpy_global("multiarray", "_reconstruct")
_FROMBUFFER = _numpy_global("numeric", "_frombuffer")
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,   # protocol-5 pickles of arrays
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,                 # bytes in Python-3 protocol-2 pickles
    ("builtins", "bytes"): bytes, ("__builtin__", "bytes"): bytes,
    ("builtins", "bytearray"): bytearray, ("__builtin__", "bytearray"): bytearray,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batches: resolves only the few globals needed to rebuild numpy arrays,
    so a crafted file cannot run code (plain ``pickle.load`` would call any function it names)."""

    def __init__(self, file: IO[bytes], source: object) -> None:
        super().__init__(file, encoding="bytes")  # the originals are Python 2 pickles
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise corrupt(self.source, f"refusing to load: the file references {module}.{name}, "
                                       "which a CIFAR batch never does (it may be malicious)",
                          "delete it and obtain the official archive again") from None


def load_pickle(file: IO[bytes], source: object) -> dict[str, Any]:
    """One CIFAR batch as a dict with str keys (the originals have bytes keys)."""
    try:
        obj = SafeUnpickler(file, source).load()
    except DatasetCorruptError:
        raise
    except Exception as err:  # truncated or garbled: UnpicklingError, EOFError, ValueError, ...
        raise corrupt(source, f"is not a readable pickle ({type(err).__name__}: {err})") from err
    if not isinstance(obj, dict):
        raise corrupt(source, f"holds a {type(obj).__name__}, expected a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def cifar_arrays(batch: dict[str, Any], label_key: str, num_classes: int, source: object) -> Arrays:
    """Images [N, 3, 32, 32] uint8 and labels [N] int64 out of one unpickled batch."""
    missing = [k for k in ("data", label_key) if k not in batch]
    if missing:
        raise corrupt(source, f"lacks the key(s) {missing} (has {sorted(batch)}); not a CIFAR batch of this data set")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise corrupt(source, f"'data' is a {desc}, expected uint8 [N, 3072]")
    labels = check_labels(batch[label_key], num_classes, source)
    if len(labels) != len(data):
        raise corrupt(source, f"holds {len(data)} images but {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar_files(paths: list[Path], label_key: str, num_classes: int) -> Arrays:
    """Concatenate batches stored as individual files (the extracted folder)."""
    parts = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                parts.append(cifar_arrays(load_pickle(f, path), label_key, num_classes, path))
        except OSError as err:
            raise corrupt(path, f"cannot be read ({err})") from err
    return concat_batches(parts)


def read_cifar_tar(archive: Path, members: list[str], label_key: str, num_classes: int) -> dict[str, Arrays]:
    """Read the named batches (by base name) straight out of the ``.tar.gz``, in one pass."""
    found: dict[str, Arrays] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for info in tar:
                base = posixpath.basename(info.name)
                if info.isfile() and base in members and base not in found:
                    source = f"{archive}!{info.name}"
                    # read whole first: a truncated archive is then the archive's error, not the member's
                    raw = tar.extractfile(info).read()  # type: ignore[union-attr]
                    batch = load_pickle(io.BytesIO(raw), source)
                    found[base] = cifar_arrays(batch, label_key, num_classes, source)
    except DatasetCorruptError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise corrupt(archive, f"is not a readable .tar.gz archive ({type(err).__name__}: {err})") from err
    missing = [m for m in members if m not in found]
    if missing:
        raise corrupt(archive, f"lacks the member(s) {missing}; is it the right archive, complete?")
    return found


def concat_batches(parts: list[Arrays]) -> Arrays:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# -------------------------------------------------------------------------------------------- SVHN

def read_svhn_mat(path: Path) -> Arrays:
    """Images [N, 3, 32, 32] uint8 and labels [N] int64 (label 10 -> digit 0)."""
    import scipy.io
    try:
        mat = scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except Exception as err:  # scipy raises ValueError, MatReadError, OSError, TypeError, ...
        raise corrupt(path, f"is not a readable MATLAB .mat file ({type(err).__name__}: {err})") from err
    missing = [k for k in ("X", "y") if k not in mat]
    if missing:
        raise corrupt(path, f"lacks the variable(s) {missing}; an SVHN file holds X (32x32x3xN) and y (Nx1)")
    x, y = mat["X"], np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[2] != 3 or x.dtype != np.uint8:
        raise corrupt(path, f"X is a {x.dtype} array of shape {x.shape}, expected uint8 [H, W, 3, N]")
    if x.shape[3] != len(y):
        raise corrupt(path, f"holds {x.shape[3]} images but {len(y)} labels")
    if y.size and not np.issubdtype(y.dtype, np.number):
        raise corrupt(path, f"y has dtype {y.dtype}, expected numbers")
    labels = np.where(y == 10, 0, y)  # SVHN writes digit 0 as class 10
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return images, check_labels(labels.astype(np.int64), 10, path)
