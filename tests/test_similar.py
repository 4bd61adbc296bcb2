"""Similar tracks and playlists (``embedkit.deploy.vectors``, ``embedkit.deploy.similar``): track
vectors kept by ``embedkit tag --db`` (once per content and model, SQLite and PostgreSQL, old
databases upgraded in place), every rule of ``similar`` and ``playlist`` through the CLI on a
generated library with artist / album tags, M3U8 paths, the HTTP endpoints, bad input."""

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import test_tag
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.deploy.batch import tag
from embedkit.deploy.similar import (
    Index,
    Library,
    Rules,
    genre_playlist,
    radio,
    similar,
    space_vectors,
)
from embedkit.synth import make_clip

runner = CliRunner()
postgres_url = test_tag.postgres_url  # the throwaway PostgreSQL cluster of tests/test_tag.py

#: the generated library: (file, artist, album, class of the synthetic clip)
LIBRARY = [
    (f"{artist}/{album}/{i}.flac", artist, album, cls)
    for artist, album, cls in (
        ("Ann", "First", 0),
        ("Ann", "Second", 0),
        ("Bob", "Blue", 0),
        ("Cat", "Low", 1),
        ("Dan", "High", 1),
        ("Eve", "Mixed", 2),
    )
    for i in range(3)
]


def _tagged(path: Path, artist: str, album: str, title: str) -> None:
    import mutagen.flac

    f = mutagen.flac.FLAC(path)
    f["artist"], f["album"], f["title"] = artist, album, title
    f.save()


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """12+ FLAC files with artist / album / title tags (synthetic clips, 8 s, 16 kHz)."""
    root = tmp_path_factory.mktemp("music")
    for n, (rel, artist, album, cls) in enumerate(LIBRARY):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        sf.write(p, make_clip(cls, 100 + n, 16000, 8.0), 16000)
        _tagged(p, artist, album, f"{artist} {album} {p.stem}")
    return root


@pytest.fixture(scope="module")
def tagged(library, tiny_holdout_run, tmp_path_factory):
    """The library tagged into a SQLite database with the tiny head run."""
    db = tmp_path_factory.mktemp("db") / "library.sqlite"
    res = tag(tiny_holdout_run, [library], db=db, workers=1)
    assert res.n_tagged == len(LIBRARY)
    return db


def _cli(*args):
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, res.output


def _vec_rows(db):
    with sqlite3.connect(db) as c:
        return c.execute("SELECT fingerprint, model_id, space, dim, artist, album FROM tag_vectors").fetchall()


# ---------------------------------------------------------------------------------------------
# vectors in the results database


def test_vectors_stored_once_per_content_and_model(tagged, library, tiny_holdout_run, tmp_path):
    rows = _vec_rows(tagged)
    assert len(rows) == len(LIBRARY) == len({(r[0], r[1]) for r in rows})
    assert {r[2] for r in rows} == {"backbone:tiny-test:embedding"} and all(r[3] > 0 for r in rows)
    assert {(r[4], r[5]) for r in rows} == {(a, b) for _, a, b, _ in LIBRARY}
    # a re-run stores nothing twice; a copy of a file is the same audio
    db = tmp_path / "copy.sqlite"
    shutil.copy(tagged, db)
    shutil.copy(library / LIBRARY[0][0], library.parent / "copy-of-first.flac")
    try:
        again = tag(tiny_holdout_run, [library, library.parent / "copy-of-first.flac"], db=db, workers=1)
    finally:
        (library.parent / "copy-of-first.flac").unlink()
    assert again.n_tagged == 0 and len(_vec_rows(db)) == len(LIBRARY)


def test_old_database_gets_vectors_in_place(tagged, library, tiny_holdout_run, tmp_path):
    db = tmp_path / "old.sqlite"
    shutil.copy(tagged, db)
    with sqlite3.connect(db) as c:  # a database from before vectors were kept
        c.execute("DROP TABLE tag_vectors")
        before = c.execute("SELECT fingerprint, created_at, probabilities FROM tags ORDER BY fingerprint").fetchall()
    res = tag(tiny_holdout_run, [library], db=db, workers=1)
    assert res.n_tagged == len(LIBRARY)  # tagged again to get their vectors
    with sqlite3.connect(db) as c:
        after = c.execute("SELECT fingerprint, created_at, probabilities FROM tags ORDER BY fingerprint").fetchall()
    assert [r[:2] for r in after] == [r[:2] for r in before]  # no row lost, created_at kept
    assert all(json.loads(a[2]) == pytest.approx(json.loads(b[2]), abs=1e-5) for a, b in zip(after, before))
    assert len(_vec_rows(db)) == len(LIBRARY)
    assert tag(tiny_holdout_run, [library], db=db, workers=1).n_tagged == 0


@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_vectors_on_postgresql(library, tiny_holdout_run, postgres_url):
    import sqlalchemy as sa

    root = library.parent / "pg-index"
    tag(tiny_holdout_run, [library / rel for rel, *_ in LIBRARY[:9]], db=postgres_url, workers=1)
    with Library(postgres_url) as lib:
        assert Index.open(lib, root).info.n == 9
    tag(tiny_holdout_run, [library], db=postgres_url, workers=1)
    tag(tiny_holdout_run, [library], db=postgres_url, workers=1)
    with Library(postgres_url) as lib:  # the saved index, brought up to date
        assert Index.open(lib, root).info.n == len(LIBRARY)
    eng = sa.create_engine(postgres_url)
    with eng.connect() as c:
        n, distinct = c.execute(
            sa.text("SELECT COUNT(*), COUNT(DISTINCT (fingerprint, model_id)) FROM tag_vectors")
        ).one()
    eng.dispose()
    assert n == distinct == len(LIBRARY)
    first = str(library / LIBRARY[0][0])
    res = similar(postgres_url, first, 5, Rules(duplicates="keep"), index_root=root)
    assert len(res.hits) == 5 and all(h.track.path != first for h in res.hits)


# ---------------------------------------------------------------------------------------------
# the space and the index


def test_space_is_unit_and_graph_search_equals_exact(rng, tmp_path):
    P = rng.dirichlet(np.ones(4), size=300)
    V = rng.standard_normal((300, 16)).astype(np.float32)
    X = space_vectors(P, V, V.mean(0))
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1, atol=1e-5)
    pytest.importorskip("faiss")
    from embedkit.deploy.similar import AnnSettings, IndexInfo, _ann_build

    info = IndexInfo("m", "s", X.shape[1], 0.5, "exact", 300, 0.0, None)
    exact = Index(tmp_path / "a", info, V.mean(0), [str(i) for i in range(300)], X)
    index, rec = _ann_build(X.astype(np.float16), AnnSettings(nprobe=7))
    assert rec["factory"] == "IVF7,SQ8" and index.ntotal == 300  # 300 rows: 7 cells of >= 39
    ann = Index(tmp_path / "b", info, V.mean(0), [str(i) for i in range(300)], X.astype(np.float16), index)
    for q in X[:20]:
        a, b = exact.search(q, 10), ann.search(q, 10)
        assert len(set(a[0]) & set(b[0])) >= 9
        np.testing.assert_allclose(np.sort(a[1]), np.sort(b[1]), atol=2e-3)  # re-ranked: cosines on float16 rows


def test_ann_nprobe_is_tuned_to_the_recall_asked(rng, tmp_path):
    pytest.importorskip("faiss")
    from embedkit.deploy.similar import AnnSettings, IndexInfo, _ann_build

    centers = rng.standard_normal((60, 24))
    X = centers[rng.integers(0, 60, 4000)] + 0.7 * rng.standard_normal((4000, 24))
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float16)
    Q = X[:200].astype(np.float32)
    truth = np.argsort(-(X.astype(np.float32) @ Q.T), axis=0, kind="stable")[:11].T
    for target in (0.5, 0.97):
        index, rec = _ann_build(X, AnnSettings(recall=target))
        assert rec["nlist"] == 102 and rec["tuned_recall"] >= target  # 4000 // 39 cells
        info = IndexInfo("m", "s", 24, 0.5, "ivf", 4000, 0.0, None, rows_dtype="float16", ann=rec)
        idx = Index(tmp_path, info, np.zeros(24), [str(i) for i in range(4000)], X, index)
        found = [idx.search(q, 11)[0] for q in Q]
        recall = np.mean([len(set(f) & set(t)) / 11 for f, t in zip(found, truth)])
        assert index.nprobe == rec["nprobe"] and recall >= target - 0.05
        if target == 0.5:
            low = rec["nprobe"]
    assert low < rec["nprobe"] <= 102  # a higher recall asked: more cells searched


def test_sketch_tells_a_copy_from_another_recording(rng):
    from embedkit.deploy.vectors import sketch, sketch_similarity

    sr = 16000
    y = make_clip(0, 1, sr, 20.0).astype(np.float32)
    y *= 1 + 0.8 * np.sin(np.arange(len(y)) / sr * 2 * np.pi * 0.3)  # some loudness shape
    a = sketch(y, sr)
    assert a.dtype == np.int8 and a.shape == (200, 7)
    assert sketch_similarity(a, sketch(0.5 * y + 1e-4 * rng.standard_normal(len(y)), sr)) > 0.95  # re-encoded
    assert sketch_similarity(a, sketch(y[2 * sr :], sr)) > 0.95  # 2 s trimmed
    other = make_clip(3, 7, sr, 20.0) * (1 + 0.8 * np.cos(np.arange(len(y)) / sr * 2 * np.pi * 0.7))
    assert sketch_similarity(a, sketch(other.astype(np.float32), sr)) < 0.5


def test_index_is_persisted_and_updated_incrementally(tagged, library, tiny_holdout_run, tmp_path):
    db = tmp_path / "grow.sqlite"
    first = [library / rel for rel, *_ in LIBRARY[:9]]
    tag(tiny_holdout_run, first, db=db, workers=1)
    with Library(db) as lib:
        idx = Index.open(lib)
        assert idx.info.n == 9 and (idx.folder / "info.json").is_file()
        assert idx.folder == Path(str(db) + ".similar") / lib.model_id
    tag(tiny_holdout_run, [library], db=db, workers=1)  # 9 more
    with Library(db) as lib:
        idx = Index.open(lib)
        assert idx.info.n == len(LIBRARY) and sorted(idx.keys) == sorted(r[0] for r in _vec_rows(db))
        again = Index.open(lib)
        np.testing.assert_array_equal(again.X, idx.X)
    code, out = _cli("index", "--db", db, "--rebuild")
    assert code == 0 and f"{len(LIBRARY)} tracks" in out

    # settings given to `embedkit index` stick: a later use and a rebuild keep them
    def saved():
        return json.loads((idx.folder / "info.json").read_text())["settings"]

    code, out = _cli("index", "--db", db, "--codec", "SQ4", "--recall", "0.9")
    assert code == 0, out
    assert saved()["codec"] == "SQ4" and saved()["recall"] == 0.9 and saved()["rows_dtype"] == "float16"
    code, out = _cli("similar", library / LIBRARY[0][0], "--db", db)
    assert code == 0, out
    with Library(db) as lib:
        assert Index.open(lib).settings.codec == "SQ4"
    code, out = _cli("index", "--db", db, "--rebuild")
    assert code == 0 and saved()["codec"] == "SQ4" and saved()["recall"] == 0.9
    code, out = _cli("index", "--db", db, "--codec", "PQ8")
    assert code != 0 and len(out.strip().splitlines()) == 1 and "codec" in out, out


def test_ann_index_grows_and_agrees_with_exact(library, tiny_holdout_run, tmp_path):
    pytest.importorskip("faiss")
    db = tmp_path / "g.sqlite"
    tag(tiny_holdout_run, [library / rel for rel, *_ in LIBRARY[:10]], db=db, workers=1)
    with Library(db) as lib:
        idx = Index.open(lib, tmp_path / "ix", exact_max=4)
        assert idx.info.kind == "ivf" and (idx.folder / idx.info.files["ann"]).is_file()
        assert idx.info.ann["factory"] == "IVF1,SQ8" and idx.info.ann["trained_n"] == 10
        assert isinstance(idx.X, np.memmap) and idx.X.dtype == np.float16  # rows mapped, not held
        first = dict(idx.info.files)
    tag(tiny_holdout_run, [library], db=db, workers=1)
    with Library(db) as lib:
        ann = Index.open(lib, tmp_path / "ix", exact_max=4)  # the saved index, grown by 8 tracks
        assert ann.info.n == len(LIBRARY) and ann.ann.ntotal == len(LIBRARY)
        assert ann.info.ann["trained_n"] == 10  # added to the cells it has (18 < ANN_REGROW x 10)
        assert sorted(ann.keys) == sorted(r[0] for r in _vec_rows(db))
        # a new generation of files; the old one is gone
        assert ann.info.files != first and not (ann.folder / first["rows"]).exists()
        assert sorted(p.name for p in ann.folder.iterdir()) == sorted(["info.json", *ann.info.files.values()])
        X32 = np.asarray(ann.X, dtype=np.float32)
        for q in X32:
            found, scores = ann.search(q, 5)
            truth = np.argsort(-(X32 @ q), kind="stable")[:5]
            assert len(set(found) & set(truth)) >= 4
            np.testing.assert_allclose(scores, X32[found] @ q, atol=1e-6)
        rebuilt = Index.build(lib, tmp_path / "ix", exact_max=4)
        assert rebuilt.info.n == len(LIBRARY) and rebuilt.info.kind == "ivf" and rebuilt.info.ann["trained_n"] == 18


@pytest.mark.parametrize("missed_in", ["first pass", "second pass"])
def test_build_streams_the_rows_and_survives_rows_changing_between_its_passes(
    library, tiny_holdout_run, tmp_path, monkeypatch, missed_in
):
    """The build reads the library twice, a chunk at a time (mean, then rows): rows added
    (missed by the first pass) or removed (missed by the second) in between still give an
    index of exactly the rows the second pass read, each row centred on the index's mean."""
    import embedkit.deploy.similar as sim

    monkeypatch.setattr(sim, "ROW_CHUNK", 4)  # 18 tracks: 5 chunks a pass
    db = tmp_path / "s.sqlite"
    tag(tiny_holdout_run, [library], db=db, workers=1)
    with Library(db) as lib:
        real, passes = lib._chunks, []

        def chunks(since=None, chunk=None):
            passes.append(chunk or sim.ROW_CHUNK)
            for part in real(since, chunk):
                drop = (missed_in == "first pass") == (len(passes) == 1)
                yield part[:-1] if drop else part  # one row of each chunk unseen by that pass

        monkeypatch.setattr(lib, "_chunks", chunks)
        idx = Index.build(lib, tmp_path / "ix", exact_max=4)
        assert passes == [4, 4]
        rows = {r["fingerprint"]: r for r in lib._query()}
        expect = len(rows) if missed_in == "first pass" else len(rows) - 5
        assert idx.info.n == len(idx.keys) == len(idx.X) == expect and len(set(idx.keys)) == expect
        for key, x in zip(idx.keys, np.asarray(idx.X, np.float32)):
            r = rows[key]
            want = space_vectors(sim._probs(r, lib.labels)[None], sim.from_bytes(r["vector"], lib.dim)[None], idx.mean)
            np.testing.assert_allclose(x, want[0], atol=2e-3)  # float16 rows
        assert sorted(p.name for p in idx.folder.iterdir()) == sorted(["info.json", *idx.info.files.values()])
        q = np.asarray(idx.X[0], np.float32)
        found, scores = idx.search(q, 3)
        assert 0 in found and scores[0] == pytest.approx(float(q @ q), abs=1e-3)  # the row finds itself


def test_retagged_track_replaces_its_row_in_the_ann_index(library, tiny_holdout_run, tmp_path):
    pytest.importorskip("faiss")
    db = tmp_path / "r.sqlite"
    tag(tiny_holdout_run, [library], db=db, workers=1)
    with Library(db) as lib:
        idx = Index.open(lib, tmp_path / "ix", exact_max=4)
        fp = idx.keys[3]
        row = np.asarray(idx.X[3], dtype=np.float32)
    with sqlite3.connect(db) as c:  # re-tagged: another vector, a later time stamp
        (blob,) = c.execute("SELECT vector FROM tag_vectors WHERE fingerprint = ?", (fp,)).fetchone()
        v = -np.frombuffer(blob, dtype="<f4")
        c.execute(
            "UPDATE tag_vectors SET vector = ?, updated_at = '2999-01-01 00:00:00.000000' WHERE fingerprint = ?",
            (v.astype("<f4").tobytes(), fp),
        )
    with Library(db) as lib:
        idx = Index.open(lib, tmp_path / "ix", exact_max=4)
        assert idx.info.n == idx.ann.ntotal == len(LIBRARY)  # replaced, not added twice
        new = np.asarray(idx.X[3], dtype=np.float32)
        assert idx.keys[3] == fp and float(new @ row) < 0.99
        found, scores = idx.search(new, 3)
        assert found[0] == 3 and scores[0] == pytest.approx(1.0, abs=2e-3)
        assert list(idx.search(new, 40)[0]).count(3) == 1


def test_index_built_with_other_settings_is_rebuilt_not_misread(library, tiny_holdout_run, tmp_path):
    pytest.importorskip("faiss")
    from embedkit.deploy.similar import AnnSettings, SimilarError

    db = tmp_path / "s.sqlite"
    tag(tiny_holdout_run, [library], db=db, workers=1)
    root = tmp_path / "ix"
    with Library(db) as lib:
        idx = Index.open(lib, root, exact_max=4)
        saved = json.loads((idx.folder / "info.json").read_text())
        assert saved["ann"]["codec"] == "SQ8" and saved["rows_dtype"] == "float16" and saved["format"] == 2
        # a search setting changes nothing on disk
        same = Index.open(lib, root, exact_max=4, settings=AnnSettings(nprobe=3))
        assert same.info.files == idx.info.files and len(same.search(np.asarray(same.X[0]), 3)[0]) == 3
        assert same.ann.nprobe == 3 and idx.info.ann["nprobe"] == 1  # one cell: tuned to 1
        # build settings: rebuilt with them, and recorded
        other = Index.open(lib, root, exact_max=4, settings=AnnSettings(codec="SQfp16", rows_dtype="float32"))
        assert other.info.files != idx.info.files and other.X.dtype == np.float32
        on_disk = json.loads((other.folder / "info.json").read_text())
        assert on_disk["ann"]["factory"] == "IVF1,SQfp16" and on_disk["rows_dtype"] == "float32"
        # asked for none: the saved index's own settings stick (not the defaults)
        kept = Index.open(lib, root, exact_max=4)
        assert kept.info.files == other.info.files and kept.settings.codec == "SQfp16"
        assert on_disk["settings"]["codec"] == "SQfp16" and on_disk["settings"]["rows_dtype"] == "float32"
        back = Index.open(lib, root, exact_max=4, settings=AnnSettings())  # the defaults asked for: rebuilt
        assert back.info.ann["codec"] == "SQ8" and back.X.dtype == np.float16
        # an index of the previous format (usearch graph) is rebuilt
        (back.folder / "info.json").write_text(json.dumps({**on_disk, "format": 1, "kind": "hnsw"}))
        assert Index.open(lib, root, exact_max=4).info.format == 2
        with pytest.raises(SimilarError, match="codec"):
            AnnSettings(codec="PQ8x")


def test_rules_through_the_ann_index_match_exact(tagged, library, tmp_path):
    pytest.importorskip("faiss")
    q = str(library / LIBRARY[0][0])
    with Library(tagged) as lib:
        exact = Index.open(lib, tmp_path / "exact")
        ann = Index.open(lib, tmp_path / "ann", exact_max=4)
        assert exact.ann is None and ann.info.kind == "ivf"
        for rules in (Rules(max_per_artist=1), Rules(exclude_same_album=True, duplicates="keep"), Rules()):
            a = similar(tagged, q, 5, rules, library=lib, index=exact)
            b = similar(tagged, q, 5, rules, library=lib, index=ann)
            assert [h.track.path for h in a.hits] == [h.track.path for h in b.hits] and b.index_kind == "ivf"
            np.testing.assert_allclose([h.score for h in a.hits], [h.score for h in b.hits], atol=2e-3)


# ---------------------------------------------------------------------------------------------
# similar: every rule through the CLI


def _similar_json(db, query, *args, tmp_path):
    # the tiny random backbone embeds clips of one synthetic class almost alike (centred cosine
    # ~0.99), so near-duplicates are kept here: each rule is checked on its own
    out = tmp_path / "r.jsonl"
    code, text = _cli("similar", query, "--db", db, "--out", out, "--keep-duplicates", *args)
    assert code == 0, text
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_similar_plain_and_rules(tagged, library, tmp_path):
    q = str(library / LIBRARY[0][0])  # Ann / First
    plain = _similar_json(tagged, q, "-k", "10", tmp_path=tmp_path)
    assert len(plain) == 10 and q not in {r["path"] for r in plain}
    assert [r["score"] for r in plain] == sorted((r["score"] for r in plain), reverse=True)
    assert all({"path", "score", "artist", "decision"} <= set(r) for r in plain)

    capped = _similar_json(tagged, q, "-k", "10", "--max-per-artist", "1", tmp_path=tmp_path)
    artists = [r["artist"] for r in capped]
    assert len(artists) == len(set(artists)) == 5  # five artists, one each

    no_album = _similar_json(tagged, q, "-k", "10", "--exclude-same-album", tmp_path=tmp_path)
    assert "First" not in {r["album"] for r in no_album} and len(no_album) == 10

    with Library(tagged) as lib:
        g = sorted({r["decision"] for r in plain} & set(lib.labels))[0]
    only = _similar_json(tagged, q, "-k", "17", "--genre", g, tmp_path=tmp_path)
    assert only and all(r["decision"] == g for r in only)

    m3u = tmp_path / "out" / "like.m3u8"
    code, text = _cli("similar", q, "--db", tagged, "-k", "5", "--keep-duplicates", "--out", m3u)
    assert code == 0, text
    assert _m3u8_paths(m3u) == [Path(r["path"]).resolve() for r in plain[:5]]

    conf = sorted(r["confidence"] for r in plain)[len(plain) // 2]
    sure = _similar_json(tagged, q, "-k", "17", "--min-confidence", str(conf), tmp_path=tmp_path)
    assert sure and all(r["confidence"] >= conf for r in sure)


def test_similar_query_by_fingerprint_and_by_outside_file(tagged, library, tiny_holdout_run, tmp_path):
    q = library / LIBRARY[3][0]
    fp = next(r[0] for r in _vec_rows(tagged) if r[4] == "Cat")
    with Library(tagged) as lib:
        by_path = lib.find(str(q))
    keep = Rules(duplicates="keep")  # see _similar_json
    by_fp = similar(tagged, by_path.fingerprint, 5, keep)
    assert by_fp.query_in_library and by_fp.query.path == str(q) and fp
    # the same audio at a path the library never saw: found by its content
    outside = tmp_path / "elsewhere.flac"
    shutil.copy(q, outside)
    res = similar(tagged, str(outside), 5, keep)
    assert res.query_in_library and [h.track.path for h in res.hits] == [h.track.path for h in by_fp.hits]
    # new audio: embedded with the library's model (the database knows where it is)
    new = tmp_path / "new.wav"
    sf.write(new, make_clip(1, 999, 16000, 8.0), 16000)
    res = similar(tagged, str(new), 5, keep)
    assert not res.query_in_library and len(res.hits) == 5


def test_an_outside_file_listened_to_whole_is_bounded(tagged, tmp_path, monkeypatch):
    """max_audio_s (the service's bound, so POST /v1/similar is bounded as /v1/tag is): an
    audio file embedded whole (excerpt full) that is longer is refused with 413 and decodes at
    most the bound + 1 s; one within it is answered."""
    from embedkit.audio import decoding as audio
    from embedkit.deploy.similar import TooLong

    long = tmp_path / "long.wav"
    sf.write(long, make_clip(1, 7, 16000, 40.0), 16000)
    seen = []
    real = audio.decode

    def spy(path, max_seconds=None, start_s=0.0):
        seen.append(max_seconds)
        return real(path, max_seconds, start_s)

    monkeypatch.setattr(audio, "decode", spy)
    keep = Rules(duplicates="keep")
    with pytest.raises(TooLong, match="more than 20 s") as err:
        similar(tagged, str(long), 5, keep, excerpt="full", max_audio_s=20.0)
    assert err.value.status == 413 and seen == [21.0]
    res = similar(tagged, str(long), 5, keep, excerpt="full", max_audio_s=60.0)
    assert not res.query_in_library and len(res.hits) == 5


def test_near_duplicates_of_the_query_are_collapsed(library, tiny_holdout_run, tmp_path):
    music = tmp_path / "music"
    shutil.copytree(library, music)
    src = music / LIBRARY[0][0]
    y, sr = sf.read(src)
    sf.write(music / "Ann" / "dup-pcm24.wav", y, sr, subtype="PCM_24")  # same recording, other encoding
    sf.write(music / "Ann" / "dup-quieter.flac", y * 0.999, sr)
    db = tmp_path / "d.sqlite"
    tag(tiny_holdout_run, [music], db=db, workers=1)
    res = similar(db, str(src), 10)
    dups = {h.track.path for h in res.duplicates}
    copies = {str(music / "Ann" / "dup-pcm24.wav"), str(music / "Ann" / "dup-quieter.flac")}
    assert copies <= dups and all(h.embedding_cosine > 0.999 for h in res.duplicates if h.track.path in copies)
    assert not dups & {h.track.path for h in res.hits}
    kept = similar(db, str(src), 10, Rules(duplicates="keep"))
    assert copies <= {h.track.path for h in kept.hits}


# ---------------------------------------------------------------------------------------------
# playlists


def _m3u8_paths(path: Path) -> list[Path]:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#EXTM3U"
    return [(path.parent / line).resolve() for line in lines[1:] if not line.startswith("#")]


def test_genre_playlist_cli_and_m3u8(tagged, library, tmp_path):
    with Library(tagged) as lib:
        decisions = [t.decision for t in lib.all_tracks()]
        g = max(set(decisions) & set(lib.labels), key=decisions.count)
    out = tmp_path / "lists" / "g.m3u8"
    code, text = _cli("playlist", "--db", tagged, "--genre", g, "--length", "4", "-o", out)
    assert code == 0, text
    paths = _m3u8_paths(out)
    assert len(paths) == min(4, decisions.count(g)) and all(p.is_file() for p in paths)
    assert not any(Path(line).is_absolute() for line in out.read_text().splitlines()[1:] if not line.startswith("#"))
    pl = genre_playlist(tagged, g, 4)
    assert [Path(t.path).resolve() for t in pl.tracks] == paths
    assert pl.scores == sorted(pl.scores, reverse=True)
    rows = tmp_path / "g.jsonl"

    def listed(*args):
        code, text = _cli("playlist", "--db", tagged, "--genre", g, "--length", "20", "-o", rows, *args)
        assert code == 0, text
        return [json.loads(line) for line in rows.read_text().splitlines()]

    artists = [r["artist"] for r in listed("--max-per-artist", "1")]
    assert len(artists) == len(set(artists)) and len(set(artists)) == len({t.artist for t in pl.tracks} | set(artists))
    median = sorted(pl.scores)[len(pl.scores) // 2]
    sure = listed("--min-confidence", repr(median))
    assert sure and all(r["score"] >= median - 1e-6 for r in sure) and len(sure) < len(listed())  # rounded to 1e-6


def test_radio_cli_rules(tagged, library, tmp_path):
    seed = str(library / LIBRARY[0][0])
    out = tmp_path / "radio.m3u8"
    code, text = _cli(
        "playlist",
        "--db",
        tagged,
        "--seed",
        seed,
        "--length",
        "8",
        "--max-per-artist",
        "2",
        "--keep-duplicates",
        "-o",
        out,
    )
    assert code == 0, text
    paths = _m3u8_paths(out)
    assert all(p.is_file() for p in paths) and paths[0] == Path(seed).resolve() and len(paths) == 8
    pl = radio(tagged, seed, 8, max_per_artist=2, duplicates="keep")
    artists = [t.artist for t in pl.tracks]
    assert all(a != b for a, b in zip(artists, artists[1:]))  # no artist twice in a row
    assert max(artists.count(a) for a in artists) <= 2
    assert len({t.fingerprint for t in pl.tracks}) == len(pl.tracks)


# ---------------------------------------------------------------------------------------------
# bad input: one line each


def _one_line_error(code, out, *needles):
    assert code != 0
    lines = [line for line in out.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out
    assert "Traceback" not in out and all(n in lines[0] for n in needles), out


def test_bad_input(tagged, library, tmp_path, runs):
    _one_line_error(*_cli("similar", "/no/such/track.mp3", "--db", tagged), "not a track of the library")
    _one_line_error(*_cli("similar", str(library / LIBRARY[0][0]), "--db", tagged, "-k", "0"), "-k must be >= 1")
    empty = tmp_path / "empty.sqlite"
    from embedkit.deploy.resultsdb import ResultsDB

    ResultsDB(empty).close()
    _one_line_error(*_cli("similar", str(library / LIBRARY[0][0]), "--db", empty), "no track vectors")
    _one_line_error(*_cli("playlist", "--db", empty, "--genre", "x"), "no track vectors")
    # another model's vectors are never compared
    _one_line_error(
        *_cli("similar", str(library / LIBRARY[0][0]), "--db", tagged, "--model", runs["mlp"]),
        "vectors of two models are never compared",
    )
    _one_line_error(*_cli("similar", str(library / LIBRARY[0][0]), "--db", tagged, "--genre", "nope"), "not a genre")
    _one_line_error(
        *_cli("similar", str(library / LIBRARY[0][0]), "--db", tagged, "--out", tmp_path / "x.txt"), ".m3u8"
    )
    _one_line_error(*_cli("playlist", "--db", tagged), "--genre")
    _one_line_error(*_cli("playlist", "--db", tagged, "--genre", "nope"), "not a genre")
    _one_line_error(*_cli("playlist", "--db", tagged, "--seed", "/no/such.flac"), "not a track of the library")


def test_two_models_need_a_choice(tagged, library, runs, tmp_path):
    db = tmp_path / "two.sqlite"
    shutil.copy(tagged, db)
    tag(runs["mlp"], [library], db=db, workers=1)
    _one_line_error(*_cli("similar", str(library / LIBRARY[0][0]), "--db", db), "choose one with --model")
    code, out = _cli("similar", str(library / LIBRARY[0][0]), "--db", db, "--model", runs["mlp"], "-k", "3")
    assert code == 0, out


@pytest.mark.slow
def test_cnn_runs_keep_penultimate_vectors(runs, library, tmp_path):
    db = tmp_path / "cnn.sqlite"
    tag(runs["cnn"], [library], db=db, workers=1)
    rows = _vec_rows(db)
    assert len(rows) == len(LIBRARY) and {r[2] for r in rows} == {"cnn:penultimate"}
    assert len(similar(db, str(library / LIBRARY[0][0]), 3).hits) == 3


# ---------------------------------------------------------------------------------------------
# HTTP: the same answers as the CLI


def test_http_similar_agrees_with_cli(tagged, library, tiny_holdout_run, tmp_path):
    pytest.importorskip("fastapi")
    import requests

    from embedkit.deploy.serve import ServeConfig, create_app
    from embedkit.deploy.tagger import load_tagger

    from servers import running

    q = str(library / LIBRARY[0][0])
    cli = _similar_json(tagged, q, "-k", "6", "--max-per-artist", "2", tmp_path=tmp_path)
    tagger = load_tagger(tiny_holdout_run)
    with running(create_app(tagger, ServeConfig(db=str(tagged)))) as url:
        r = requests.get(
            f"{url}/v1/similar", params={"track": q, "k": 6, "max_per_artist": 2, "keep_duplicates": True}, timeout=60
        )
        assert r.status_code == 200, r.text
        got = r.json()["results"]
        assert [h["path"] for h in got] == [h["path"] for h in cli]
        np.testing.assert_allclose([h["score"] for h in got], [h["score"] for h in cli], atol=1e-6)
        # an upload of a library track's audio: found by its content, same answer
        data = Path(q).read_bytes()
        r = requests.post(
            f"{url}/v1/similar?k=6&max_per_artist=2&keep_duplicates=true",
            files={"file": ("song.flac", data, "audio/flac")},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert [h["path"] for h in r.json()["results"]] == [h["path"] for h in cli]
        assert r.json()["query"]["path"] == "upload:song.flac"
        # new audio, embedded by the served model
        buf = tmp_path / "new.wav"
        sf.write(buf, make_clip(2, 4242, 16000, 8.0), 16000)
        r = requests.post(
            f"{url}/v1/similar?k=3", data=buf.read_bytes(), headers={"Content-Type": "audio/wav"}, timeout=60
        )
        assert r.status_code == 200 and not r.json()["query"]["in_library"], r.text
        page = requests.get(f"{url}/", timeout=30).text
        assert 'id="similar"' in page and "/v1/similar" in page  # the page lists them for an upload
        # bad input: one error each
        r = requests.get(f"{url}/v1/similar", params={"track": "/no/such.flac"}, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["kind"] == "not_found"
        r = requests.get(f"{url}/v1/similar", params={"track": q, "k": 0}, timeout=30)
        assert r.status_code == 400
        r = requests.get(f"{url}/v1/similar", params={"track": q, "genre": "nope"}, timeout=30)
        assert r.status_code == 400 and "not a genre" in r.json()["error"]["message"]


def test_report_shows_the_similarity_figure(runs, tmp_path):
    from embedkit.report import build_report

    folder = tmp_path / "runs"
    shutil.copytree(runs["head"], folder / runs["head"].name)
    figures = {"tracks": 100, "p10_baseline_cosine": 0.728, "p10_space": 0.836, "protocol": "5-fold CV"}
    (folder / "similarity.json").write_text(json.dumps(figures))
    path, ctx = build_report([folder], tmp_path / "r.html")
    html = path.read_text()
    assert 'id="similarity"' in html and "0.836" in html and "0.728" in html
    assert ctx["similarity"]["rows"][1] == ("embedkit's space", 0.836)
    (folder / "similarity.json").unlink()
    assert 'id="similarity"' not in build_report([folder], tmp_path / "r2.html")[0].read_text()
