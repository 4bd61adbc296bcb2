"""Fingerprint schemes (embedkit.identity): artefacts made now fingerprint with BLAKE3, and every
artefact made before (SHA-256, no scheme recorded) keeps its own scheme, so an upgrade neither
re-extracts a store, re-tags a library, recomputes a clip cache, nor duplicates a row; model ids
stay SHA-256."""

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import blake3
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from test_identity import FAST, cli, signal_of, summary, write

from embedkit import identity
from embedkit.datasets import load_dataset
from embedkit.deploy.batch import tag
from embedkit.deploy.resultsdb import ResultsDB
from embedkit.errors import EmbedkitError
from embedkit.fit import read_embeddings
from embedkit.store import find_store
from embedkit.synth import make_clip

N_SYNTH = 20  # conftest's synth_dataset


def sha(path) -> str:
    return identity.hash_file(path, "sha256")


def forbid_hashing(monkeypatch, under: Path):
    """No file under ``under`` may be hashed (a model file may: its id is a hash)."""
    real = identity.hash_file

    def guarded(path, scheme=identity.SCHEME):
        if Path(path).resolve().is_relative_to(under.resolve()):
            raise AssertionError(f"{path} must not be hashed here")
        return real(path, scheme)

    identity._cache.clear()
    monkeypatch.setattr(identity, "hash_file", guarded)


def test_fingerprints_name_their_scheme(tmp_path):
    p = tmp_path / "x.bin"
    data = np.random.default_rng(0).bytes(3 * identity._CHUNK + 17)  # several reads, a partial last one
    p.write_bytes(data)
    b3, s2 = identity.hash_file(p), identity.hash_file(p, "sha256")
    assert identity.SCHEME == "blake3"
    assert b3 == "b3-" + blake3.blake3(data).hexdigest()[:32]
    assert s2 == hashlib.sha256(data).hexdigest()[:32]
    assert (identity.scheme_of(b3), identity.scheme_of(s2)) == ("blake3", "sha256")
    assert identity.fingerprint(p) == b3 and identity.fingerprint(p, scheme="sha256") == s2
    assert identity.artefact_scheme(None) == "sha256" and identity.artefact_scheme("blake3") == "blake3"
    with pytest.raises(EmbedkitError, match="'md5' is not one this embedkit knows"):
        identity.artefact_scheme("md5")
    with pytest.raises(ValueError):
        identity.hash_file(p, "md5")


def test_a_recorded_fingerprint_of_another_scheme_is_not_trusted(tmp_path, monkeypatch):
    p = tmp_path / "x.bin"
    p.write_bytes(b"audio" * 1000)
    st = identity.FileStat.of(p)
    s2, b3 = sha(p), identity.hash_file(p)
    calls = []
    real = identity.hash_file
    monkeypatch.setattr(identity, "hash_file", lambda path, scheme: calls.append(scheme) or real(path, scheme))
    identity._cache.clear()
    assert identity.identify(p, {st: s2}) == (st, b3)  # a SHA-256 record: hashed again in BLAKE3
    assert calls == ["blake3"]
    identity._cache.clear()
    assert identity.identify(p, {st: b3})[1] == b3 and calls == ["blake3"]  # same scheme: trusted
    assert identity.identify(p, {st: s2}, scheme="sha256")[1] == s2 and calls == ["blake3"]
    # a table fingerprinted in one scheme is fingerprinted again when another is asked for
    import pandas as pd

    t = pd.DataFrame({"path": [str(p)], "fingerprint": [s2]})
    assert identity.with_fingerprints(t, scheme="sha256") is t and identity.with_fingerprints(t, scheme=None) is t
    assert list(identity.with_fingerprints(t)["fingerprint"]) == [b3] and calls == ["blake3", "blake3"]


def _to_legacy_store(store) -> None:
    """Make ``store`` what embedkit wrote before schemes: SHA-256 fingerprints in every shard
    and dataset record, no scheme in store.json."""
    paths = {}
    for f in store.datasets_dir.glob("*.parquet"):
        d = pq.read_table(f, columns=["real_path", "fingerprint"]).to_pydict()
        paths.update(zip(d["fingerprint"], d["real_path"]))
    for f in store.root.rglob("*.parquet"):
        table = pq.read_table(f)
        if "fingerprint" in table.column_names:
            i = table.column_names.index("fingerprint")
            old = table.column(i).to_pylist()
            table = table.set_column(i, "fingerprint", [[None if x is None else sha(paths[x]) for x in old]])
            pq.write_table(table, f)
    meta = json.loads(store.meta_path.read_text())
    del meta["fingerprints"]
    store.meta_path.write_text(json.dumps(meta))


def test_a_store_made_before_schemes_keeps_sha256_and_nothing_is_extracted_again(tmp_path, monkeypatch):
    d, cache = tmp_path / "d", tmp_path / "cache"
    write(d / "a" / "x.wav", signal_of("tone", 220))
    write(d / "b" / "y.wav", signal_of("noise", 1))
    assert cli("extract", d, *FAST, "--cache", cache).exit_code == 0
    store = find_store(cache, "melstats")
    assert store.scheme == "blake3" and all(f.startswith("b3-") for f in store.read()[0]["fingerprint"])
    seg0, X0 = read_embeddings(store, tracks=load_dataset(d))
    _to_legacy_store(store)
    assert store.scheme == "sha256"
    with monkeypatch.context() as m:  # the store's record answers every file: no byte is read
        forbid_hashing(m, d)
        res = cli("extract", d, *FAST, "--cache", cache)
    assert res.exit_code == 0 and "0 tracks extracted (0 segments), 2 already done" in summary(res)
    # a pipeline's table, fingerprinted in BLAKE3, still finds the SHA-256 rows (same rows, same values)
    seg, X = read_embeddings(store, tracks=identity.with_fingerprints(load_dataset(d)))
    assert list(seg.track_id) == list(seg0.track_id) and np.array_equal(X, X0)
    assert all(identity.scheme_of(f) == "sha256" for f in seg.fingerprint)
    # new audio in that store is fingerprinted in its scheme, beside the old rows
    write(d / "b" / "z.wav", signal_of("noise", 2))
    res = cli("extract", d, *FAST, "--cache", cache)
    assert "1 tracks extracted (2 segments), 2 already done" in summary(res)
    fps = set(store.read()[0]["fingerprint"])
    assert len(fps) == 3 and sha(d / "b" / "z.wav") in fps
    assert "fingerprints" not in json.loads(store.meta_path.read_text())


def _to_legacy_db(db: Path) -> None:
    """Make ``db`` what embedkit wrote before schemes: SHA-256 fingerprints, no tag_meta."""
    con = sqlite3.connect(db)
    for fp, path in con.execute("SELECT fingerprint, path FROM tags").fetchall():
        con.execute("UPDATE tags SET fingerprint = ? WHERE fingerprint = ?", (sha(path), fp))
        # its track vectors too (a database from before vectors gets them on its next run:
        # tests/test_similar.py; here only the fingerprint scheme is under test)
        con.execute("UPDATE tag_vectors SET fingerprint = ? WHERE fingerprint = ?", (sha(path), fp))
    con.execute("DROP TABLE tag_meta")
    con.commit()
    con.close()


def _fingerprints(db: Path) -> list[str]:
    with sqlite3.connect(db) as con:
        return [r[0] for r in con.execute("SELECT fingerprint FROM tags ORDER BY path")]


def _recorded(db: Path) -> list:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT name, value FROM tag_meta").fetchall()


def test_a_results_database_made_before_schemes_keeps_sha256_and_nothing_is_tagged_again(runs, tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    shutil.copytree(runs["data"], lib)
    db = tmp_path / "db.sqlite"
    assert tag(runs["head"], [lib], db=db).n_tagged == N_SYNTH
    assert _recorded(db) == [("fingerprints", "blake3")]
    assert all(f.startswith("b3-") for f in _fingerprints(db))
    _to_legacy_db(db)
    with monkeypatch.context() as m:  # unchanged files: the rows' stats answer, no byte is read
        forbid_hashing(m, lib)
        again = tag(runs["head"], [lib], db=db)
    assert (again.n_tagged, again.n_done_before, again.model_loaded) == (0, N_SYNTH, False)
    assert _recorded(db) == [("fingerprints", "sha256")] and ResultsDB(db).scheme == "sha256"
    # an edited file is tagged again, under its SHA-256: still one row per content and model
    victim = sorted(lib.glob("*/*.wav"))[3]
    sf.write(victim, make_clip(2, 999, 22050, 12.0), 22050)
    edited = tag(runs["head"], [lib], db=db)
    assert (edited.n_tagged, edited.n_done_before) == (1, N_SYNTH - 1)
    fps = _fingerprints(db)
    assert len(fps) == N_SYNTH + 1 and sha(victim) in fps and not any(f.startswith("b3-") for f in fps)
    # a copy under another name is the same audio in that database
    shutil.copy(victim, tmp_path / "copy.wav")
    assert tag(runs["head"], [tmp_path / "copy.wav"], db=db).n_done_before == 1


def test_an_empty_database_takes_the_current_scheme_and_openers_agree(tmp_path):
    db = tmp_path / "db.sqlite"
    assert [ResultsDB(db).scheme for _ in range(3)] == ["blake3"] * 3
    assert _recorded(db) == [("fingerprints", "blake3")]
    with sqlite3.connect(db) as con:
        con.execute("UPDATE tag_meta SET value = 'md5'")
    from embedkit.errors import DatabaseError

    with pytest.raises(DatabaseError, match="'md5' is not one this embedkit knows"):
        ResultsDB(db)


def test_a_clip_cache_made_before_schemes_finds_its_arrays(tmp_path):
    from embedkit.cnn.features import ClipCache

    clips = [write(tmp_path / f"{i}.wav", signal_of("noise", i)) for i in range(3)]
    calls = []

    def compute(p):
        calls.append(p)
        return sf.read(p, dtype="float32")[0][:10]

    cache = ClipCache(tmp_path / "cache", "cnn-wave", {"t": 1}, compute)
    first, _ = cache.build([str(c) for c in clips], workers=1)
    assert len(calls) == 3 and cache.scheme == "blake3"
    assert sorted(p.stem for p in cache.dir.glob("*.npy")) == sorted(identity.hash_file(c) for c in clips)
    # as embedkit wrote it before schemes: arrays named by SHA-256, no scheme in cache.json
    for c in clips:
        (cache.dir / f"{identity.hash_file(c)}.npy").rename(cache.dir / f"{sha(c)}.npy")
    meta = json.loads(cache.meta_file.read_text())
    del meta["fingerprints"]
    cache.meta_file.write_text(json.dumps(meta))
    (tmp_path / "cache" / "fingerprints.json").unlink()
    identity._cache.clear()
    old = ClipCache(tmp_path / "cache", "cnn-wave", {"t": 1}, compute)
    again, failures = old.build([str(c) for c in clips], workers=1)
    assert old.scheme == "sha256" and len(calls) == 3 and not failures  # found, not recomputed
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert old.path_for(str(clips[0])) == old.dir / f"{sha(clips[0])}.npy"


def test_model_ids_stay_sha256(runs):
    from embedkit.deploy.tagger import load_tagger, model_id_of, resolve_artefact

    artefact = resolve_artefact(runs["head"])
    want = hashlib.sha256(Path(artefact).read_bytes()).hexdigest()[:32]
    assert model_id_of(runs["head"]) == want == load_tagger(runs["head"]).model_id


@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_runs_finished_before_blake3_are_reused_by_the_pipeline(tmp_path, monkeypatch):
    import embedkit.pipeline as pipeline
    from embedkit.pipeline import RunPlan, run_all
    from embedkit.runs import dataset_fingerprint
    from embedkit.synth import make_dataset

    data = make_dataset(tmp_path / "clips", n_classes=3, per_class=4, duration_s=6.0)
    plan = RunPlan.quick_plan(backbones=("melstats",), heads=("lr",), cnn=False, cv=2)
    kw = dict(cache=tmp_path / "cache", report=None, threads=1)
    with monkeypatch.context() as m:  # a new runs folder: the SHA-256 pass is never paid
        m.setattr(pipeline.DatasetId, "legacy", lambda self: pytest.fail("no earlier run to look for"))
        fresh = run_all(data, plan, runs=tmp_path / "fresh", **kw)
    assert [r.reused for r in fresh.runs] == [False]
    with monkeypatch.context() as m:  # what embedkit did before: run ids over SHA-256 fingerprints
        m.setattr(
            pipeline,
            "dataset_fingerprint",
            lambda t: dataset_fingerprint(identity.with_fingerprints(t.drop(columns="fingerprint"), scheme="sha256")),
        )
        old = run_all(data, plan, runs=tmp_path / "runs", **kw)
    assert old.runs[0].run_dir.name != fresh.runs[0].run_dir.name  # another dataset fingerprint, another id
    again = run_all(data, plan, runs=tmp_path / "runs", **kw)
    assert [r.reused for r in again.runs] == [True] and again.runs[0].run_dir == old.runs[0].run_dir
    assert len(list((tmp_path / "runs").glob("*/metrics.json"))) == 1
    # a different protocol still makes a new run (the old one is not a match for it)
    other = run_all(
        data, RunPlan.quick_plan(backbones=("melstats",), heads=("lr",), cnn=False, cv=3), runs=tmp_path / "runs", **kw
    )
    assert [r.reused for r in other.runs] == [False]
