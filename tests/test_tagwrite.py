"""Writing genres into audio files: every format x every safety rule, on generated files."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mutagen")

from embedkit.deploy import filetags as tw  # noqa: E402

FFMPEG = shutil.which("ffmpeg")
FORMATS = ["mp3", "flac", "ogg", "opus", "wav", "aiff", "m4a"]
ROOT = Path(__file__).resolve().parents[1]


def _signal(sr: int, seconds: float = 2.0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    rng = np.random.default_rng(0)
    return np.stack(
        [0.2 * np.sin(2 * np.pi * 440 * t), 0.1 * np.sin(2 * np.pi * 660 * t) + 0.01 * rng.standard_normal(len(t))], 1
    ).astype(np.float32)


def make_audio(path: Path) -> Path:
    """A 2 s stereo clip in the format of ``path``'s extension."""
    import soundfile as sf

    ext = path.suffix[1:]
    if ext == "m4a":
        if not FFMPEG:
            pytest.skip("M4A fixtures need ffmpeg (apt-get install -y ffmpeg); libsndfile cannot write AAC")
        wav = path.with_suffix(".src.wav")
        sf.write(wav, _signal(44100), 44100)
        subprocess.run(
            [FFMPEG, "-v", "error", "-y", "-i", str(wav), "-c:a", "aac", "-b:a", "96k", str(path)], check=True
        )
        wav.unlink()
        return path
    kw = {
        "mp3": dict(format="MP3"),
        "ogg": dict(format="OGG", subtype="VORBIS"),
        "opus": dict(format="OGG", subtype="OPUS"),
        "aiff": dict(format="AIFF"),
        "au": dict(format="AU"),
    }.get(ext, {})
    sr = 48000 if ext == "opus" else 44100
    sf.write(path, _signal(sr), sr, **kw)
    return path


def decode(path: Path) -> np.ndarray:
    """Every decoded sample (libsndfile; ffmpeg for M4A)."""
    if path.suffix == ".m4a":
        out = subprocess.run(
            [FFMPEG, "-v", "error", "-i", str(path), "-f", "f32le", "-"], check=True, capture_output=True
        ).stdout
        return np.frombuffer(out, dtype=np.float32)
    import soundfile as sf

    return sf.read(path, dtype="float32")[0]


@pytest.fixture(params=FORMATS)
def audio(request, tmp_path):
    return make_audio(tmp_path / f"song.{request.param}")


def set_person_genre(path: Path, genre: str) -> None:
    """A genre set by a person's tag editor (no embedkit provenance)."""
    fmt = tw.format_of(path)
    f = tw._open(path, fmt)
    tw._set(f, fmt, tw.TagState([genre]))
    tw._save(f, fmt, 4, "/")


# --- per format ---------------------------------------------------------------------------


def test_write_reads_back_and_audio_is_untouched(audio):
    before = decode(audio)
    ch = tw.write_genres(audio, ["Rock", "Pop"], scores=[0.91, 0.42], model="m123", date="2026-12-01T09:00:00+00:00")
    assert ch.status == "written", ch
    assert {k: v for k, v in ch.before.items() if k != "layout"} == {"genre": None, "provenance": {}}
    st = tw.read_tags(audio)
    assert st.genre == ["Rock", "Pop"]  # one value per genre
    assert st.provenance["EMBEDKIT_GENRE_SCORE"] == ["0.9100", "0.4200"]
    assert st.provenance["EMBEDKIT_MODEL"] == ["m123"] and st.provenance["EMBEDKIT_DATE"] == [
        "2026-12-01T09:00:00+00:00"
    ]
    assert st.written_by_embedkit
    np.testing.assert_array_equal(decode(audio), before)
    assert not list(audio.parent.glob(".*.tmp"))


def test_dry_run_writes_nothing(audio):
    data = audio.read_bytes()
    ch = tw.write_genres(audio, ["Rock"], dry_run=True)
    assert ch.status == "would-write" and "no genre -> 'Rock'" in ch.reason
    assert audio.read_bytes() == data


def test_person_genre_is_kept_unless_overwrite(audio):
    set_person_genre(audio, "Jazz")
    data = audio.read_bytes()
    ch = tw.write_genres(audio, ["Rock"])
    assert ch.status == "kept" and "set by a person" in ch.reason
    assert audio.read_bytes() == data
    ch = tw.write_genres(audio, ["Rock"], overwrite=True)
    assert ch.status == "written" and ch.before["genre"] == ["Jazz"]
    assert tw.read_tags(audio).genre == ["Rock"]


def test_embedkit_genre_is_replaced_but_a_later_edit_is_kept(audio):
    assert tw.write_genres(audio, ["Rock"], model="a").status == "written"
    assert tw.write_genres(audio, ["Rock"], model="a").status == "unchanged"
    ch = tw.write_genres(audio, ["Blues"], model="b")  # embedkit's own genre: no overwrite needed
    assert ch.status == "written" and ch.before["genre"] == ["Rock"]
    set_person_genre(audio, "Jazz")  # a person edits the genre; the provenance stays
    assert tw.write_genres(audio, ["Metal"], model="b").status == "kept"
    assert tw.read_tags(audio).genre == ["Jazz"]


def test_uncertain_writes_nothing(audio):
    data = audio.read_bytes()
    ch = tw.write_genres(audio, [])
    assert ch.status == "uncertain" and audio.read_bytes() == data


def test_restore_undoes_a_write(audio):
    set_person_genre(audio, "Jazz")
    original = tw.read_tags(audio)
    ch = tw.write_genres(audio, ["Rock"], overwrite=True)
    back = tw.restore(audio, ch.before)
    assert back.status == "written", back
    assert tw.read_tags(audio) == original  # the person's genre, no provenance left
    assert tw.restore(audio, ch.before).status == "unchanged"


def test_restore_to_no_genre_and_refuses_after_a_person_edit(audio):
    ch = tw.write_genres(audio, ["Rock"])
    set_person_genre(audio, "Jazz")
    assert tw.restore(audio, ch.before).status == "kept"
    assert tw.read_tags(audio).genre == ["Jazz"]
    assert tw.restore(audio, ch.before, force=True).status == "written"
    assert tw.read_tags(audio) == tw.TagState(None)


def test_permissions_are_kept_and_read_only_fails(audio):
    os.chmod(audio, 0o640)
    assert tw.write_genres(audio, ["Rock"]).status == "written"
    assert stat.S_IMODE(audio.stat().st_mode) == 0o640
    os.chmod(audio, 0o444)
    data = audio.read_bytes()
    ch = tw.write_genres(audio, ["Blues"])
    assert ch.status == "failed" and "read-only" in ch.reason
    assert audio.read_bytes() == data


def test_failed_verification_leaves_the_file(audio, monkeypatch):
    data = audio.read_bytes()
    real = tw._first_samples
    monkeypatch.setattr(tw, "_first_samples", lambda p: None if ".tmp" in p.name and real(p) is not None else real(p))
    if tw._first_samples(audio) is None:  # M4A: libsndfile cannot decode it; break the tag check instead
        monkeypatch.setattr(tw, "_as_read", lambda *a: tw.TagState(["something else"]))
    ch = tw.write_genres(audio, ["Rock"])
    assert ch.status == "failed" and "file left unchanged" in ch.reason
    assert audio.read_bytes() == data and not list(audio.parent.glob(".*.tmp"))


KILLER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from embedkit.deploy import filetags as tw
    def pause(tmp):
        Path(sys.argv[2]).write_text(str(tmp))
        time.sleep(60)
    if sys.argv[4] == "pause":
        tw._before_replace = pause
    tw.write_genres(sys.argv[1], ["Rock", "Pop"], model="kill")
    """
)


def _run_killer(path: Path, mode: str, marker: Path):
    return subprocess.Popen([sys.executable, "-c", KILLER, str(path), str(marker), str(ROOT), mode])


def test_kill_9_mid_write_leaves_the_file_as_before(audio, tmp_path):
    """Killed after the tagged copy is complete, just before it replaces the original."""
    data, samples = audio.read_bytes(), decode(audio)
    marker = tmp_path / "marker"
    proc = _run_killer(audio, "pause", marker)
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert marker.exists(), "the writer never reached the replace step"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert audio.read_bytes() == data
    np.testing.assert_array_equal(decode(audio), samples)
    left = list(audio.parent.glob(".*.embedkit-*.tmp"))
    assert left and tw.clean_temporaries(audio.parent) == left and not list(audio.parent.glob(".*.tmp"))


# FLAC in the fast tier, MP3 in the slow one (~1.5 s each: 11 writer processes); every format's
# kill at the replace step is test_kill_9_mid_write_leaves_the_file_as_before, fast
@pytest.mark.parametrize("fmt", [pytest.param("mp3", marks=pytest.mark.slow), "flac"])
def test_kill_9_at_random_moments_leaves_before_or_fully_tagged(fmt, tmp_path):
    src = make_audio(tmp_path / f"src.{fmt}")
    data, samples = src.read_bytes(), decode(src)
    probe = tmp_path / f"probe.{fmt}"
    shutil.copyfile(src, probe)
    t0 = time.perf_counter()
    assert _run_killer(probe, "run", tmp_path / "unused").wait() == 0
    full = time.perf_counter() - t0  # a whole uninterrupted run (interpreter start included)
    seen = []
    # from "killed before it started" to "killed after it finished", evenly in between
    for i, delay in enumerate(np.linspace(0.0, 1.5 * full, 10)):
        f = tmp_path / f"k{i}.{fmt}"
        shutil.copyfile(src, f)
        proc = _run_killer(f, "run", tmp_path / "unused")
        time.sleep(float(delay))
        if i == 9:
            proc.wait()
        os.kill(proc.pid, signal.SIGKILL) if proc.poll() is None else None
        proc.wait()
        if f.read_bytes() == data:
            seen.append("before")
        else:
            st = tw.read_tags(f)
            assert st.genre == ["Rock", "Pop"] and st.provenance["EMBEDKIT_MODEL"] == ["kill"]
            seen.append("tagged")
        np.testing.assert_array_equal(decode(f), samples)
    assert seen[0] == "before" and seen[-1] == "tagged", seen  # in between: either, each checked above


# --- format-specific and batch --------------------------------------------------------------


def test_id3v23_joins_genres_with_the_separator(tmp_path):
    from mutagen.id3 import ID3

    f = make_audio(tmp_path / "a.mp3")
    samples = decode(f)
    ch = tw.write_genres(f, ["Rock", "Pop"], id3_version=3, separator="; ")
    assert ch.status == "written"
    tags = ID3(f)
    assert tags.version == (2, 3, 0) and tags.getall("TCON")[0].text == ["Rock; Pop"]
    assert tw.read_tags(f).written_by_embedkit  # recognised as embedkit's on the next run
    assert tw.write_genres(f, ["Rock", "Pop"], id3_version=3, separator="; ").status == "unchanged"
    assert tw.write_genres(f, ["Blues"], id3_version=3).status == "written"
    np.testing.assert_array_equal(decode(f), samples)


def test_id3v24_is_multi_value(tmp_path):
    from mutagen.id3 import ID3

    f = make_audio(tmp_path / "a.mp3")
    tw.write_genres(f, ["Rock", "Pop"])
    tags = ID3(f)
    assert tags.version == (2, 4, 0) and tags.getall("TCON")[0].text == ["Rock", "Pop"]


def test_vorbis_one_field_per_value(tmp_path):
    from mutagen.flac import FLAC

    f = make_audio(tmp_path / "a.flac")
    tw.write_genres(f, ["Rock", "Pop"])
    assert FLAC(f).tags.get("GENRE") == ["Rock", "Pop"]


def test_not_writable_and_vanished(tmp_path):
    au = make_audio(tmp_path / "a.au")
    ch = tw.write_genres(au, ["Rock"])
    assert ch.status == "not-writable" and ".au" in ch.reason
    ch = tw.write_genres(tmp_path / "gone.mp3", ["Rock"])
    assert ch.status == "failed" and "not found" in ch.reason
    bad = tmp_path / "bad.flac"
    bad.write_bytes(b"not audio at all" * 10)
    ch = tw.write_genres(bad, ["Rock"])
    assert ch.status == "failed" and "not a readable FLAC" in ch.reason and bad.read_bytes() == b"not audio at all" * 10


def test_batch_records_failures_and_goes_on(tmp_path):
    good = make_audio(tmp_path / "good.flac")
    ro = make_audio(tmp_path / "ro.mp3")
    os.chmod(ro, 0o444)
    res = tw.write_many(
        [(tmp_path / "gone.wav", ["Rock"], None), (ro, ["Rock"], None), (good, ["Jazz"], [0.8])], model="m"
    )
    assert [r.status for r in res] == ["failed", "failed", "written"]
    assert tw.read_tags(good).genre == ["Jazz"]


def test_symlink_stays_a_link(tmp_path):
    real = make_audio(tmp_path / "real.flac")
    link = tmp_path / "link.flac"
    link.symlink_to(real)
    assert tw.write_genres(link, ["Rock"]).status == "written"
    assert link.is_symlink() and tw.read_tags(real).genre == ["Rock"]


def test_hard_links_are_not_split(tmp_path):
    f = make_audio(tmp_path / "a.flac")
    os.link(f, tmp_path / "b.flac")
    data = f.read_bytes()
    ch = tw.write_genres(f, ["Rock"])
    assert ch.status == "failed" and "hard links" in ch.reason and f.read_bytes() == data


def test_file_changed_while_tagging_is_left_alone(tmp_path, monkeypatch):
    f = make_audio(tmp_path / "a.wav")
    real = tw._first_samples

    def touch_then_read(p):  # another program writes the file while embedkit verifies its copy
        if ".tmp" in p.name:
            os.utime(f, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
        return real(p)

    monkeypatch.setattr(tw, "_first_samples", touch_then_read)
    ch = tw.write_genres(f, ["Rock"])
    assert ch.status == "failed" and "changed while being tagged" in ch.reason
    assert tw.read_tags(f).genre is None and not list(tmp_path.glob(".*.tmp"))
