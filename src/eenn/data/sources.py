"""Where a data set's files live, and how to fetch them.

``locate`` searches, in this order, and takes the first place that holds a complete set of files:

1. the explicit ``data_dir`` (the files directly in it, or in a subfolder named after the data set;
   the loaders refuse a ``data_dir`` that is not a folder rather than search on without it),
2. ``$EENN_DATA_DIR`` (same rule),
3. the user cache ``${XDG_CACHE_HOME:-~/.cache}/eenn/datasets/<name>``,
4. well-known system folders (e.g. ``/usr/share/datasets/fashion-mnist`` from the Debian package).

``download`` fetches the official files into the user cache, verifying each checksum before the
file is renamed into place, so an interrupted or altered download never leaves a file behind.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import DatasetCorruptError, DatasetNotFoundError

ENV_VAR = "EENN_DATA_DIR"
DOWNLOAD_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Layout:
    """One complete way of storing the data: each key must be found under one of its relative paths."""
    tag: str
    files: dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class Remote:
    """One file to download into the cache, with its checksum (``md5`` or ``sha256``)."""
    filename: str
    url: str
    checksum: str
    algorithm: str = "md5"


@dataclass(frozen=True)
class Source:
    name: str                                   # registry name, also the cache subfolder
    layouts: tuple[Layout, ...]                 # tried in order within each folder
    folder_names: tuple[str, ...] = ()          # subfolders of data_dir / $EENN_DATA_DIR to try
    remotes: tuple[Remote, ...] = ()
    system_dirs: tuple[str, ...] = ()
    advice: str = ""                            # another way to obtain it (e.g. a system package)

    def subfolders(self) -> tuple[str, ...]:
        names = (self.name, self.name.replace("_", "-"), *self.folder_names)
        return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class Found:
    tag: str
    paths: dict[str, Path]
    folder: Path


def cache_dir(name: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "eenn" / "datasets" / name


def search_places(source: Source, data_dir: str | os.PathLike | None) -> list[tuple[str, list[Path]]]:
    """(description, folders) for each place, in search order."""
    places: list[tuple[str, list[Path]]] = []
    for label, base in (("data_dir", data_dir), (f"${ENV_VAR}", os.environ.get(ENV_VAR) or None)):
        if base is None:
            places.append((f"{label} (not given)" if label == "data_dir" else f"{label} (not set)", []))
            continue
        root = Path(base).expanduser()
        places.append((label, [root, *(root / sub for sub in source.subfolders())]))
    places.append(("user cache", [cache_dir(source.name)]))
    places.extend(("system location", [Path(d)]) for d in source.system_dirs)
    return places


def _match(folder: Path, layout: Layout) -> dict[str, Path] | None:
    paths = {}
    for key, candidates in layout.files.items():
        hit = next((folder / c for c in candidates if (folder / c).is_file()), None)
        if hit is None:
            return None
        paths[key] = hit
    return paths


def locate(source: Source, data_dir: str | os.PathLike | None) -> Found | None:
    for _, folders in search_places(source, data_dir):
        for folder in folders:
            if not folder.is_dir():
                continue
            for layout in source.layouts:
                paths = _match(folder, layout)
                if paths is not None:
                    return Found(layout.tag, paths, folder)
    return None


def _describe_layouts(source: Source) -> str:
    def alternatives(cands: tuple[str, ...]) -> str:
        if len(cands) == 2 and cands[0] == cands[1] + ".gz":
            return f"{cands[1]}[.gz]"
        return " or ".join(cands)

    return "\n".join("  - " + ", ".join(map(alternatives, layout.files.values())) for layout in source.layouts)


def _how_to_obtain(source: Source, downloading: bool) -> str:
    ways = []
    if source.remotes and not downloading:
        if len(source.remotes) == 1:
            urls = source.remotes[0].url
        else:  # several files from one folder: name the folder
            urls = ", ".join(dict.fromkeys(r.url.rsplit("/", 1)[0] + "/" for r in source.remotes))
        ways.append(f"pass download=True (CLI: --download) to fetch them from {urls} into {cache_dir(source.name)}")
    if source.advice:
        ways.append(source.advice)
    ways.append(f"put the files in a folder and pass data_dir=... (CLI: --data-dir) or set ${ENV_VAR}")
    return "To obtain them: " + "; or ".join(ways) + "."


def not_found_error(source: Source, data_dir: str | os.PathLike | None) -> DatasetNotFoundError:
    where = []
    for i, (label, folders) in enumerate(search_places(source, data_dir), 1):
        where.append(f"  {i}. {label}" + (": " + ", ".join(map(str, folders)) if folders else ""))
    msg = (f"data set {source.name!r}: files not found.\nLooked for one of these sets of files:\n"
           f"{_describe_layouts(source)}\nin these places, in order:\n" + "\n".join(where) + "\n"
           + _how_to_obtain(source, downloading=False))
    return DatasetNotFoundError(msg)


# ---------------------------------------------------------------------------------------- download

def fetch_url(url: str, dest: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Copy ``url`` into the file ``dest``. Tests replace this function to run without a network."""
    request = urllib.request.Request(url, headers={"User-Agent": "eenn-data/1"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as out:
        while chunk := response.read(1 << 20):
            out.write(chunk)


def file_checksum(path: Path, algorithm: str = "md5") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download(source: Source) -> Path:
    """Fetch every remote file missing from the cache; returns the cache folder."""
    if not source.remotes:
        raise DatasetNotFoundError(f"data set {source.name!r} has no download location. "
                                   + _how_to_obtain(source, downloading=True))
    folder = cache_dir(source.name)
    folder.mkdir(parents=True, exist_ok=True)
    for remote in source.remotes:
        target = folder / remote.filename
        if target.is_file():
            continue
        fd, tmp_name = tempfile.mkstemp(prefix=f".{remote.filename}.", suffix=".part", dir=folder)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            try:
                fetch_url(remote.url, tmp, DOWNLOAD_TIMEOUT_S)
            except Exception as err:  # URLError, HTTPError, timeout, connection reset, disk full...
                raise DatasetNotFoundError(
                    f"data set {source.name!r}: downloading {remote.url} failed ({type(err).__name__}: {err}). "
                    "This machine may have no internet access. "
                    + _how_to_obtain(source, downloading=True)) from err
            actual = file_checksum(tmp, remote.algorithm)
            if actual != remote.checksum:
                raise DatasetCorruptError(
                    f"{remote.url}: the downloaded file has {remote.algorithm} {actual}, expected {remote.checksum} "
                    f"(truncated download, a proxy page, or a changed file); nothing was kept in {folder}. "
                    "To fix: retry later, or obtain the file another way and pass data_dir=...")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return folder
