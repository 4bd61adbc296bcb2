"""One error hierarchy. The library raises; the CLI prints one line and exits non-zero."""

from __future__ import annotations


class EmbedkitError(Exception):
    """Base class of every error embedkit raises on purpose (bad input, missing weights, ...)."""


class AudioError(EmbedkitError):
    """A file could not be turned into usable audio (missing, unreadable, empty, NaN...)."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class DatasetError(EmbedkitError):
    """A dataset description (folder, manifest, FMA tracks.csv) is unusable."""


class BackboneError(EmbedkitError):
    """Unknown backbone name or a backbone that cannot be built."""


class ModelLoadingError(BackboneError):
    """Weights missing, corrupt, or for another architecture."""


class MissingDependencyError(EmbedkitError):
    """An optional dependency is not installed; the message names the pip command."""

    def __init__(self, package: str, install: str, why: str = ""):
        msg = f"{package} is required{' for ' + why if why else ''}: run `{install}`"
        super().__init__(msg)


class StoreError(EmbedkitError):
    """The embedding store is missing, mismatched or unreadable."""


class DatabaseError(EmbedkitError):
    """A results database cannot be opened or written (``embedkit tag --db``)."""


class ConfigMismatchError(EmbedkitError):
    """An artefact was produced with another backbone / preprocessing than the one requested."""


class EmbedkitWarning(UserWarning):
    """Warnings about data that was used but altered (padded, trimmed, resampled...)."""


def require(module: str, install: str, why: str = ""):
    """Import an optional dependency or raise MissingDependencyError naming the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised via monkeypatch in tests
        raise MissingDependencyError(module, install, why) from exc
