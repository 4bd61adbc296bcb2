"""Extraction engine: rows and schema, resumable and incremental, interrupted runs (Ctrl-C and
kill -9), determinism, bad files recorded as failures, store keys, lock, Dask executor."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from embedkit import extract as extract_mod
from embedkit.backbones.base import Backbone, BackboneSpec
from embedkit.config import AudioConfig, PreprocessConfig, SegmentConfig
from embedkit.datasets import load_dataset
from embedkit.errors import BackboneError, EmbedkitError, StoreError
from embedkit.extract import extract
from embedkit.store import Store, find_store

from conftest import FMA_SAMPLE, GTZAN, needs_shared

PREP10 = PreprocessConfig(AudioConfig(clip_s=10.0), SegmentConfig(5.0, 5.0))  # 2 segments per clip


@pytest.fixture(scope="module")
def tracks(synth_dataset):
    return load_dataset(synth_dataset)  # 20 clips of 12 s, 4 labels


def rows(store: Store) -> pd.DataFrame:
    meta, X = store.read()
    meta["embedding"] = list(X)
    return meta


def assert_same_rows(a: pd.DataFrame, b: pd.DataFrame, atol=0.0):
    cols = ["track_id", "path", "label", "split", "group", "segment", "start_s", "end_s"]
    pd.testing.assert_frame_equal(a[cols].reset_index(drop=True), b[cols].reset_index(drop=True))
    np.testing.assert_allclose(np.stack(a.embedding), np.stack(b.embedding), atol=atol, rtol=0)


def test_rows_schema_and_metadata(tmp_path, tracks):
    res = extract(tracks, "tiny-test", cache=tmp_path, prep=PREP10, workers=2)
    assert (res.n_tracks, res.n_extracted, res.n_segments, res.n_failed) == (20, 20, 40, 0)
    assert res.store.root.parent == tmp_path / "tiny-test"
    meta, X = res.store.read()
    assert X.shape == (40, 32) and X.dtype == np.float32 and np.isfinite(X).all()
    assert meta.groupby("track_id").segment.apply(list).map(tuple).unique().tolist() == [(0, 1)]
    np.testing.assert_array_equal(meta.start_s.to_numpy()[:2], [0.0, 5.0])
    np.testing.assert_array_equal((meta.end_s - meta.start_s).unique(), [5.0])
    assert set(meta.label) == set(tracks.label)
    schema = pq.read_schema(res.store.shard_files()[0])
    assert schema.field("embedding").type == pa.list_(pa.float32(), 32)
    assert pa.types.is_fixed_size_list(schema.field("embedding").type)
    md = json.loads(schema.metadata[b"embedkit"])
    assert md["backbone"]["name"] == "tiny-test" and md["backbone"]["embedding_dim"] == 32
    assert PreprocessConfig.from_dict(md["preprocess"]) == PREP10
    assert md["versions"]["embedkit"] and md["weights_id"] == res.store.meta()["weights_id"]


def test_readable_by_pandas_pyarrow_dataset_and_duckdb(tmp_path, tracks):
    duckdb = pytest.importorskip("duckdb")
    import pyarrow.dataset as ds

    store = extract(tracks.iloc[:6], "tiny-test", cache=tmp_path, prep=PREP10).store
    df = pd.read_parquet(store.segments_dir)
    assert len(df) == 12 and len(df.embedding.iloc[0]) == 32
    table = ds.dataset(store.segments_dir, format="parquet").to_table()
    assert table.num_rows == 12 and table.schema.field("embedding").type.list_size == 32
    con = duckdb.connect()
    n, dim = con.execute(
        f"select count(*), max(len(embedding)) from read_parquet('{store.segments_dir}/*.parquet')"
    ).fetchone()
    assert (n, dim) == (12, 32)


def test_second_run_is_a_noop_and_new_clips_only_extract_themselves(tmp_path, tracks, monkeypatch):
    first = extract(tracks.iloc[:12], "tiny-test", cache=tmp_path, prep=PREP10, shard_size=5)
    shards = set(first.store.shard_files())
    decoded = []
    real = extract_mod._decode_safe
    monkeypatch.setattr(extract_mod, "_decode_safe", lambda p, *a: decoded.append(p) or real(p, *a))
    again = extract(tracks.iloc[:12], "tiny-test", cache=tmp_path, prep=PREP10, shard_size=5)
    assert (again.n_extracted, again.n_done_before, again.n_segments) == (0, 12, 0)
    assert decoded == [] and set(again.store.shard_files()) == shards
    more = extract(tracks, "tiny-test", cache=tmp_path, prep=PREP10, shard_size=5)
    assert (more.n_extracted, more.n_done_before) == (8, 12)
    assert sorted(decoded) == sorted(tracks.path.iloc[12:])
    meta, X = more.store.read()
    assert len(meta) == 40 and not meta.duplicated(["track_id", "segment"]).any()


def test_output_is_the_same_for_any_worker_count(tmp_path, tracks):
    a = extract(tracks, "tiny-test", cache=tmp_path / "a", prep=PREP10, workers=1)
    b = extract(tracks, "tiny-test", cache=tmp_path / "b", prep=PREP10, workers=4)
    assert_same_rows(rows(a.store), rows(b.store))


def test_ctrl_c_keeps_finished_shards_and_resumes(tmp_path, tracks):
    reference = rows(extract(tracks, "tiny-test", cache=tmp_path / "ref", prep=PREP10, shard_size=4).store)

    def interrupt(done, total):
        if done >= 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(tracks, "tiny-test", cache=tmp_path / "c", prep=PREP10, shard_size=4, progress=interrupt)
    store = find_store(tmp_path / "c", "tiny-test")
    assert len(store.shard_files()) == 2 and not list(store.segments_dir.glob("*.tmp*"))
    assert len(store.read()[0]) == 16
    res = extract(tracks, "tiny-test", cache=tmp_path / "c", prep=PREP10, shard_size=4)  # lock was released
    assert (res.n_done_before, res.n_extracted) == (8, 12)
    # The resumed run cuts different shards, hence different batches: equal up to float noise.
    assert_same_rows(rows(store), reference, atol=1e-5)


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from embedkit.config import AudioConfig, PreprocessConfig, SegmentConfig
    from embedkit.datasets import load_dataset
    from embedkit.extract import extract
    def slow(done, total):
        time.sleep(0.4)  # leave the parent time to kill us between and during shard writes
    extract(load_dataset(sys.argv[1]), "tiny-test", cache=sys.argv[2], shard_size=2, workers=1,
            prep=PreprocessConfig(AudioConfig(clip_s=10.0), SegmentConfig(5.0, 5.0)), progress=slow)
    """
)


@pytest.mark.slow
def test_kill_9_leaves_no_corrupt_or_duplicate_rows_and_resumes(tmp_path, tracks, synth_dataset):
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(synth_dataset), str(cache)], stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache.glob("*/*/segments/part-*.parquet"))) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = find_store(cache, "tiny-test")
    n_before = len(store.shard_files())
    assert 2 <= n_before < 10  # killed mid-run
    for f in store.shard_files():  # every visible shard is complete
        assert pq.read_table(f).num_rows % 2 == 0
    with open(store.segments_dir / "part-deadbeef.parquet.tmp99999-1", "wb") as fh:
        fh.write(b"PAR1 half a shard")  # what a kill during a write leaves
    res = extract(tracks, "tiny-test", cache=cache, prep=PREP10, shard_size=2)
    assert res.n_done_before == n_before * 2 and res.n_done_before + res.n_extracted == 20
    assert not list(store.segments_dir.glob("*.tmp*"))
    meta, X = store.read()
    assert len(meta) == 40 and not meta.duplicated(["track_id", "segment"]).any()


def test_unreadable_shard_is_set_aside_and_redone(tmp_path, tracks):
    store = extract(tracks.iloc[:4], "tiny-test", cache=tmp_path, prep=PREP10, shard_size=2).store
    victim = store.shard_files()[0]
    victim.write_bytes(b"garbage")
    with pytest.warns(Warning, match="unreadable shard"):
        res = extract(tracks.iloc[:4], "tiny-test", cache=tmp_path, prep=PREP10, shard_size=2)
    assert res.n_extracted == 2 and len(store.read()[0]) == 8
    assert victim.with_name(victim.name + ".corrupt").exists()


def test_preprocessing_and_weights_key_the_store(tmp_path, tracks):
    sub = tracks.iloc[:2]
    a = extract(sub, "tiny-test", cache=tmp_path, prep=PREP10).store
    b = extract(
        sub, "tiny-test", cache=tmp_path, prep=PreprocessConfig(AudioConfig(clip_s=10.0), SegmentConfig(5.0, 2.5))
    ).store
    assert a.root != b.root and len(b.read()[0]) == 2 * 3
    # ints and floats describe the same config: same store
    c = extract(
        sub, "tiny-test", cache=tmp_path, prep=PreprocessConfig(AudioConfig(clip_s=10), SegmentConfig(5, 5))
    ).store
    assert c.root == a.root
    assert find_store(tmp_path, "tiny-test", PREP10).root == a.root
    with pytest.raises(StoreError, match="several stores"):
        find_store(tmp_path, "tiny-test")
    with pytest.raises(StoreError, match="run `embedkit extract"):
        find_store(tmp_path, "melstats")


def test_second_writer_is_refused_while_the_store_is_locked(tmp_path, tracks):
    store = extract(tracks.iloc[:1], "tiny-test", cache=tmp_path, prep=PREP10).store
    with store.lock():
        with pytest.raises(StoreError, match="another embedkit run is writing this store"):
            extract(tracks.iloc[:3], "tiny-test", cache=tmp_path, prep=PREP10)
    assert extract(tracks.iloc[:3], "tiny-test", cache=tmp_path, prep=PREP10).n_extracted == 2


# -- bad input ------------------------------------------------------------------------------
def tone(seconds, sr, channels=1, value=None):
    t = np.arange(int(seconds * sr)) / sr
    y = 0.3 * np.sin(2 * np.pi * 330 * t)
    if value is not None:
        y[100] = value
    return np.stack([y] * channels, axis=1).astype(np.float32) if channels > 1 else y.astype(np.float32)


def bad_dataset(root: Path) -> pd.DataFrame:
    """One file per bad-input case (expected failure reason, or None for accepted ones)."""
    d = root / "audio"
    d.mkdir(parents=True)
    cases = {}

    def add(name, reason, write=None):
        p = d / name
        if write is not None:
            write(p)
        cases[name] = (p, reason)

    add("ok.wav", None, lambda p: sf.write(p, tone(10, 22050), 22050))
    add("missing.wav", "file not found")
    add("empty.wav", "empty file (0 bytes)", lambda p: p.write_bytes(b""))
    add("garbage.mp3", "cannot decode audio", lambda p: p.write_bytes(os.urandom(3000)))
    add(
        "truncated.wav",
        "truncated",
        lambda p: (
            sf.write(d / "full.wav", tone(10, 8000), 8000),
            p.write_bytes((d / "full.wav").read_bytes()[:40000]),
        ),
    )
    add("silent.wav", "silent", lambda p: sf.write(p, np.zeros(10 * 8000, np.float32), 8000))
    add("short.wav", "too short: 2.00 s < 5 s", lambda p: sf.write(p, tone(2, 22050), 22050))
    add("nan.wav", "NaN or infinite", lambda p: sf.write(p, tone(10, 8000, value=np.nan), 8000, subtype="FLOAT"))
    add("inf.wav", "NaN or infinite", lambda p: sf.write(p, tone(10, 8000, value=np.inf), 8000, subtype="FLOAT"))
    add("surround.wav", None, lambda p: sf.write(p, tone(10, 48000, channels=6), 48000))
    add("rate8k.wav", None, lambda p: sf.write(p, tone(10, 8000), 8000))
    add("rate96k.flac", None, lambda p: sf.write(p, tone(10, 96000), 96000))
    add("stereo44k.mp3", None, lambda p: sf.write(p, tone(10, 44100, channels=2), 44100, format="MP3"))
    add("padded.wav", None, lambda p: sf.write(p, tone(7, 16000), 16000))  # accepted, loop-padded
    df = pd.DataFrame({"track_id": [n for n in cases], "path": [str(p) for p, _ in cases.values()], "label": "x"})
    df.attrs["reasons"] = {n: r for n, (_, r) in cases.items()}
    return df


def test_bad_files_are_skipped_recorded_and_summarised(tmp_path):
    df = bad_dataset(tmp_path)
    res = extract(df, "tiny-test", cache=tmp_path / "cache", prep=PREP10, workers=2)
    reasons = df.attrs["reasons"]
    failed = {f["track_id"]: f["reason"] for f in res.failures}
    assert set(failed) == {n for n, r in reasons.items() if r}
    for name, why in failed.items():
        assert reasons[name] in why and "\n" not in why, (name, why)
    accepted = sorted(n for n, r in reasons.items() if r is None)
    meta, X = res.store.read()
    assert sorted(meta.track_id.unique()) == accepted and len(meta) == 2 * len(accepted)
    assert res.n_extracted == len(accepted)
    table = res.store.failures()
    # a missing file has no content to record a failure against: reported, looked at again next run
    stored = sorted(n for n in failed if n != "missing.wav")
    assert sorted(table.track_id) == stored and set(table.columns) == {
        "track_id",
        "path",
        "label",
        "reason",
        "fingerprint",
    }
    assert res.notes == [f"{tmp_path / 'audio' / 'padded.wav'}: 7.00 s is shorter than 10 s; loop-padded"]
    # failures are remembered: not retried unless asked
    again = extract(df, "tiny-test", cache=tmp_path / "cache", prep=PREP10)
    assert (again.n_extracted, again.n_failed, again.n_failed_before) == (0, 1, len(stored))
    assert [f["track_id"] for f in again.failures] == ["missing.wav"]
    retry = extract(df, "tiny-test", cache=tmp_path / "cache", prep=PREP10, retry_failed=True)
    assert retry.n_failed == len(failed) and len(res.store.failures()) == len(stored)


class Tagger(Backbone):
    """A backbone with an extra output; embeds NaN for clips whose first sample is exactly 0.25."""

    spec = BackboneSpec(name="tagger-test", family="test", sample_rate=8000, embedding_dim=3, outputs=("taggram",))
    weights_id = "t1"

    def embed(self, segments):
        return self.outputs(segments)["embedding"]

    def outputs(self, segments):
        m = segments.mean(axis=1, keepdims=True)
        emb = np.concatenate([m, segments.std(axis=1, keepdims=True), segments.max(axis=1, keepdims=True)], axis=1)
        emb[segments[:, 0] == 0.25] = np.nan
        return {"embedding": emb.astype(np.float32), "taggram": np.tile(m, (1, 5)).astype(np.float32)}


def test_nan_embeddings_are_failures_and_outputs_stay_uniform(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    for i in range(3):
        y = tone(10, 8000) + 0.01 * i
        y[0] = 0.25 if i == 1 else 0.0
        sf.write(d / f"{i}.wav", y, 8000, subtype="FLOAT")
    df = pd.DataFrame({"track_id": ["0", "1", "2"], "path": [str(d / f"{i}.wav") for i in range(3)], "label": "x"})
    res = extract(df.iloc[[0, 1]], Tagger(), cache=tmp_path / "c", prep=PREP10, outputs=("taggram",))
    assert [f["reason"] for f in res.failures] == ["backbone tagger-test produced NaN/inf"]
    # a later run without --output taggram still writes the column, so shards stay uniform
    extract(df, Tagger(), cache=tmp_path / "c", prep=PREP10)
    meta, T = res.store.read("taggram")
    assert T.shape == (4, 5) and sorted(meta.track_id.unique()) == ["0", "2"]
    # the other way round is refused: old shards lack the output
    extract(df, Tagger(), cache=tmp_path / "d", prep=PREP10)
    with pytest.raises(StoreError, match="without output.s. taggram"):
        extract(df, Tagger(), cache=tmp_path / "d", prep=PREP10, outputs=("taggram",))
    with pytest.raises(EmbedkitError, match=r"has no output\(s\) \['logits'\]"):
        extract(df, Tagger(), cache=tmp_path / "d", prep=PREP10, outputs=("logits",))


def test_argument_errors(tmp_path, tracks):
    with pytest.raises(BackboneError, match="unknown backbone 'nope'; valid names: .*melstats.*tiny-test"):
        extract(tracks, "nope", cache=tmp_path)
    with pytest.raises(EmbedkitError, match="clip length 3 s is shorter than one 5 s segment"):
        extract(tracks, "tiny-test", cache=tmp_path, prep=PreprocessConfig(AudioConfig(clip_s=3.0)))
    with pytest.raises(EmbedkitError, match="lacks column"):
        extract(tracks.drop(columns="path"), "tiny-test", cache=tmp_path)
    with pytest.raises(EmbedkitError, match="more than once"):
        extract(pd.concat([tracks.iloc[:2], tracks.iloc[:1]]), "tiny-test", cache=tmp_path)
    with pytest.raises(EmbedkitError, match="must be >= 1"):
        extract(tracks, "tiny-test", cache=tmp_path, batch_size=0)


@pytest.mark.slow
def test_dask_local_cluster_gives_the_same_rows(tmp_path, tracks):
    pytest.importorskip("distributed")
    from embedkit.jobs import dask_client

    local = extract(tracks, "tiny-test", cache=tmp_path / "local", prep=PREP10, shard_size=4)
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dask's own deprecation chatter
        with dask_client("local", n_workers=1, threads_per_worker=2, processes=False) as client:
            res = extract(
                tracks,
                "tiny-test",
                cache=tmp_path / "dask",
                prep=PREP10,
                shard_size=4,
                executor=client,
                progress=lambda d, t: seen.append(d),
            )
    assert (res.n_extracted, res.n_segments) == (20, 40)
    assert seen == [0, 4, 8, 12, 16, 20]
    assert_same_rows(rows(res.store), rows(local.store))
    assert sorted(p.name for p in res.store.shard_files()) == sorted(p.name for p in local.store.shard_files())


# -- real data ------------------------------------------------------------------------------
@needs_shared
def test_real_fma_clip_through_the_fma_layout(tmp_path):
    from helpers import make_fma

    csv, audio_dir = make_fma(tmp_path, tracks=[(2, "small", "training", "Hip-Hop", 1, True)], real_mp3=FMA_SAMPLE)
    df = load_dataset(csv, audio_dir=audio_dir)
    res = extract(df, "tiny-test", cache=tmp_path / "cache")
    meta, X = res.store.read()
    assert len(meta) == 6 and X.shape == (6, 32) and res.notes == []
    assert meta.loc[0, ["track_id", "label", "split", "group"]].tolist() == ["000002", "Hip-Hop", "train", "1"]


@needs_shared
@pytest.mark.slow
def test_gtzan_mini_melstats_600_rows_then_noop(tmp_path, monkeypatch):
    duckdb = pytest.importorskip("duckdb")
    df = load_dataset(GTZAN)
    res = extract(df, "melstats", cache=tmp_path)
    assert (res.n_extracted, res.n_segments, res.n_failed) == (100, 600, 0)
    meta, X = res.store.read()
    assert X.shape == (600, 218) and np.isfinite(X).all() and X.std(axis=0).min() > 0
    assert meta.label.value_counts().tolist() == [60] * 10
    n = (
        duckdb.connect()
        .execute(f"select count(*) from read_parquet('{res.store.segments_dir}/*.parquet')")
        .fetchone()[0]
    )
    assert n == 600
    monkeypatch.setattr(extract_mod, "_decode_safe", lambda *a: pytest.fail("a no-op run decoded audio"))
    again = extract(df, "melstats", cache=tmp_path)
    assert (again.n_extracted, again.n_done_before) == (0, 100)


# -- melstats (sped up in this issue; lives here as the extraction baseline backbone) ----------
def test_melstats_blocks_match_librosa_and_do_not_depend_on_the_batch():
    import librosa

    from embedkit.backbones import melstats

    sr = melstats.SR
    rng = np.random.default_rng(1)
    t = np.arange(5 * sr) / sr
    y = np.stack(
        [
            0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t)),
            0.2 * rng.standard_normal(len(t)) * (t % 1 < 0.3),
            np.zeros(len(t)),  # silence: finite features
        ]
    ).astype(np.float32)
    S = np.abs(librosa.stft(y, n_fft=2048, hop_length=512))
    mel = librosa.power_to_db(librosa.feature.melspectrogram(S=S**2, sr=sr, n_mels=64), ref=1.0, top_db=None)
    nyq = sr / 2
    reference = [
        mel,
        librosa.feature.mfcc(S=mel, n_mfcc=20),
        librosa.feature.chroma_stft(S=S**2, sr=sr, tuning=0.0),
        np.stack([librosa.feature.spectral_contrast(S=s, sr=sr) for s in S]),  # per segment (its dB floor)
        np.concatenate(
            [
                librosa.feature.spectral_centroid(S=S, sr=sr) / nyq,
                librosa.feature.spectral_bandwidth(S=S, sr=sr) / nyq,
                librosa.feature.spectral_rolloff(S=S, sr=sr) / nyq,
                librosa.feature.spectral_flatness(S=S),
                librosa.feature.zero_crossing_rate(y, frame_length=2048, hop_length=512),
                librosa.feature.rms(S=S, frame_length=2048),
            ],
            axis=-2,
        ),
    ]
    for got, ref in zip(melstats.features(y), reference):
        # rtol 1e-3: librosa's float32 flatness of near-silent frames is itself off by 3e-4
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
    bb = melstats.MelStats()
    batched = bb.embed(y)
    assert batched.shape == (3, melstats.SPEC.embedding_dim) and np.isfinite(batched).all()
    one_by_one = np.concatenate([bb.embed(y[i : i + 1]) for i in range(3)])
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-5, atol=1e-5)


def test_batches_are_consecutive_chunks_whatever_the_track_boundaries():
    """The model starts on the first decoded tracks, yet batches are exactly the batch_size
    chunks of the shard's segments in track order (so results never depend on timing)."""
    seen = []

    class Recorder(Backbone):
        spec = BackboneSpec(name="rec", family="test", sample_rate=10, embedding_dim=1)

        def embed(self, segments):
            seen.append(segments[:, 0].tolist())
            return segments[:, :1].copy()

    tracks = [
        np.full((k, 3), float(i), np.float32) + np.arange(k, dtype=np.float32)[:, None] / 10
        for i, k in enumerate([5, 0, 7, 1, 6])
    ]
    allf = np.concatenate(tracks)
    out = extract_mod._embed_stream(Recorder(), iter(tracks), 4, ())
    assert seen == [allf[i : i + 4, 0].tolist() for i in range(0, len(allf), 4)]
    np.testing.assert_array_equal(out["embedding"][:, 0], allf[:, 0])
    assert extract_mod._embed_stream(Recorder(), iter([]), 4, ()) is None
