"""embedkit.errors: every deliberate error is an EmbedkitError importable from one module, and
first_line() turns any exception into the one line a message embeds."""

import pytest

from embedkit import errors
from embedkit.errors import EmbedkitError, TagWriteError, first_line


@pytest.mark.parametrize("name", ["CalibrationError", "ExportError", "StreamError", "TagWriteError"])
def test_moved_errors_live_in_errors_and_stay_importable_from_their_modules(name):
    import importlib

    home = {
        "CalibrationError": "embedkit.calibration",
        "ExportError": "embedkit.deploy.onnx_export",
        "StreamError": "embedkit.deploy.stream",
        "TagWriteError": "embedkit.deploy.filetags",
    }[name]
    cls = getattr(errors, name)
    assert issubclass(cls, EmbedkitError)
    assert getattr(importlib.import_module(home), name) is cls  # the module raises the same class


def test_tag_write_error_keeps_path_and_problem():
    exc = TagWriteError("a/b.mp3", "cannot write (Permission denied)")
    assert (exc.path, exc.problem) == ("a/b.mp3", "cannot write (Permission denied)")
    assert str(exc) == "a/b.mp3: cannot write (Permission denied)"


def test_first_line_of_a_one_line_message():
    assert first_line(ValueError("bad value")) == "bad value"
    assert first_line(ValueError("bad value"), with_type=True) == "ValueError: bad value"


@pytest.mark.parametrize("message", ["", "   ", "\n\n  \n"])
def test_an_empty_message_gives_the_type_name(message):
    assert first_line(RuntimeError(message)) == "RuntimeError"
    assert first_line(RuntimeError(message), with_type=True) == "RuntimeError"  # not "RuntimeError: "
    assert first_line(RuntimeError()) == "RuntimeError"


def test_a_multi_line_message_gives_its_first_line():
    exc = RuntimeError("Error(s) in loading state_dict for CNN:\n\tMissing key(s): fc.weight\n\tUnexpected: x")
    assert first_line(exc) == "Error(s) in loading state_dict for CNN:"
    assert first_line(exc, with_type=True) == "RuntimeError: Error(s) in loading state_dict for CNN:"


def test_leading_blank_lines_and_surrounding_spaces_are_skipped():
    assert first_line(OSError("\n  \n   disk full  \nmore")) == "disk full"


def test_the_limit_cuts_the_line_not_the_type_name():
    exc = ValueError("x" * 500 + "\nsecond")
    assert first_line(exc) == "x" * 300  # default limit
    assert first_line(exc, 200) == "x" * 200
    assert first_line(exc, limit=10, with_type=True) == "ValueError: " + "x" * 10
    assert first_line(exc, limit=None) == "x" * 500
    assert first_line(ValueError("short"), limit=300) == "short"


def test_keyerror_and_exception_subclasses():
    assert first_line(KeyError("labels"), with_type=True) == "KeyError: 'labels'"
    assert first_line(errors.StoreError("store gone")) == "store gone"


def test_a_broken_str_does_not_hide_the_error():
    class Broken(Exception):
        def __str__(self):
            raise RuntimeError("no")

    assert first_line(Broken("x")) == "Broken"
    assert first_line(Broken("x"), with_type=True) == "Broken"
