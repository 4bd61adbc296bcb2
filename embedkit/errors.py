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


class ConfigError(EmbedkitError, ValueError):
    """An option / config value is out of range or inconsistent.

    ``field`` names the config field the message starts with (e.g. ``weight_decay``); the CLI
    replaces it with its own option name (``--weight-decay``), so library messages name no
    command-line flag."""

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(message)


class SegmentError(ConfigError):
    """Windowing parameters that cannot cut a signal (non-positive, under one sample)."""


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


class DeviceError(EmbedkitError):
    """The requested compute device (cuda, mps) is not available or ran out of memory."""


class ReportError(EmbedkitError):
    """No usable runs, or the report cannot be written."""


class CalibrationError(EmbedkitError):
    """A calibration file that cannot be used (wrong labels, unknown method, malformed)."""


class ExportError(EmbedkitError):
    """A model that cannot be expressed as an ONNX graph (the message says why)."""


class StreamError(EmbedkitError):
    """A stream that cannot be read as audio: bad flags, malformed or non-audio bytes."""


class TagWriteError(EmbedkitError):
    """One file could not be tagged (the batch records it and goes on)."""

    def __init__(self, path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


class EmbedkitWarning(UserWarning):
    """Warnings about data that was used but altered (padded, trimmed, resampled...)."""


def require(module: str, install: str, why: str = ""):
    """Import an optional dependency or raise MissingDependencyError naming the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised via monkeypatch in tests
        raise MissingDependencyError(module, install, why) from exc


def first_line(exc: BaseException, limit: int | None = 300, with_type: bool = False) -> str:
    """An exception as one line for a one-line message: the first non-blank line of ``str(exc)``
    (stripped), else the exception type's name; the line is cut to ``limit`` characters (None: no
    limit). ``with_type`` prefixes the type name (``ValueError: bad value``; just ``ValueError``
    when the message is empty), for exceptions nobody anticipated, whose type says what failed.

        >>> first_line(ValueError("\\nbad value\\n  details"))
        'bad value'
        >>> first_line(KeyError("labels"), with_type=True)
        "KeyError: 'labels'"
    """
    name = type(exc).__name__
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not hide the error being reported
        text = ""
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    if limit is not None:
        line = line[:limit]
    if not line:
        return name
    return f"{name}: {line}" if with_type else line
