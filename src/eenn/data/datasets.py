"""The dataset registry, the built-in data sets, and ``load_dataset``.

A builder is registered under a name and called as ``builder(data_dir=, download=, seed=, **options)``;
it returns a ``TrainTest`` (train and official test ``TensorDataset``, class names). ``load_dataset``
then carves the validation split out of train, applies ``limit`` and computes mean/std.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from ..registry import Registry, check_options, is_whole
from ..userframe import caller_stacklevel
from .core import DataSplits, TensorDataset, cap, complement, split_off, stratified_pick
from .formats import concat_batches, read_cifar_files, read_cifar_tar, read_idx_pair, read_svhn_mat
from .errors import DatasetNotFoundError
from .tensors import check_kind, split_info
from .sources import (ENV_VAR, Found, Layout, Remote, Source, download as download_source, locate,
                      not_found_error)


class TrainTest(NamedTuple):
    train: TensorDataset
    test: TensorDataset
    class_names: tuple[str, ...]


DATASETS: Registry[Callable[..., TrainTest]] = Registry("dataset")

# Seeds of the independent random streams: (user seed, stream id).
_VAL_STREAM, _LIMIT_STREAM = 1, 2
_FIXED_TEST_SEED = (0, 0)  # data sets without an official test split get the same one whatever the seed
DIGIT_NAMES = tuple(str(i) for i in range(10))


def register_dataset(name: str) -> Callable[[Callable[..., TrainTest]], Callable[..., TrainTest]]:
    """Decorator: ``@register_dataset("mine") def build(*, data_dir, download, seed, **options) -> TrainTest``."""
    return DATASETS.register(name)


def list_datasets() -> list[str]:
    return DATASETS.names()


def dataset_key(name: str) -> str:
    """The registry's spelling of a data set's name: case, surrounding spaces and ``-`` against
    ``_`` do not matter (``Fashion-MNIST`` is ``fashion_mnist``)."""
    return str(name).strip().lower().replace("-", "_")


def load_dataset(name: str, *, data_dir: str | os.PathLike | None = None, val_fraction: float = 0.1,
                 seed: int = 0, download: bool = False, limit: int | None = None, **options: Any) -> DataSplits:
    """Train / val / test splits of a registered data set, plus its ``DatasetInfo``.

    The test split is the official one; val is a stratified, seeded ``val_fraction`` of the official
    train split; ``limit`` caps each split (stratified, seeded); mean/std are those of the final train.
    """
    key = dataset_key(name)
    key = key if key in DATASETS else name
    builder = DATASETS.get(key)
    # a folder named explicitly that is not there is a mistake, not a reason to take the files from somewhere else
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise DatasetNotFoundError(
            f"data set {key!r}: data_dir {os.fspath(data_dir)!r} is not a folder. Give the folder that holds the files "
            f"(or a subfolder {key!r} of it), or leave data_dir (CLI: --data-dir) out to search ${ENV_VAR}, the user "
            "cache and the system folders")
    env = os.environ.get(ENV_VAR) or None
    if data_dir is None and env is not None and not Path(env).expanduser().is_dir():
        raise DatasetNotFoundError(
            f"data set {key!r}: ${ENV_VAR} is {env!r}, which is not a folder. Point it at the folder that holds the "
            f"data sets (each in a subfolder named after it), or unset it to search the user cache and the system folders")
    check_options(f"data set {key!r}", builder, options, skip=("data_dir", "download", "seed"))
    raw = builder(data_dir=data_dir, download=download, seed=seed, **options)
    train, val = split_off(raw.train, val_fraction, (seed, _VAL_STREAM))
    if val_fraction > 0 and len(val) == 0:
        raise ValueError(f"data set {key!r}: val_fraction {val_fraction} of its {len(raw.train)} training samples "
                         f"leaves no validation samples (thresholds are calibrated on them); give at least "
                         f"{1 / len(raw.train):.2g}" if len(raw.train) else f"data set {key!r} has no training samples")
    train, val, test = (cap(ds, limit, (seed, _LIMIT_STREAM, i)) for i, ds in enumerate((train, val, raw.test)))
    # pixels (normalised by the train split's statistics), token ids or features, as from_tensors reads them
    who = f"data set {key!r}"
    kind = check_kind("train", raw.train.x, who)
    if check_kind("test", raw.test.x, who) != kind or raw.test.x.shape[1:] != raw.train.x.shape[1:]:
        raise ValueError(f"{who}: its test samples are {raw.test.kind} of shape {list(raw.test.x.shape[1:])}, its "
                         f"training samples {raw.train.kind} of shape {list(raw.train.x.shape[1:])}; a builder must "
                         "return one kind of sample of one shape")
    if kind == "features" and train.x.dtype != torch.float32:  # the dtype the network computes in
        train, val, test = (TensorDataset(ds.x.float(), ds.y) for ds in (train, val, test))
    info = split_info(key, kind, train.x, tuple(raw.class_names),
                      split={"seed": seed, "val_fraction": val_fraction, "limit": limit})
    return DataSplits(train=train, val=val, test=test, info=info)


# ------------------------------------------------------------------------------------------ helpers

def _find(source: Source, data_dir: str | os.PathLike | None, download: bool) -> Found:
    found = locate(source, data_dir)
    if found is None and download:
        download_source(source)
        found = locate(source, data_dir)
    if found is None:
        raise not_found_error(source, data_dir)
    folder = found.folder.resolve()
    asked = ("data_dir", data_dir) if data_dir is not None else (f"${ENV_VAR}", os.environ.get(ENV_VAR) or None)
    if asked[1] is not None and Path(asked[1]).expanduser().resolve() not in (folder, *folder.parents):
        warnings.warn(f"data set {source.name!r}: no complete set of its files in {asked[0]} {os.fspath(asked[1])!r}; "
                      f"read from {found.folder} instead", stacklevel=caller_stacklevel())
    return found



def _split_fixed_test(x: np.ndarray, y: np.ndarray, names: tuple[str, ...], fraction: float = 0.2) -> TrainTest:
    """A stratified train/test split that does not depend on the user's seed."""
    test_idx = stratified_pick(y, round(fraction * len(y)), _FIXED_TEST_SEED)
    full = TensorDataset(x, y)
    return TrainTest(full.subset(complement(len(y), test_idx)), full.subset(test_idx), names)


# ------------------------------------------------------------------------------------- in-memory sets

@register_dataset("digits")
def build_digits(*, data_dir=None, download=False, seed=0) -> TrainTest:
    """scikit-learn's 1,797 handwritten digits (8x8, values 0..16), bundled with the wheel."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return _split_fixed_test(x, bunch.target.astype(np.int64), DIGIT_NAMES)


@register_dataset("synthetic")
def build_synthetic(*, data_dir=None, download=False, seed=0, num_classes: int = 10, in_channels: int = 1,
                    input_size: int | tuple[int, int] = 8, num_samples: int = 600, noise: float = 40.0) -> TrainTest:
    """Each class is a fixed random template; a sample is its template plus Gaussian noise.
    ``num_samples`` in all, 20% of them the test split; everything is a function of ``seed``."""
    for key, value, least in (("num_classes", num_classes, 2), ("in_channels", in_channels, 1),
                              ("num_samples", num_samples, 1)):
        if not is_whole(value, least):
            raise ValueError(f"data set 'synthetic': {key} must be an int >= {least}, got {value!r}")
    size = [input_size] * 2 if is_whole(input_size, 1) else input_size
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(is_whole(s, 1) for s in size)):
        raise ValueError(f"data set 'synthetic': input_size must be a positive int or (height, width), "
                         f"got {input_size!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float, np.floating)) or not 0 <= noise < float("inf"):
        raise ValueError(f"data set 'synthetic': noise must be a finite number >= 0 (pixel std), got {noise!r}")
    h, w = int(size[0]), int(size[1])
    rng = np.random.default_rng([seed, 0x5EED])
    templates = rng.integers(0, 256, size=(num_classes, in_channels, h, w)).astype(np.float32)
    y = rng.permutation(np.arange(num_samples) % num_classes).astype(np.int64)
    x = templates[y] + rng.normal(0.0, noise, size=(num_samples, in_channels, h, w)).astype(np.float32)
    x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return _split_fixed_test(x, y, tuple(f"class_{i}" for i in range(num_classes)))


# ---------------------------------------------------------------------------------------- IDX sets

_IDX = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


def _idx_source(name: str, base_url: str, md5: dict[str, str], **kw: Any) -> Source:
    layout = Layout("idx", {key: (f"{stem}.gz", stem) for key, stem in _IDX.items()})
    remotes = tuple(Remote(f"{stem}.gz", f"{base_url}{stem}.gz", md5[key]) for key, stem in _IDX.items())
    return Source(name, (layout,), remotes=remotes, **kw)


FASHION_MNIST = _idx_source(
    "fashion_mnist", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    {"train_images": "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "train_labels": "25c81989df183df01b3e8a0aad5dffbe",
     "test_images": "bef4ecab320f06d8554ea6380940ec79", "test_labels": "bb300cfdad3c16e7a12a480ee83cd310"},
    folder_names=("FashionMNIST/raw",), system_dirs=("/usr/share/datasets/fashion-mnist",),
    advice="on Debian/Ubuntu, `apt-get install dataset-fashion-mnist` (as root) installs them "
           "in /usr/share/datasets/fashion-mnist")
MNIST = _idx_source(
    "mnist", "https://ossci-datasets.s3.amazonaws.com/mnist/",
    {"train_images": "f68b3c2dcbeaaa9fbdd348bbdeb94873", "train_labels": "d53e105ee54ea40749a09fcbcd1e9432",
     "test_images": "9fb629c4189551a2d022fa330f9573f3", "test_labels": "ec29112dd5afa0611ce80d1b7f02629c"},
    folder_names=("MNIST/raw",), system_dirs=("/usr/share/datasets/mnist",))
FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def _build_idx(source: Source, names: tuple[str, ...], data_dir, download: bool) -> TrainTest:
    p = _find(source, data_dir, download).paths
    train = read_idx_pair(p["train_images"], p["train_labels"], len(names))
    test = read_idx_pair(p["test_images"], p["test_labels"], len(names))
    return TrainTest(TensorDataset(*train), TensorDataset(*test), names)


@register_dataset("fashion_mnist")
def build_fashion_mnist(*, data_dir=None, download=False, seed=0) -> TrainTest:
    return _build_idx(FASHION_MNIST, FASHION_NAMES, data_dir, download)


@register_dataset("mnist")
def build_mnist(*, data_dir=None, download=False, seed=0) -> TrainTest:
    return _build_idx(MNIST, DIGIT_NAMES, data_dir, download)


# -------------------------------------------------------------------------------------- CIFAR sets

def _cifar_source(name: str, folder: str, members: list[str], archive: str, url: str, md5: str) -> Source:
    extracted = Layout("folder", {m: (f"{folder}/{m}", m) for m in members})
    packed = Layout("archive", {"archive": (archive,)})
    return Source(name, (extracted, packed), folder_names=(name.replace("cifar", "cifar-"),),
                  remotes=(Remote(archive, url, md5),))


_C10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10 = _cifar_source("cifar10", "cifar-10-batches-py", [*_C10_TRAIN, "test_batch"], "cifar-10-python.tar.gz",
                        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")
CIFAR100 = _cifar_source("cifar100", "cifar-100-python", ["train", "test"], "cifar-100-python.tar.gz",
                         "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85")
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_NAMES = tuple("""
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can
castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck
pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk
skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger
tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split())


def _build_cifar(source: Source, train_members: list[str], test_member: str, label_key: str,
                 names: tuple[str, ...], data_dir, download: bool) -> TrainTest:
    found = _find(source, data_dir, download)
    k = len(names)
    if found.tag == "archive":
        batches = read_cifar_tar(found.paths["archive"], [*train_members, test_member], label_key, k)
        train = concat_batches([batches[m] for m in train_members])
        test = batches[test_member]
    else:
        train = read_cifar_files([found.paths[m] for m in train_members], label_key, k)
        test = read_cifar_files([found.paths[test_member]], label_key, k)
    return TrainTest(TensorDataset(*train), TensorDataset(*test), names)


@register_dataset("cifar10")
def build_cifar10(*, data_dir=None, download=False, seed=0) -> TrainTest:
    return _build_cifar(CIFAR10, _C10_TRAIN, "test_batch", "labels", CIFAR10_NAMES, data_dir, download)


@register_dataset("cifar100")
def build_cifar100(*, data_dir=None, download=False, seed=0) -> TrainTest:
    """The 100 fine labels (the 20 coarse super-classes are not used)."""
    return _build_cifar(CIFAR100, ["train"], "test", "fine_labels", CIFAR100_NAMES, data_dir, download)


# --------------------------------------------------------------------------------------------- SVHN

SVHN = Source("svhn", (Layout("mat", {"train": ("train_32x32.mat",), "test": ("test_32x32.mat",)}),),
              remotes=(Remote("train_32x32.mat", "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
                              "e26dedcc434d2e4c54c9b2d4a06d8373"),
                       Remote("test_32x32.mat", "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
                              "eb5a983be6a315427106f1b164d9cef3")))


@register_dataset("svhn")
def build_svhn(*, data_dir=None, download=False, seed=0) -> TrainTest:
    """SVHN cropped digits, format 2 (the 'extra' set is not used)."""
    p = _find(SVHN, data_dir, download).paths
    return TrainTest(TensorDataset(*read_svhn_mat(p["train"])), TensorDataset(*read_svhn_mat(p["test"])), DIGIT_NAMES)
