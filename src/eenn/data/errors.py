"""The two errors the data layer raises for missing or broken files. Both carry a message meant
for a person: what was looked for or what is wrong, and what to do about it."""
from __future__ import annotations


class _OneLine:
    @property
    def summary(self) -> str:
        """The message on one line, for a shell (the CLI prints this)."""
        return " ".join(ln.strip() for ln in str(self.args[0] if self.args else "").splitlines() if ln.strip())


class DatasetNotFoundError(_OneLine, FileNotFoundError):
    """The data set's files are in none of the searched places (or a download failed); its
    ``summary``: what is missing, the files and places looked at, and how to get them."""


class DatasetCorruptError(_OneLine, ValueError):
    """A data file exists but cannot be read: truncated, wrong format, inconsistent, or unsafe."""


def corrupt(path: object, what: str, fix: str | None = None) -> DatasetCorruptError:
    """Build the standard message: which file, what is wrong, what to do."""
    fix = fix or "delete it and obtain it again (re-download, or reinstall the package that provided it)"
    return DatasetCorruptError(f"{path}: {what}. To fix: {fix}.")
