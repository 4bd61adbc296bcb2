"""embedkit.runs and the folds every approach shares: one protocol rule, run ids, the
mismatch check, the run record of old and new metrics.json, and folds handed down by the
pipeline equal the folds each trainer would have made itself."""

from __future__ import annotations

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedkit.errors import ConfigError, ConfigMismatchError
from embedkit.evaluate import make_folds, with_validation
from embedkit.runs import RunRecord, check_match, choose_protocol, diff, run_id


def table(n_per_class: int, n_classes: int, split: bool = False, groups: int = 0) -> pd.DataFrame:
    rows = []
    for c in range(n_classes):
        for i in range(n_per_class):
            s = ("train", "train", "val", "test")[i % 4] if split else None
            g = f"a{(c * n_per_class + i) % groups}" if groups else None
            rows.append(
                {"track_id": f"c{c}/{i:03d}", "path": f"/d/c{c}/{i}.wav", "label": f"c{c}", "split": s, "group": g}
            )
    return pd.DataFrame(rows)


@settings(max_examples=25, deadline=None)
@given(
    n_per_class=st.integers(6, 14),
    n_classes=st.integers(2, 4),
    protocol=st.sampled_from(["cv", "holdout", "split"]),
    val_size=st.sampled_from([0.0, 0.15, 0.2]),
    seed=st.integers(0, 3),
    groups=st.sampled_from([0, 7]),
)
def test_handed_down_folds_equal_the_folds_a_trainer_makes(n_per_class, n_classes, protocol, val_size, seed, groups):
    """The pipeline makes folds once without validation parts; each trainer carves its own
    (``with_validation``). That equals what ``make_folds`` with the trainer's val_size gives, so
    handing folds down changes no fold of any approach."""
    t = table(n_per_class, n_classes, split=protocol == "split", groups=groups)
    k = 3
    direct = make_folds(t, protocol, k, 0.25, seed, val_size)
    handed = with_validation(make_folds(t, protocol, k, 0.25, seed), t, val_size, seed)
    assert [(f.name, f.train, f.test, f.val) for f in handed] == [(f.name, f.train, f.test, f.val) for f in direct]


def test_one_protocol_rule_and_cv_check():
    t = table(4, 2)
    assert choose_protocol(t) == "holdout" and choose_protocol(t, cv=3) == "cv"
    assert (
        choose_protocol(table(4, 2, split=True)) == "split"
        and choose_protocol(table(4, 2, split=True), protocol="holdout") == "holdout"
    )
    with pytest.raises(ConfigError, match="cv needs K >= 2") as e:
        choose_protocol(t, cv=1)
    assert e.value.field == "cv"
    with pytest.raises(ConfigError, match="unknown protocol"):
        choose_protocol(t, protocol="loo")


def test_run_ids_fresh_and_deterministic():
    a, b = run_id("cnn", "cnn scratch"), run_id("cnn", "cnn scratch")
    assert a != b and a.split("-", 2)[2].startswith("cnn-cnn-scratch-")  # <date>-<time>-<slug>-<random>
    same = run_id("head", "x+lr", {"a": 1, "b": [1, 2]})
    assert (
        same == run_id("head", "x+lr", {"b": (1, 2), "a": 1})
        and same.startswith("head-x+lr-")
        and same != run_id("head", "x+lr", {"a": 2})
    )


def test_diff_and_check_match_name_every_difference():
    stored = {"audio": {"clip_s": 30, "pad": "loop"}, "segments": [5, 5]}
    assert diff(stored, {"audio": {"clip_s": 30.0, "pad": "loop"}, "segments": (5, 5)}) == []  # JSON-equal
    assert diff(stored, {"audio": {"clip_s": 10.0, "pad": "zero"}, "segments": [5, 5]}) == [
        ("audio.clip_s", 30, 10.0),
        ("audio.pad", "loop", "zero"),
    ]
    with pytest.raises(
        ConfigMismatchError,
        match=r"^x: other \(audio.clip_s: stored 30, given 10.0; audio.pad: stored 'loop', given 'zero'\)$",
    ):
        check_match("x", "other", stored, {"audio": {"clip_s": 10.0, "pad": "zero"}, "segments": [5, 5]})
    check_match("x", "other", stored, {**stored, "extra": 1}, keys=["audio", "segments"])  # only the keys asked


def test_run_record_reads_new_fields_and_derives_them_for_schema_1():
    new = RunRecord.from_metrics(
        {
            "run_id": "r",
            "kind": "head",
            "name": "n",
            "backbone": "melstats",
            "head": "lr",
            "pretrained": True,
            "weights": "w",
            "trains_backbone": False,
            "needs_extraction": True,
        }
    )
    assert new.pretrained is True and new.weights == "w"  # the file's fields win
    old = {
        k: RunRecord.from_metrics({"kind": kind, "backbone": b, "spec": {"weights": "package data"}})
        for k, kind, b in (
            ("mel", "head", "melstats"),
            ("msd", "head", "musicnn-msd"),
            ("cnn", "cnn", "logmel"),
            ("ft", "finetune", "musicnn-msd"),
            ("new", "head", "unregistered"),
        )
    }
    assert (old["mel"].pretrained, old["mel"].weights.startswith("none"), old["mel"].needs_extraction) == (
        False,
        True,
        True,
    )  # from the registry
    assert old["msd"].pretrained and not old["msd"].trains_backbone
    assert (old["cnn"].pretrained, old["cnn"].trains_backbone, old["cnn"].needs_extraction) == (False, True, False)
    assert old["ft"].pretrained and old["ft"].trains_backbone
    assert old["new"].pretrained and old["new"].weights == "package data"  # unknown backbone: its own spec
    bare = RunRecord.from_metrics({})  # a file with none of the fields still reads
    assert (bare.kind, bare.trains_backbone, bare.needs_extraction, bare.spec) == ("run", False, False, {})
