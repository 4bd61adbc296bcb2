"""Genres written into every format a music library holds, and undone byte for byte.

Fixtures: one 1 s clip encoded by ffmpeg into each format (FLAC, ALAC and AAC in .m4a, MP3 with
ID3v2.3 UTF-16 / ID3v2.4 / APEv2 + ID3v1 only, Opus, Vorbis, WMA, WavPack, AIFF, WAV), each
given a picture and other tags with mutagen, with and without a genre set by a person. ffmpeg
here has no Monkey's Audio or Musepack encoder: .ape and .mpc share the APEv2 code of WavPack
and are not generated.

Each format: write (over a person's genre with overwrite, and into a file without one) -> the
genre reads back, every other tag, picture, tag version and text encoding is as it was ->
restore -> the file is byte-identical to the original (sha256).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("mutagen")

from embedkit.deploy import filetags as tw  # noqa: E402

FFMPEG = shutil.which("ffmpeg")
pytestmark = pytest.mark.skipif(FFMPEG is None, reason="needs ffmpeg (scripts/test.sh installs it)")

PICTURE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 24  # a 6 kB stand-in for a cover
PERSON = ["Jazz", "Électro-swing"]
# name -> (file name, ffmpeg codec)
FORMATS = {
    "flac": ("a.flac", "flac"),
    "alac": ("a.m4a", "alac"),
    "aac": ("a.m4a", "aac"),
    "mp3-v23": ("a.mp3", "libmp3lame"),
    "mp3-v24": ("a.mp3", "libmp3lame"),
    "mp3-ape": ("a.mp3", "libmp3lame"),
    "opus": ("a.opus", "libopus"),
    "vorbis": ("a.ogg", "libvorbis"),
    "wma": ("a.wma", "wmav2"),
    "wavpack": ("a.wv", "wavpack"),
    "aiff": ("a.aiff", "pcm_s16be"),
    "wav": ("a.wav", "pcm_s16le"),
}


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _encode(out: Path, codec: str) -> None:
    subprocess.run(
        [FFMPEG, "-v", "error", "-y", "-f", "lavfi", "-i", "sine=frequency=440:duration=1:sample_rate=48000"]
        + ["-ac", "2", "-c:a", codec, "-map_metadata", "-1", "-fflags", "+bitexact", "-flags:a", "+bitexact"]
        + (["-id3v2_version", "0", "-write_xing", "0"] if codec == "libmp3lame" else [])
        + [str(out)],
        check=True,
    )


def _flac_picture():
    from mutagen.flac import Picture

    p = Picture()
    p.type, p.mime, p.desc, p.data = 3, "image/png", "cover", PICTURE
    return p


def _id3_frames(genre: bool, utf16: bool):
    from mutagen.id3 import APIC, COMM, TALB, TCON, TIT2, TPE1, TXXX

    enc = 1 if utf16 else 3
    frames = [
        TIT2(encoding=enc, text=["Été indien"]),
        TPE1(encoding=0, text=["Joe Dassin"]),  # Latin-1 beside UTF-16: each keeps its own
        TALB(encoding=enc, text=["Le Jardin du Luxembourg"]),
        COMM(encoding=enc, lang="fra", desc="", text=["un commentaire"]),
        TXXX(encoding=enc, desc="MOOD", text=["mellow"]),
        APIC(encoding=enc, mime="image/png", type=3, desc="cover", data=PICTURE),
    ]
    if genre:
        frames.insert(2, TCON(encoding=enc, text=PERSON if not utf16 else ["; ".join(PERSON)]))
    return frames


def _v1(genre_byte: int) -> bytes:
    pad = lambda s, n: s.encode("latin-1")[:n].ljust(n, b"\0")  # noqa: E731
    return (
        b"TAG"
        + pad("Ete indien", 30)
        + pad("Joe Dassin", 30)
        + pad("Album", 30)
        + b"1975"
        + pad("", 30)
        + bytes([genre_byte])
    )


def tag_fixture(path: Path, name: str, genre: bool) -> None:
    """A picture and other tags, set the way a tag editor (mutagen) sets them."""
    import mutagen

    if name in ("flac", "opus", "vorbis"):
        f = mutagen.File(path)
        if f.tags is None:
            f.add_tags()
        f.tags["TITLE"] = "Été indien"
        f.tags["ARTIST"] = "Joe Dassin"
        if genre:
            f.tags["Genre"] = PERSON  # key spelling kept
        f.tags["ALBUM"] = "Le Jardin du Luxembourg"
        f.tags["MOOD"] = ["mellow", "warm"]
        if name == "flac":
            f.add_picture(_flac_picture())
        else:
            f.tags["METADATA_BLOCK_PICTURE"] = base64.b64encode(_flac_picture().write()).decode("ascii")
        f.save()
    elif name in ("alac", "aac"):
        from mutagen.mp4 import MP4, MP4Cover, MP4FreeForm

        f = MP4(path)
        f.tags["\xa9nam"] = "Été indien"
        f.tags["\xa9ART"] = "Joe Dassin"
        if genre:
            f.tags["\xa9gen"] = PERSON
        f.tags["covr"] = [MP4Cover(PICTURE, imageformat=MP4Cover.FORMAT_PNG)]
        f.tags["----:com.apple.iTunes:MOOD"] = [MP4FreeForm(b"mellow")]
        f.save()
    elif name in ("mp3-v23", "mp3-v24", "aiff", "wav"):
        f = mutagen.File(path)
        if f.tags is None:
            f.add_tags()
        for fr in _id3_frames(genre, utf16=name in ("mp3-v23", "wav")):
            f.tags.add(fr)
        f.save(v2_version=3 if name in ("mp3-v23", "wav") else 4)
    elif name == "mp3-ape":
        from mutagen.apev2 import BINARY, APEv2, APEValue

        ape = APEv2()
        ape["Title"] = "Été indien"
        ape["Artist"] = "Joe Dassin"
        if genre:
            ape["Genre"] = "Ambient"
        ape["Cover Art (Front)"] = APEValue(b"cover.png\0" + PICTURE, BINARY)
        ape.save(str(path))
        with open(path, "ab") as fh:
            fh.write(_v1(26 if genre else 255))  # 26: Ambient
    elif name == "wma":
        from mutagen.asf import ASF, ASFByteArrayAttribute

        f = ASF(path)
        f.tags["Title"] = "Été indien"
        f.tags["Author"] = "Joe Dassin"
        if genre:
            f.tags["WM/Genre"] = PERSON
        f.tags["WM/AlbumTitle"] = "Le Jardin du Luxembourg"
        mime, desc = "image/png\0".encode("utf-16-le"), "cover\0".encode("utf-16-le")
        f.tags["WM/Picture"] = [ASFByteArrayAttribute(struct.pack("<bI", 3, len(PICTURE)) + mime + desc + PICTURE)]
        f.save()
    elif name == "wavpack":
        from mutagen.apev2 import BINARY, APEValue
        from mutagen.wavpack import WavPack

        f = WavPack(path)
        f.add_tags()
        f.tags["Title"] = "Été indien"
        f.tags["Artist"] = "Joe Dassin"
        if genre:
            f.tags["Genre"] = PERSON
        f.tags["Cover Art (Front)"] = APEValue(b"cover.png\0" + PICTURE, BINARY)
        f.save()


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """{(format name, with a person's genre): fixture path}, made once per module."""
    root = tmp_path_factory.mktemp("formats")
    encoded = {}
    for fname, codec in FORMATS.values():
        if codec not in encoded:
            src = root / f"src-{codec}{Path(fname).suffix}"
            _encode(src, codec)
            encoded[codec] = src
    out = {}
    for name, (fname, codec) in FORMATS.items():
        for genre in (True, False):
            d = root / f"{name}-{'g' if genre else 'n'}"
            d.mkdir()
            p = d / fname
            shutil.copyfile(encoded[codec], p)
            tag_fixture(p, name, genre)
            out[name, genre] = p
    return out


def snapshot(path: Path) -> dict:
    """Every tag of a file except the genre and embedkit's fields: value, order, encoding,
    tag version, pictures."""
    import mutagen
    from mutagen.apev2 import APENoHeaderError, APEv2

    f = mutagen.File(path)
    ours = {"GENRE", "WM/GENRE", "\xa9GEN", "TCON"} | {k.upper() for k in tw.PROVENANCE}
    snap: dict = {"type": type(f).__name__}
    tags = f.tags
    if hasattr(tags, "getall"):  # ID3
        frames = [
            (k, repr(v), getattr(v, "encoding", None))
            for k, v in tags.items()
            if k != "TCON" and not (k.startswith("TXXX:") and k[5:] in tw.PROVENANCE)
        ]
        if frames:  # (a tag holding only embedkit's frames is no tag at all)
            snap["version"], snap["frames"] = tags.version, frames
    elif isinstance(tags, list):  # Vorbis comments, ASF
        snap["items"] = [(k, repr(v)) for k, v in list.__iter__(tags) if k.upper() not in ours]
        if snap["type"] == "ASF":  # mutagen spreads ASF attributes over the header objects its own way
            snap["items"].sort()
    elif tags is not None:  # MP4, APEv2
        snap["items"] = sorted(
            (k, repr(v))
            for k, v in tags.items()
            if k.upper() not in ours and not (k.startswith(tw.MP4_FREEFORM) and k.endswith(tw.PROVENANCE))
        )
    if hasattr(f, "pictures"):
        snap["pictures"] = [(p.type, p.mime, p.desc, p.data) for p in f.pictures]
    if path.suffix == ".mp3":
        try:
            snap["ape"] = sorted((k, repr(v)) for k, v in APEv2(path).items() if k.upper() not in ours)
        except APENoHeaderError:
            snap["ape"] = None
        data = path.read_bytes()
        snap["id3v1"] = data[-128:-1] if data[-128:-125] == b"TAG" else None
    return snap


# byte-identical after write + restore (sha256); every other format: identical in every value
BYTE_IDENTICAL = set(FORMATS)


@pytest.mark.parametrize("genre", [True, False], ids=["person-genre", "no-genre"])
@pytest.mark.parametrize("name", list(FORMATS))
def test_write_read_back_restore_byte_identical(library, tmp_path, name, genre):
    f = tmp_path / library[name, genre].name
    shutil.copyfile(library[name, genre], f)
    h0, snap0 = sha(f), snapshot(f)
    st0 = tw.read_tags(f)
    person = ["Ambient"] if name == "mp3-ape" else ["; ".join(PERSON)] if name in ("mp3-v23", "wav") else PERSON
    assert st0.genre == (person if genre else None)  # every format's genre reads
    ch = tw.write_genres(f, ["Rock", "Pop"], scores=[0.9, 0.4], model="m1", overwrite=True, date="2026-12-07T12:00:00")
    assert ch.status == "written", ch
    st = tw.read_tags(f)
    joined = name in ("mp3-v23", "wav")  # ID3v2.3 stays v2.3: several values joined
    assert st.genre == (["Rock; Pop"] if joined else ["Rock", "Pop"]) and st.written_by_embedkit
    assert snapshot(f) == snap0  # pictures, other tags, version, encodings, order
    back = tw.restore(f, ch.before)
    assert back.status == "written", back
    assert tw.read_tags(f) == st0
    assert snapshot(f) == snap0
    if name in BYTE_IDENTICAL:
        assert sha(f) == h0, f"{name}: not byte-identical after write + restore"


def test_a_second_write_then_restore_gives_the_original_back(library, tmp_path):
    """untag restores the state before the first write (the journal keeps that ``before``)."""
    for name in ("flac", "mp3-v23", "opus", "aac"):
        f = tmp_path / name / library[name, True].name
        f.parent.mkdir()
        shutil.copyfile(library[name, True], f)
        h0 = sha(f)
        first = tw.write_genres(f, ["Rock"], model="a", overwrite=True)
        assert tw.write_genres(f, ["Blues", "Soul", "Funk"], model="b").status == "written"
        assert tw.restore(f, first.before).status == "written"
        assert sha(f) == h0, name


def test_id3_versions_and_encodings_are_kept(library, tmp_path):
    from mutagen.id3 import ID3

    for name, version in (("mp3-v23", (2, 3, 0)), ("mp3-v24", (2, 4, 0))):
        f = tmp_path / f"{name}.mp3"
        shutil.copyfile(library[name, True], f)
        enc0 = {k: v.encoding for k, v in ID3(f).items() if hasattr(v, "encoding")}
        tw.write_genres(f, ["Rock", "Pop"], overwrite=True)  # id3_version=4 asked: the file's own wins
        tags = ID3(f)
        assert tags.version == version
        assert {k: v.encoding for k, v in tags.items() if hasattr(v, "encoding") and k in enc0} == enc0
        assert tags.getall("TCON")[0].encoding == enc0["TCON"]  # the genre frame it replaced
    # a Latin-1 genre frame stays Latin-1 while the text fits, UTF-16 (v2.3) when it does not
    from mutagen.id3 import TCON

    f = tmp_path / "latin1.mp3"
    shutil.copyfile(library["mp3-v23", False], f)
    t = ID3(f)
    t.add(TCON(encoding=0, text=["Ambient"]))
    t.save(v2_version=3)
    h0 = sha(f)
    ch = tw.write_genres(f, ["Électro"], overwrite=True)
    assert ID3(f).getall("TCON")[0].encoding == 0
    tw.restore(f, ch.before)
    assert sha(f) == h0
    ch = tw.write_genres(f, ["東京ポップ"], overwrite=True)
    assert ID3(f).getall("TCON")[0].encoding == 1 and ID3(f).version == (2, 3, 0)
    assert tw.read_tags(f).genre == ["東京ポップ"]
    tw.restore(f, ch.before)
    assert sha(f) == h0


def test_ape_only_mp3_gets_its_genre_in_the_ape_tag(library, tmp_path):
    from mutagen.apev2 import APEv2

    f = tmp_path / "ape.mp3"
    shutil.copyfile(library["mp3-ape", True], f)
    h0 = sha(f)
    ch = tw.write_genres(f, ["Rock", "Pop"], overwrite=True)
    assert ch.status == "written"
    data = f.read_bytes()
    assert data[:3] != b"ID3"  # no ID3v2 tag added beside the APE one
    assert list(APEv2(f)["Genre"]) == ["Rock", "Pop"]
    assert data[-128:-125] == b"TAG" and data[-1] == 17  # ID3v1 agrees: 17 = Rock
    assert tw.read_tags(f).genre == ["Rock", "Pop"]
    tw.restore(f, ch.before)
    assert sha(f) == h0  # no empty ID3v2 header left, ID3v1 genre back to Ambient
    # a genre ID3v1 cannot name: "none" there rather than a contradiction
    ch = tw.write_genres(f, ["Électro-swing"], overwrite=True)
    assert f.read_bytes()[-1] == 255


def test_restore_after_another_program_rewrote_the_tags_is_value_identical(library, tmp_path):
    """A tag editor re-saved the file after embedkit's write: the layout record no longer fits,
    so the undo is value by value (and says nothing odd)."""
    import mutagen

    f = tmp_path / "a.flac"
    shutil.copyfile(library["flac", True], f)
    ch = tw.write_genres(f, ["Rock"], overwrite=True)
    m = mutagen.File(f)
    m.tags["COMMENT"] = "edited after embedkit"
    m.save(padding=lambda info: 0)
    back = tw.restore(f, ch.before)
    assert back.status == "written"
    assert tw.read_tags(f).genre == PERSON and mutagen.File(f).tags["COMMENT"] == ["edited after embedkit"]


def test_legacy_before_without_layout_still_restores(library, tmp_path):
    f = tmp_path / "a.mp3"
    shutil.copyfile(library["mp3-v24", True], f)
    ch = tw.write_genres(f, ["Rock"], overwrite=True)
    legacy = {"genre": ch.before["genre"], "provenance": ch.before["provenance"]}  # embedkit <= 0.2
    assert tw.restore(f, legacy).status == "written"
    assert tw.read_tags(f).genre == PERSON and snapshot(f) == snapshot(library["mp3-v24", True])


def test_growing_tags_come_back_to_the_original_size(library, tmp_path):
    """No room in the padding: the tag block grows, and the undo shrinks it back."""
    import mutagen

    for name in ("flac", "aac", "mp3-v24", "vorbis"):
        f = tmp_path / name / library[name, True].name
        f.parent.mkdir()
        shutil.copyfile(library[name, True], f)
        m = mutagen.File(f)
        m.save(padding=lambda info: 0) if name != "mp3-v24" else m.save(padding=lambda info: 0, v2_version=4)
        h0, size0 = sha(f), f.stat().st_size
        ch = tw.write_genres(f, ["Rock", "Pop"] * 20, model="x" * 400, overwrite=True)
        assert ch.status == "written" and f.stat().st_size > size0
        assert tw.restore(f, ch.before).status == "written"
        assert sha(f) == h0, name


# --- temporary copies ---------------------------------------------------------------------------


def test_temporary_copy_is_never_wider_than_the_original(library, tmp_path, monkeypatch):
    seen = []

    def at(stage):
        return lambda tmp: seen.append((stage, stat.S_IMODE(os.stat(tmp).st_mode), os.path.getsize(tmp)))

    monkeypatch.setattr(tw, "_after_temp_created", at("created"))
    monkeypatch.setattr(tw, "_before_replace", at("replace"))
    old = os.umask(0)  # a permissive umask must not matter
    try:
        for name in ("flac", "mp3-v23", "aac", "wav"):
            f = tmp_path / name / library[name, False].name
            f.parent.mkdir()
            shutil.copyfile(library[name, False], f)
            os.chmod(f, 0o600)
            seen.clear()
            assert tw.write_genres(f, ["Rock"]).status == "written"
            assert seen[0] == ("created", 0o600, 0)  # private before a single byte is in it
            assert all(mode == 0o600 for _, mode, _ in seen), seen
            assert stat.S_IMODE(f.stat().st_mode) == 0o600
        os.chmod(f, 0o640)
        assert tw.write_genres(f, ["Blues"]).status == "written"
        assert stat.S_IMODE(f.stat().st_mode) == 0o640 and seen[-1][1] == 0o640
    finally:
        os.umask(old)


def test_kill_after_the_copy_is_created_leaves_a_private_temporary(library, tmp_path):
    """kill -9 while the copy is written: the temporary left is as private as the original,
    and the next run's clean_temporaries removes it."""
    f = tmp_path / "a.flac"
    shutil.copyfile(library["flac", False], f)
    os.chmod(f, 0o600)
    marker = tmp_path / "created"
    code = (
        "import sys, time; from pathlib import Path; sys.path.insert(0, sys.argv[3]);"
        "from embedkit.deploy import filetags as tw;"
        "tw._after_temp_created = lambda tmp: (Path(sys.argv[2]).write_text(str(tmp)), time.sleep(60));"
        "tw.write_genres(sys.argv[1], ['Rock'])"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", code, str(f), str(marker), str(root)])
    deadline = time.time() + 30
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    left = list(tmp_path.glob(".*.embedkit-*.tmp"))
    assert len(left) == 1 and stat.S_IMODE(left[0].stat().st_mode) == 0o600
    assert tw.clean_temporaries(tmp_path) == left and not list(tmp_path.glob(".*.tmp"))


def test_clean_temporaries_removes_only_dead_writers_regular_files(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        gone = tmp_path / f".a.flac.embedkit-{dead.pid}.tmp"
        gone.write_bytes(b"x")
        busy = tmp_path / f".b.flac.embedkit-{live.pid}.tmp"
        busy.write_bytes(b"x")
        reused = tmp_path / f".c.flac.embedkit-{live.pid}.tmp"  # its pid now names a newer process
        reused.write_bytes(b"x")
        os.utime(reused, (time.time() - 3600, time.time() - 3600))
        mine = tmp_path / f".d.flac.embedkit-{os.getpid()}.tmp"
        mine.write_bytes(b"x")
        folder = tmp_path / f".e.flac.embedkit-{dead.pid}.tmp"
        folder.mkdir()
        link = tmp_path / f".f.flac.embedkit-{dead.pid}.tmp"
        link.symlink_to(tmp_path / "elsewhere")
        odd = tmp_path / ".g.flac.embedkit-0.tmp"
        odd.write_bytes(b"x")
        sub = tmp_path / "sub"
        sub.mkdir()
        deep = sub / f".h.flac.embedkit-{dead.pid}.tmp"
        deep.write_bytes(b"x")
        removed = tw.clean_temporaries(tmp_path)
        assert sorted(removed) == sorted([gone] + ([reused] if Path("/proc/self/stat").exists() else []))
        assert busy.exists() and mine.exists() and folder.is_dir() and link.is_symlink() and odd.exists()
        assert deep.exists() and tw.clean_temporaries(tmp_path, recursive=True) == [deep]
    finally:
        live.kill()
        live.wait()


# --- files tagged by ffmpeg itself (its own tag layouts, not mutagen's) -------------------------

NATIVE = {  # name -> (file name, ffmpeg output options); all get title/artist/album/genre Jazz
    "flac": ("n.flac", ["-c:a", "flac"]),
    "aac": ("n.m4a", ["-c:a", "aac"]),
    "alac": ("n.m4a", ["-c:a", "alac"]),
    "mp3-v23-v1": ("n.mp3", ["-c:a", "libmp3lame", "-id3v2_version", "3", "-write_id3v1", "1"]),
    "mp3-v24": ("n.mp3", ["-c:a", "libmp3lame"]),
    "vorbis": ("n.ogg", ["-c:a", "libvorbis"]),
    "opus": ("n.opus", ["-c:a", "libopus"]),
    "wavpack": ("n.wv", ["-c:a", "wavpack"]),
    "aiff": ("n.aiff", ["-write_id3v2", "1"]),
    "wav": ("n.wav", []),  # RIFF INFO tags: embedkit adds (and removes) an ID3 chunk
    "wma": ("n.wma", ["-c:a", "wmav2"]),
}
WITH_COVER = {"flac", "aac", "alac", "mp3-v23-v1", "mp3-v24"}
NATIVE_VALUE_IDENTICAL = {"wma"}  # mutagen rewrites an ASF header into its own object layout


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    cover = root / "cover.png"
    subprocess.run(
        [FFMPEG, "-v", "error", "-f", "lavfi", "-i", "testsrc=s=64x64", "-frames:v", "1", str(cover)], check=True
    )
    out = {}
    for name, (fname, opts) in NATIVE.items():
        p = root / name / fname
        p.parent.mkdir()
        pic = ["-i", str(cover), "-map", "0", "-map", "1", "-c:v", "copy", "-disposition:v", "attached_pic"]
        subprocess.run(
            [FFMPEG, "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=1:sample_rate=44100", "-ac", "2"]
            + (pic if name in WITH_COVER else [])
            + ["-metadata", "title=Été indien", "-metadata", "artist=Joe", "-metadata", "album=Alb"]
            + ["-metadata", "genre=Jazz"]
            + opts
            + [str(p)],
            check=True,
        )
        out[name] = p
    return out


@pytest.mark.slow
@pytest.mark.parametrize("grow", [False, True], ids=["fits", "grows"])
@pytest.mark.parametrize("name", list(NATIVE))
def test_ffmpeg_tagged_files_come_back_byte_identical(native, tmp_path, name, grow):
    f = tmp_path / native[name].name
    shutil.copyfile(native[name], f)
    h0, snap0, st0 = sha(f), snapshot(f), tw.read_tags(f)
    assert st0.genre == (None if name == "wav" else ["Jazz"])
    genres = ["Rock", "Pop"] * (30 if grow else 1)
    ch = tw.write_genres(f, genres, model="m" * (300 if grow else 1), overwrite=True)
    assert ch.status == "written", ch
    assert snapshot(f) == snap0
    assert tw.restore(f, ch.before).status == "written"
    assert tw.read_tags(f) == st0 and snapshot(f) == snap0
    if name not in NATIVE_VALUE_IDENTICAL:
        assert sha(f) == h0, f"{name}: not byte-identical after write + restore"


@pytest.mark.parametrize("ext", ["flac", "ogg", "mp3", "wav"])
def test_untagged_libsndfile_files_come_back_byte_identical(tmp_path, ext):
    """libsndfile's files carry no tag (MP3, WAV) or no padding (FLAC: no PADDING block, Ogg: a
    bare comment packet): the write adds one, the undo takes it out again."""
    import numpy as np
    import soundfile as sf

    f = tmp_path / f"a.{ext}"
    y = 0.1 * np.sin(np.linspace(0, 880 * np.pi, 22050, dtype=np.float32))
    sf.write(f, y, 22050, **({"format": "MP3"} if ext == "mp3" else {}))
    h0 = sha(f)
    ch = tw.write_genres(f, ["Rock", "Pop"])
    assert ch.status == "written" and sha(f) != h0
    assert tw.restore(f, ch.before).status == "written"
    assert sha(f) == h0


def test_a_copy_that_lost_another_tag_never_replaces_the_file(library, tmp_path, monkeypatch):
    """The byte-level editors are checked, not trusted: a copy whose other tags differ is refused."""
    f = tmp_path / "a.mp3"
    shutil.copyfile(library["mp3-v24", True], f)
    h0 = sha(f)
    real = tw._id3_role
    monkeypatch.setattr(tw, "_id3_role", lambda fr, major: "genre" if fr[:4] == b"TIT2" else real(fr, major))
    ch = tw.write_genres(f, ["Rock"], overwrite=True)
    assert ch.status == "failed" and "other tags differ" in ch.reason
    assert sha(f) == h0 and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="sets another owner and group: root only")
def test_a_copy_that_cannot_keep_the_owner_or_group_is_not_written(library, tmp_path, monkeypatch):
    """As a user who may not give files away: another user's file, or a file whose group has
    rights others lack while the copy's group would differ, is left as it is."""
    f = tmp_path / "a.flac"
    shutil.copyfile(library["flac", False], f)

    def refuse(fd, uid, gid):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchown", refuse)
    os.chown(f, 0, 4242)
    os.chmod(f, 0o640)  # the group may read: the copy's group (root's) would get that instead
    h0 = sha(f)
    ch = tw.write_genres(f, ["Rock"])
    assert ch.status == "failed" and "group" in ch.reason and sha(f) == h0
    os.chmod(f, 0o644)  # the group has nothing others lack: nothing is given away
    assert tw.write_genres(f, ["Rock"]).status == "written"
    os.chown(f, 4242, 0)
    ch = tw.write_genres(f, ["Blues"])
    assert ch.status == "failed" and "belongs to user 4242" in ch.reason
    assert not list(tmp_path.glob(".*.tmp"))
