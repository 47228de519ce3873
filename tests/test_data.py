"""Tests of eenn.data: every reader on small files written in the real formats, the corrupt and
malicious cases, the search order, the (fake) download, the splits, and TensorLoader."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from eenn.data import (DataSplits, DatasetCorruptError, DatasetNotFoundError, TensorDataset, TensorLoader,
                       TrainTest, list_datasets, load_dataset, register_dataset)
from eenn.data import datasets as ds_mod
from eenn.data import sources
from eenn.data.loader import crop_flip

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No test sees the user's $EENN_DATA_DIR or writes to the real cache."""
    monkeypatch.delenv(sources.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


# ------------------------------------------------------------------------------- file writers

def idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    magic = magic if magic is not None else 0x0800 | arr.ndim
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, n_train=30, n_test=10, hw=(4, 5), gz=True, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *hw), dtype=np.uint8),
              "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *hw), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8)}
    for stem, arr in arrays.items():
        data = idx_bytes(arr)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return arrays


def cifar_batch(n, label_key="labels", num_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    batch = {b"batch_label": b"a batch", b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             label_key.encode(): [int(v) for v in np.arange(n) % num_classes], b"filenames": [b"x.png"] * n}
    if label_key == "fine_labels":
        batch[b"coarse_labels"] = [0] * n
    return batch


class Py2StylePickler(pickle._Pickler):
    """Writes bytes and str as Python 2 ``str`` (BINSTRING), like the original CIFAR files."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        short = len(raw) < 256
        self.write((pickle.SHORT_BINSTRING + bytes([len(raw)]) if short else
                    pickle.BINSTRING + struct.pack("<i", len(raw))) + raw)
        self.memoize(obj)

    dispatch[bytes] = dispatch[str] = save_py2_str


def py2_dumps(obj) -> bytes:
    buf = io.BytesIO()
    Py2StylePickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def write_cifar10(folder: Path, n=8, archive=False, dumps=lambda o: pickle.dumps(o, protocol=2)):
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {name: cifar_batch(n, seed=i) for i, name in enumerate(names)}
    blobs = {name: dumps(b) for name, b in batches.items()}
    folder.mkdir(parents=True, exist_ok=True)
    if archive:
        with tarfile.open(folder / "cifar-10-python.tar.gz", "w:gz") as tar:
            for name, blob in blobs.items():
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    else:
        (folder / "cifar-10-batches-py").mkdir(exist_ok=True)
        for name, blob in blobs.items():
            (folder / "cifar-10-batches-py" / name).write_bytes(blob)
    return batches


def load_splits(name, root, **kw) -> DataSplits:
    return load_dataset(name, data_dir=root, val_fraction=0.0, **kw)


# ------------------------------------------------------------------------------------ IDX

@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    arrays = write_idx_set(tmp_path / "mnist", gz=gz)
    s = load_splits("mnist", tmp_path)  # found in the subfolder named after the data set
    assert s.train.x.shape == (30, 1, 4, 5) and s.train.x.dtype == torch.uint8 and s.train.y.dtype == torch.int64
    assert torch.equal(s.train.x[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert torch.equal(s.test.y, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    assert s.info.input_size == (4, 5) and s.info.in_channels == 1 and s.info.num_classes == 10


def test_fashion_subfolder_hyphen_name(tmp_path):
    write_idx_set(tmp_path / "fashion-mnist")
    assert len(load_splits("fashion_mnist", tmp_path).train) == 30


@pytest.mark.parametrize("damage, expect", [
    ("truncate_gz", "decompress"), ("wrong_magic", "magic number"), ("count", "labels but"),
    ("short_data", "data bytes")])
def test_idx_corrupt(tmp_path, damage, expect):
    arrays = write_idx_set(tmp_path)
    target = tmp_path / "train-images-idx3-ubyte.gz"
    if damage == "truncate_gz":
        target.write_bytes(target.read_bytes()[:-20])
    elif damage == "wrong_magic":
        target.write_bytes(gzip.compress(idx_bytes(arrays["train-images-idx3-ubyte"], magic=0x0801)))
    elif damage == "count":
        target = tmp_path / "train-labels-idx1-ubyte.gz"
        target.write_bytes(gzip.compress(idx_bytes(arrays["train-labels-idx1-ubyte"][:-3])))
    else:
        target.write_bytes(gzip.compress(idx_bytes(arrays["train-images-idx3-ubyte"])[:-7]))
    with pytest.raises(DatasetCorruptError, match=expect) as err:
        load_splits("mnist", tmp_path)
    assert target.name in str(err.value) and "To fix" in str(err.value)


# ---------------------------------------------------------------------------------- CIFAR

@pytest.mark.parametrize("archive", [False, True])
@pytest.mark.parametrize("style", ["py3_protocol2", "py2"])
def test_cifar10_round_trip(tmp_path, archive, style):
    dumps = py2_dumps if style == "py2" else (lambda o: pickle.dumps(o, protocol=2))
    batches = write_cifar10(tmp_path, archive=archive, dumps=dumps)
    s = load_splits("cifar10", tmp_path)
    assert s.train.x.shape == (40, 3, 32, 32) and s.test.x.shape == (8, 3, 32, 32)
    first = batches["data_batch_1"][b"data"][0].reshape(3, 32, 32)
    assert torch.equal(s.train.x[0], torch.from_numpy(first))
    assert s.train.y.tolist() == sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert s.info.class_names[0] == "airplane" and s.info.in_channels == 3


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train, test = cifar_batch(12, "fine_labels", 100, seed=1), cifar_batch(5, "fine_labels", 100, seed=2)
    train[b"fine_labels"] = [99, *range(11)]
    (folder / "train").write_bytes(pickle.dumps(train, protocol=2))
    (folder / "test").write_bytes(pickle.dumps(test, protocol=2))
    s = load_splits("cifar100", tmp_path)
    assert s.train.y.tolist() == train[b"fine_labels"] and len(s.test) == 5
    assert s.info.num_classes == 100 and s.info.class_names[99] == "worm"


def test_cifar_batch_missing_keys(tmp_path):
    write_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, protocol=2))
    with pytest.raises(DatasetCorruptError, match=r"data_batch_3.*lacks the key"):
        load_splits("cifar10", tmp_path)


@pytest.mark.parametrize("keep", [200, 0.5])
def test_cifar_truncated_archive(tmp_path, keep):
    """Cut anywhere (in a member too), the archive is what is named as broken, not a member."""
    write_cifar10(tmp_path, n=200, archive=True)
    archive = tmp_path / "cifar-10-python.tar.gz"
    blob = archive.read_bytes()
    archive.write_bytes(blob[:keep if isinstance(keep, int) else int(len(blob) * keep)])
    with pytest.raises(DatasetCorruptError, match=r"cifar-10-python.tar.gz: is not a readable .tar.gz archive"):
        load_splits("cifar10", tmp_path)


def test_a_web_page_for_an_archive_is_one_line(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_text("<html>not found</html>")
    with pytest.raises(DatasetCorruptError) as err:
        load_splits("cifar10", tmp_path)
    assert "\n" in str(err.value) and "\n" not in err.value.summary  # tarfile lists each method it tried
    assert err.value.summary.startswith(f"{tmp_path / 'cifar-10-python.tar.gz'}: is not a readable .tar.gz archive")


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("archive", [False, True])
def test_malicious_pickle_is_refused(tmp_path, archive):
    marker = tmp_path / "pwned"
    evil = lambda obj: pickle.dumps({b"data": Evil(marker), b"labels": []}, protocol=2)  # noqa: E731
    write_cifar10(tmp_path, archive=archive, dumps=evil)
    with pytest.raises(DatasetCorruptError, match=r"refusing to load: the file references \w+\.system"):
        load_splits("cifar10", tmp_path)
    assert not marker.exists()


# ----------------------------------------------------------------------------------- SVHN

def test_svhn_round_trip_and_label_10(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 32, 3, 20), dtype=np.uint8)
    y = (np.arange(20) % 10 + 1).astype(np.uint8)[:, None]  # 1..10, 10 == digit 0
    scipy_io.savemat(tmp_path / "train_32x32.mat", {"X": x, "y": y})
    scipy_io.savemat(tmp_path / "test_32x32.mat", {"X": x[..., :6], "y": y[:6]})
    s = load_splits("svhn", tmp_path)
    assert s.train.x.shape == (20, 3, 32, 32) and s.train.y.min() == 0 and s.train.y.max() == 9
    assert torch.equal(s.train.x[3], torch.from_numpy(x[..., 3].transpose(2, 0, 1).copy()))
    assert s.train.y[9] == 0 and s.train.y[0] == 1

    scipy_io.savemat(tmp_path / "test_32x32.mat", {"images": x})
    with pytest.raises(DatasetCorruptError, match=r"test_32x32.mat.*lacks the variable"):
        load_splits("svhn", tmp_path)
    (tmp_path / "test_32x32.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(DatasetCorruptError, match="test_32x32.mat"):
        load_splits("svhn", tmp_path)


# ------------------------------------------------------------------------- search & download

def test_search_order(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "explicit", n_train=10)
    write_idx_set(tmp_path / "env" / "mnist", n_train=20)
    write_idx_set(tmp_path / "xdg-cache" / "eenn" / "datasets" / "mnist", n_train=30)
    monkeypatch.setenv(sources.ENV_VAR, str(tmp_path / "env"))
    assert len(load_splits("mnist", tmp_path / "explicit").train) == 10
    (tmp_path / "nothing-here").mkdir()
    with pytest.warns(UserWarning, match="no complete set of its files in data_dir .*nothing-here'; read from"):
        assert len(load_splits("mnist", tmp_path / "nothing-here").train) == 20  # falls through to the env var
    # a data_dir that is not there is a mistake (a typo), not a reason to read the files from elsewhere
    with pytest.raises(DatasetNotFoundError, match="data_dir .*not-a-folder' is not a folder"):
        load_splits("mnist", tmp_path / "not-a-folder")
    # $EENN_DATA_DIR follows the same rule: not a folder is refused, a folder without the files said
    monkeypatch.setenv(sources.ENV_VAR, str(tmp_path / "typo"))
    with pytest.raises(DatasetNotFoundError, match=r"\$EENN_DATA_DIR is .*typo', which is not a folder"):
        load_splits("mnist", None)
    monkeypatch.setenv(sources.ENV_VAR, str(tmp_path / "nothing-here"))
    with pytest.warns(UserWarning, match=r"no complete set of its files in \$EENN_DATA_DIR .*nothing-here'; read from") as w:
        assert len(load_splits("mnist", None).train) == 30
    assert w[0].filename == __file__  # the warning names the caller's line, not eenn's
    monkeypatch.delenv(sources.ENV_VAR)
    assert len(load_splits("mnist", None).train) == 30
    if not Path("/usr/share/datasets/mnist").exists():
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
        with pytest.raises(DatasetNotFoundError) as err:
            load_splits("mnist", tmp_path / "nothing-here")
        msg = str(err.value)
        assert "train-images-idx3-ubyte[.gz]" in msg and "download=True" in msg and "ossci-datasets" in msg
        places = ("nothing-here", "EENN_DATA_DIR", str(tmp_path / "empty"), "/usr/share/datasets/mnist")
        order = [msg.index(s) for s in places]
        assert order == sorted(order)


def _fake_fetch(files: dict[str, bytes]):
    def fetch(url, dest, timeout=None):
        Path(dest).write_bytes(files[url.rsplit("/", 1)[1]])
    return fetch


def test_download_success_and_checksum_mismatch(tmp_path, monkeypatch):
    src = write_idx_set(tmp_path / "remote")
    blobs = {f"{stem}.gz": (tmp_path / "remote" / f"{stem}.gz").read_bytes() for stem in src}
    monkeypatch.setattr(sources, "fetch_url", _fake_fetch(blobs))
    cache = sources.cache_dir("mnist")

    with pytest.raises(DatasetCorruptError, match="md5"):  # the real checksums do not match our bytes
        load_dataset("mnist", download=True)
    assert not cache.exists() or not any(cache.iterdir())

    good = tuple(dataclasses.replace(r, checksum=hashlib.md5(blobs[r.filename]).hexdigest())
                 for r in ds_mod.MNIST.remotes)
    monkeypatch.setattr(ds_mod, "MNIST", dataclasses.replace(ds_mod.MNIST, remotes=good))
    s = load_dataset("mnist", download=True, val_fraction=0.0)
    assert len(s.train) == 30 and sorted(p.name for p in cache.iterdir()) == sorted(blobs)


def test_download_failure_says_what_to_do(monkeypatch):
    def offline(url, dest, timeout=None):
        Path(dest).write_bytes(b"partial")
        raise urllib.error.URLError("no route to host")
    monkeypatch.setattr(sources, "fetch_url", offline)
    monkeypatch.setattr(ds_mod, "FASHION_MNIST", dataclasses.replace(ds_mod.FASHION_MNIST, system_dirs=()))
    expect = r"downloading http://fashion-mnist.*failed.*apt-get install dataset-fashion-mnist"
    with pytest.raises(DatasetNotFoundError, match=expect):
        load_dataset("fashion_mnist", download=True)
    assert not any(sources.cache_dir("fashion_mnist").iterdir())


# -------------------------------------------------------------------------- built-in sets & splits

@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason=f"{FASHION_DIR} missing (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_from_system_package():
    s = load_dataset("fashion_mnist")
    assert (len(s.train), len(s.val), len(s.test)) == (54000, 6000, 10000)
    assert s.train.x.shape[1:] == (1, 28, 28) and torch.bincount(s.val.y).tolist() == [600] * 10
    assert abs(s.info.mean[0] - 0.286) < 0.01 and abs(s.info.std[0] - 0.353) < 0.01


def test_digits_deterministic_and_stratified():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert (len(a.train), len(a.val), len(a.test)) == (1294, 144, 359)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.val.y, b.val.y)
    assert a.train.x.max() == 255 and a.info.input_size == (8, 8)
    c = load_dataset("digits", seed=1)
    assert torch.equal(a.test.x, c.test.x) and not torch.equal(a.val.x, c.val.x)  # fixed test, seeded val
    counts = torch.bincount(a.val.y, minlength=10)
    assert counts.min() >= 13 and counts.max() <= 16


def test_synthetic_deterministic_and_learnable():
    a, b = load_dataset("synthetic", seed=3), load_dataset("synthetic", seed=3)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.train.x, load_dataset("synthetic", seed=4).train.x)
    s = load_dataset("synthetic", num_classes=4, in_channels=3, input_size=(6, 7), num_samples=200)
    assert s.train.x.shape[1:] == (3, 6, 7) and s.info.num_classes == 4 and len(s.test) == 40
    centroids = torch.stack([a.train.x[a.train.y == k].float().mean(0) for k in range(10)])
    pred = torch.cdist(a.test.x.flatten(1).float(), centroids.flatten(1)).argmin(1)
    assert (pred == a.test.y).float().mean() > 0.9


def test_split_options_and_stats():
    s = load_dataset("synthetic", val_fraction=0.0)
    assert len(s.val) == 0 and len(s.train) == 480
    lim = load_dataset("synthetic", limit=50)
    assert max(len(lim.train), len(lim.val), len(lim.test)) == 50 and len(lim.val) == 48
    assert torch.equal(lim.train.x, load_dataset("synthetic", limit=50).train.x)
    x = lim.train.x.double() / 255
    assert lim.info.mean[0] == pytest.approx(x.mean().item())
    assert lim.info.std[0] == pytest.approx(x.std(unbiased=False).item())


def test_registry():
    assert {"digits", "fashion_mnist", "mnist", "cifar10", "cifar100", "svhn", "synthetic"} <= set(list_datasets())
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("digits")(lambda **kw: None)
    with pytest.raises(KeyError, match="did you mean 'digits'"):
        load_dataset("digitz")
    with pytest.raises(ValueError, match="does not accept option.*'bogus'.*accepts: none"):
        load_dataset("digits", bogus=1)
    with pytest.raises(ValueError, match="'noize'.*accepts: num_classes"):
        load_dataset("synthetic", noize=1)

    @register_dataset("tiny_custom_test")
    def tiny(*, data_dir=None, download=False, seed=0):
        x = torch.arange(40, dtype=torch.uint8).view(10, 1, 2, 2)
        return TrainTest(TensorDataset(x, torch.arange(10) % 2), TensorDataset(x[:4], torch.arange(4) % 2), ("a", "b"))
    try:
        s = load_dataset("tiny_custom_test", val_fraction=0.2)
        assert (len(s.train), len(s.val), len(s.test)) == (8, 2, 4) and s.info.class_names == ("a", "b")
    finally:
        ds_mod.DATASETS._items.pop("tiny_custom_test")


def test_tensor_dataset_basics():
    d = TensorDataset(np.zeros((5, 1, 2, 2), np.uint8), [0, 1, 2, 3, 4])
    assert d.y.dtype == torch.int64 and len(d.subset([4, 0])) == 2 and d.subset([4, 0]).y.tolist() == [4, 0]
    assert d.to("cpu").device.type == "cpu"
    with pytest.raises(TypeError):
        TensorDataset(torch.zeros(5, 1, 2, 2), torch.zeros(5))


# --------------------------------------------------------------------------------------- loader

def id_dataset(n, c=1, hw=(6, 6)):
    """Labels are sample ids, so batches reveal which samples they hold."""
    x = torch.randint(0, 256, (n, c, *hw), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, torch.arange(n))


def ids(loader):
    return torch.cat([y for _, y in loader]).tolist()


def test_loader_epoch_covers_everything_once():
    d = id_dataset(23)
    plain = TensorLoader(d, 5)
    assert len(plain) == 5 and ids(plain) == list(range(23))
    sh = TensorLoader(d, 5, shuffle=True, seed=1)
    order0 = ids(sh)
    assert sorted(order0) == list(range(23)) and order0 != list(range(23))
    assert ids(sh) == order0  # same (seed, epoch) -> same order
    sh.set_epoch(1)
    order1 = ids(sh)
    assert sorted(order1) == list(range(23)) and order1 != order0
    resumed = TensorLoader(d, 5, shuffle=True, seed=1)
    resumed.set_epoch(1)
    assert ids(resumed) == order1
    x, y = next(iter(plain))
    assert x.dtype == torch.float32 and x.shape == (5, 1, 6, 6) and y.dtype == torch.int64


def test_loader_drop_last():
    d = id_dataset(10)
    keep, drop = TensorLoader(d, 3), TensorLoader(d, 3, drop_last=True)
    assert len(keep) == 4 and [len(y) for _, y in keep] == [3, 3, 3, 1]
    assert len(drop) == 3 and [len(y) for _, y in drop] == [3, 3, 3]


@pytest.mark.parametrize("n", [12, 10])
def test_loader_ddp_sharding(n):
    d = id_dataset(n)
    shards = [ids(TensorLoader(d, 2, shuffle=True, seed=5, rank=r, world_size=3)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == 4
    assert len({len(TensorLoader(d, 2, rank=r, world_size=3)) for r in range(3)}) == 1
    flat = sum(shards, [])
    assert set(flat) == set(range(n)) and len(flat) - len(set(flat)) == 12 - n  # only wrap-around padding repeats


def test_loader_normalisation():
    s = load_dataset("synthetic", in_channels=3)
    loader = TensorLoader(s.train, 64, mean=s.info.mean, std=s.info.std)
    x = torch.cat([b for b, _ in loader])
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4 and (x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2
    raw = torch.cat([b for b, _ in TensorLoader(s.train, 64)])
    assert torch.allclose(raw, s.train.x.float() / 255)


def test_input_spec_describes_a_data_set_and_round_trips():
    import json

    from eenn.data import InputSpec

    s = load_dataset("synthetic", in_channels=3, input_size=(6, 5), num_classes=4)
    spec = InputSpec.from_info(s.info)
    assert spec.shape == (3, 6, 5) and spec.mean == s.info.mean and spec.std == s.info.std
    assert spec.class_names == s.info.class_names == ("class_0", "class_1", "class_2", "class_3")
    back = InputSpec.from_dict(json.loads(json.dumps(spec.to_dict())))  # exact through JSON
    assert back == spec and back.mean == spec.mean and back.std == spec.std
    with pytest.raises(ValueError, match="std must be positive"):
        InputSpec((1, 2, 2), (0.5,), (0.0,))
    with pytest.raises(ValueError, match="per-channel"):
        InputSpec((3, 2, 2), (0.1, 0.2), (1.0, 1.0, 1.0))
    with pytest.raises(TypeError, match="uint8"):
        spec.normalize(torch.zeros(1, 3, 6, 5))
    with pytest.raises(ValueError, match="do not fit"):
        spec.normalize(torch.zeros(1, 3, 5, 6, dtype=torch.uint8))
    with pytest.raises(ValueError, match="not both"):
        TensorLoader(s.train, 8, mean=s.info.mean, std=s.info.std, input_spec=spec)
    with pytest.raises(ValueError, match="input_spec says"):
        TensorLoader(load_dataset("synthetic", in_channels=3).train, 8, input_spec=spec)


def test_every_normalisation_user_gives_the_same_floats():
    """The loader, net.preprocess, the trainer's epoch context and the server turn the same uint8
    pixels into bit-identical inputs: x * scale + shift with float32 factors rounded from float64."""
    import eenn
    from eenn.data import InputSpec
    from eenn.objectives import EpochContext
    from eenn.serve.inputs import decode_body
    from _helpers import npy_bytes

    s = load_dataset("synthetic", in_channels=3, input_size=8, num_samples=100)
    spec = InputSpec.from_info(s.info)
    assert len(set(spec.mean)) == 3 and len(set(spec.std)) == 3  # per channel, none trivial
    px = s.train.x[:16]
    ds = TensorDataset(px, s.train.y[:16])
    loader_x = next(iter(TensorLoader(ds, 16, input_spec=spec)))[0]
    by_stats = next(iter(TensorLoader(ds, 16, mean=s.info.mean, std=s.info.std)))[0]
    net = eenn.create_network("lenet5", in_channels=3, num_classes=10, input_size=8)
    net.input_spec = spec
    pre = net.preprocess(px)
    ctx = EpochContext(0, 1, net, s.train, spec.mean, spec.std, torch.device("cpu"), 0)
    manifest = {"input_shape": list(spec.shape), "preprocess": {"mean": list(spec.mean), "std": list(spec.std)}}
    served = decode_body(npy_bytes(px.numpy()), "application/x-npy", manifest)
    # the arithmetic as the loader and the server have always done it, by hand in NumPy
    mean, std = np.asarray(spec.mean), np.asarray(spec.std)
    scale = (1.0 / (255.0 * std)).astype(np.float32).reshape(1, 3, 1, 1)
    shift = (-mean / std).astype(np.float32).reshape(1, 3, 1, 1)
    want = px.numpy().astype(np.float32) * scale + shift
    assert loader_x.dtype == pre.dtype == torch.float32 and served.dtype == np.float32
    for got in (loader_x, by_stats, pre, ctx.normalise(px), torch.from_numpy(served)):
        assert np.array_equal(got.numpy(), want)
    assert torch.equal(net.preprocess(px[0]), pre[0])  # one sample [C, H, W] too


def test_loader_augmentation():
    d = id_dataset(40, c=3, hw=(8, 8))
    plain = TensorLoader(d, 16)
    aug = TensorLoader(d, 16, augment=True, seed=2)
    xa = torch.cat([x for x, _ in aug])
    assert xa.shape == (40, 3, 8, 8) and ids(aug) == ids(plain)
    assert not torch.equal(xa, torch.cat([x for x, _ in plain]))
    assert torch.equal(xa, torch.cat([x for x, _ in aug]))  # reproducible per (seed, epoch)
    aug.set_epoch(1)
    assert not torch.equal(xa, torch.cat([x for x, _ in aug]))
    flip_only = torch.cat([x for x, _ in TensorLoader(d, 16, augment=True, crop_padding=0)])
    flipped = [torch.allclose(a, b.flip(-1)) for a, b in zip(flip_only, d.x.float() / 255)]
    same = [torch.allclose(a, b) for a, b in zip(flip_only, d.x.float() / 255)]
    assert all(f or k for f, k in zip(flipped, same)) and 5 < sum(flipped) < 35


def test_crop_flip_matches_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 2, 5, 7), dtype=torch.uint8, generator=g)
    top, left = torch.randint(0, 5, (6,), generator=g), torch.randint(0, 5, (6,), generator=g)
    flip = torch.tensor([True, False, True, False, True, False])
    out = crop_flip(x, top, left, flip, padding=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(6):  # per-sample reference
        ref = padded[i, :, top[i]:top[i] + 5, left[i]:left[i] + 7]
        assert torch.equal(out[i], ref.flip(-1) if flip[i] else ref)


def test_a_validation_split_rounding_to_nothing_is_refused():
    with pytest.raises(ValueError, match=r"val_fraction 0.0001 of its 1438 training samples leaves no validation"):
        load_dataset("digits", val_fraction=0.0001)


def test_a_limit_below_the_classes_keeps_classes_chosen_by_the_seed():
    """Stratified and seeded: with fewer samples than classes, which classes keep one follows the
    seed (it used to be always the lowest ones)."""
    kept = {tuple(sorted(set(load_dataset("digits", seed=s, limit=4).train.y.tolist()))) for s in range(6)}
    assert len(kept) > 1 and all(len(k) == 4 for k in kept)
