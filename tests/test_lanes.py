"""embedkit.jobs: the ordered bounded map both batch jobs run on, torch's one-thread setting, and
what lanes mean for results (a track's numbers do not depend on workers or on other tracks)."""

import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embedkit import jobs as lanes
from embedkit.deploy.batch import tag
from embedkit.deploy.tagger import load_tagger
from embedkit.jobs import ordered_map, torch_single_threaded


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 1000), max_size=40), st.integers(1, 4), st.integers(1, 6))
def test_ordered_map_keeps_order_and_every_item(items, workers, ahead):
    def slow_square(x):
        time.sleep((x % 3) * 1e-4)  # results finish out of order
        return x * x

    assert list(ordered_map(slow_square, items, workers, ahead)) == [x * x for x in items]


def test_ordered_map_keeps_none_items():
    assert list(ordered_map(lambda x: x, [1, None, 2], 2)) == [1, None, 2]


def test_ordered_map_is_bounded_and_lazy():
    pulled = []

    def source():
        for i in range(100):
            pulled.append(i)
            yield i

    gen = ordered_map(lambda x: x, source(), workers=2, ahead=3)
    assert next(gen) == 0
    assert len(pulled) <= 4  # ``ahead`` in flight plus the one handed out
    gen.close()
    assert len(pulled) <= 4


def test_ordered_map_raises_at_the_items_turn_and_cancels_the_rest():
    started = []

    def fn(x):
        started.append(x)
        if x == 2:
            raise ValueError("bad item 2")
        time.sleep(0.01)
        return x

    out = []
    with pytest.raises(ValueError, match="bad item 2"):
        for r in ordered_map(fn, range(50), workers=2, ahead=4):
            out.append(r)
    assert out == [0, 1]
    assert len(started) < 12  # the queue was cancelled, not drained


def test_torch_single_threaded_nests_across_threads_and_restores():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        inside = []
        gate = threading.Barrier(2)

        def user():
            with torch_single_threaded():
                gate.wait()
                inside.append(torch.get_num_threads())
                gate.wait()  # both inside at once: the first to leave must not restore

        ts = [threading.Thread(target=user) for _ in range(2)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        assert inside == [1, 1]
        assert torch.get_num_threads() == 2 and lanes._users == 0
        with torch_single_threaded(), torch_single_threaded():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def two_torch_threads():
    """torch at 2 intra-op threads for the test, the previous setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _thread_spy(obj, name: str) -> list[int]:
    """Wrap ``obj.name``: the returned list gets torch's thread count at each call."""
    seen: list[int] = []
    real = getattr(obj, name)

    def spy(x):
        seen.append(torch.get_num_threads())
        return real(x)

    setattr(obj, name, spy)
    return seen


def test_tagging_forwards_on_one_thread(runs, synth_dataset, two_torch_threads):
    t = load_tagger(runs["head"])
    seen = _thread_spy(t, "score_segments")  # what every door forwards (Tagger.score_segments)
    files = sorted(synth_dataset.rglob("*.wav"))[:4]
    res = tag(runs["head"], files, tagger=t, workers=2)
    assert res.n_tagged == 4 and seen and set(seen) == {1}
    assert torch.get_num_threads() == 2  # restored afterwards


@pytest.mark.parametrize("kind", ["head", "cnn"])
@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_a_tracks_result_does_not_depend_on_workers_or_other_tracks(kind, runs, synth_dataset):
    files = sorted(synth_dataset.rglob("*.wav"))
    t = load_tagger(runs[kind])
    alone = {files[3]: tag(runs[kind], [files[3]], tagger=t, workers=1).rows[0]}
    many = tag(runs[kind], files, tagger=t, workers=2, batch_size=4).rows
    row = next(r for r in many if r.path == str(files[3].absolute()))
    assert row.probabilities == alone[files[3]].probabilities  # bit for bit


def test_lanes_match_the_batched_accelerator_path(runs, synth_dataset, monkeypatch):
    """The accelerator design (decode threads + forwards batched across files), run on the CPU,
    gives the same rows as the lanes."""
    import embedkit.device as device

    files = sorted(synth_dataset.rglob("*.wav"))
    t = load_tagger(runs["head"])
    lanes_rows = tag(runs["head"], files, tagger=t, workers=2).rows
    monkeypatch.setattr(device, "is_accelerator", lambda dev: True)
    batched_rows = tag(runs["head"], files, tagger=t, workers=2).rows
    assert [r.path for r in lanes_rows] == [r.path for r in batched_rows]
    a = np.array([r.p for r in lanes_rows])
    b = np.array([r.p for r in batched_rows])
    np.testing.assert_allclose(a, b, atol=1e-5)


def _store_rows(res):
    meta, X = res.store.read()
    order = np.lexsort((meta["segment"].to_numpy(), meta["fingerprint"].to_numpy()))
    return meta.iloc[order].reset_index(drop=True), X[order]


def test_extraction_lanes_forward_on_one_thread_and_match_the_batched_path(
    tracks, tmp_path, monkeypatch, two_torch_threads
):
    from embedkit import extract as extract_mod
    from embedkit.backbones import load_backbone
    from embedkit.config import AudioConfig, PreprocessConfig, SegmentConfig
    from embedkit.extract import extract

    prep = PreprocessConfig(AudioConfig(clip_s=10.0), SegmentConfig(5.0, 5.0))
    bb = load_backbone("tiny-test")
    seen = _thread_spy(bb, "embed")
    a = extract(tracks, bb, cache=tmp_path / "lanes", prep=prep, workers=2, shard_size=3)
    assert a.n_extracted == len(tracks) and set(seen) == {1} and torch.get_num_threads() == 2
    monkeypatch.setattr(extract_mod, "is_accelerator", lambda dev: True)
    seen.clear()
    b = extract(tracks, bb, cache=tmp_path / "batched", prep=prep, workers=2, shard_size=3)
    assert b.n_extracted == len(tracks) and set(seen) == {2}  # the batched path leaves torch alone
    ma, xa = _store_rows(a)
    mb, xb = _store_rows(b)
    assert ma[["fingerprint", "segment", "start_s"]].equals(mb[["fingerprint", "segment", "start_s"]])
    np.testing.assert_allclose(xa, xb, atol=1e-5)


def test_ordered_map_keeps_nothing_it_handed_out():
    """A result handed out is the consumer's: the map holds no reference to it (a finished
    track's audio is freed as soon as the consumer is done with it)."""
    import gc
    import weakref

    class Big:
        pass

    refs = []

    def make(i):
        b = Big()
        refs.append(weakref.ref(b))
        return b

    gen = ordered_map(make, range(6), workers=2, ahead=2)
    first = next(gen)
    del first
    next(gen)
    gc.collect()
    assert refs[0]() is None
    gen.close()
