"""embedkit.jobs' engine on fake jobs (no audio, no network): order, transactions, failures,
groups, lanes vs the batched path, the out-of-memory back-off, executor shards, the per-worker
model cache, the job environment and the one rule for "nothing was done"."""

import contextlib
import gc
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from embedkit import jobs
from embedkit.jobs import Decoded, Failure, JobResult, WindowBatcher, cached_model, run_shards, run_tracks


class FakeJob:
    """Item i: ``i % 5`` windows of 3 values (i with a row offset), or a failure when i % 7 == 3;
    forward: the rows' sums (float64, so results are exact whatever the batching)."""

    def __init__(self, oom_above: int | None = None):
        self.batches: list[int] = []
        self.oom_above = oom_above
        self.lanes_single = 0
        self.refs: dict[int, weakref.ref] = {}
        self._lock = threading.Lock()

    def decode(self, i):
        time.sleep((i % 3) * 1e-4)  # lanes finish out of order
        if i % 7 == 3:
            return Failure({"item": i, "reason": "bad"})
        w = i + np.arange((i % 5) * 3, dtype=np.float64).reshape(-1, 3) / 10
        self.refs[i] = weakref.ref(w)
        return Decoded(w, f"info{i}")

    def forward(self, x):
        if self.oom_above is not None and len(x) > self.oom_above:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
        with self._lock:
            self.batches.append(len(x))
        return x.sum(axis=1)

    def finish(self, i, decoded, out):
        return (i, decoded.info, None if out is None else out.tolist())

    @contextlib.contextmanager
    def single_threaded(self):
        self.lanes_single += 1
        yield


def expected(items):
    out, fails = [], []
    for i in items:
        if i % 7 == 3:
            fails.append({"item": i, "reason": "bad"})
        else:
            w = i + np.arange((i % 5) * 3, dtype=np.float64).reshape(-1, 3) / 10
            out.append((i, f"info{i}", w.sum(axis=1).tolist() if len(w) else None))
    return out, fails


def collect(job, items, **kw):
    calls = []
    run_tracks(job, items, lambda r, f: calls.append((r, f)), **kw)
    return calls


def flat(calls):
    return [r for rs, _ in calls for r in rs], [f for _, fs in calls for f in fs]


@pytest.mark.parametrize("accelerator", [False, True])
@pytest.mark.parametrize("workers", [1, 2, 4])
def test_results_and_failures_come_in_order_whatever_the_workers(accelerator, workers):
    items = list(range(40))
    calls = collect(FakeJob(), items, accelerator=accelerator, workers=workers, batch_size=4)
    assert flat(calls) == expected(items)
    assert all(rs or fs for rs, fs in calls)  # never called with nothing


def test_a_transaction_is_batch_size_windows_or_batch_size_failures():
    items = list(range(30))
    for rs, fs in collect(FakeJob(), items, workers=2, batch_size=6)[:-1]:
        n_windows = sum(len(r[2] or []) for r in rs)
        assert n_windows >= 6 or len(fs) >= 6
        # the call came as soon as the rule held: without the last track it did not
        assert n_windows - len(rs[-1][2] or []) < 6 if n_windows >= 6 else True


def test_groups_get_one_call_each_and_batches_never_span_them():
    groups = [list(range(0, 6)), [], list(range(6, 9)), list(range(9, 20))]
    for accelerator in (False, True):
        job = FakeJob()
        calls = collect(job, groups, accelerator=accelerator, workers=2, batch_size=4, grouped=True)
        assert len(calls) == len(groups)
        for (rs, fs), g in zip(calls, groups):
            assert (rs, fs) == expected(g)
        if accelerator:  # the consecutive chunks of 4 of each group's windows, the rest at its end
            sizes = []
            for g in groups:
                n = sum(i % 5 for i in g if i % 7 != 3)
                sizes += [4] * (n // 4) + ([n % 4] if n % 4 else [])
            assert job.batches == sizes


def test_the_batched_path_gives_the_lanes_results():
    items = list(range(50))
    lanes = flat(collect(FakeJob(), items, workers=3, batch_size=5))
    batched = flat(collect(FakeJob(), items, accelerator=True, workers=3, batch_size=5))
    assert lanes == batched


def test_lanes_forward_each_track_on_its_own_in_chunks():
    job = FakeJob()
    collect(job, [4, 9, 14], workers=1, batch_size=3)  # 4 windows each
    assert job.batches == [3, 1] * 3


def test_single_threaded_with_more_than_one_lane_or_when_asked():
    for kw, entered in (
        (dict(workers=2), 1),
        (dict(workers=1), 0),
        (dict(workers=4, one_thread=False), 0),
        (dict(workers=1, one_thread=True), 1),
        (dict(workers=2, accelerator=True), 0),  # an accelerator's forwards leave threads alone
    ):
        job = FakeJob()
        collect(job, list(range(8)), **kw)
        assert job.lanes_single == entered, kw
    job = FakeJob()
    collect(job, [1], workers=4)  # one track: one lane, with the network's own threads
    assert job.lanes_single == 0


@pytest.mark.parametrize("accelerator", [False, True])
def test_nothing_of_a_finished_track_is_kept(accelerator):
    job = FakeJob()
    leaked = []

    def on_batch(results, fails):
        gc.collect()
        leaked.extend(r[0] for r in results if job.refs[r[0]]() is not None)

    run_tracks(job, list(range(40)), on_batch, accelerator=accelerator, workers=2, batch_size=4)
    assert leaked == []


def test_out_of_memory_halves_the_batch_once_per_halving_and_keeps_every_result():
    items = list(range(40))
    ref = flat(collect(FakeJob(), items, accelerator=True, workers=2, batch_size=8))
    job = FakeJob(oom_above=3)
    with pytest.warns(UserWarning, match="batch size lowered") as caught:
        got = flat(collect(job, items, accelerator=True, workers=2, batch_size=8))
    assert [str(w.message) for w in caught] == [
        "out of accelerator memory: batch size lowered to 4",
        "out of accelerator memory: batch size lowered to 2",
    ]
    assert got == ref and max(job.batches) <= 2
    # grouped: each group backs off on its own
    with pytest.warns(UserWarning, match="batch size lowered") as caught:
        collect(FakeJob(oom_above=3), [items[:20], items[20:]], accelerator=True, batch_size=8, grouped=True)
    assert len(caught) == 4


def test_other_errors_stop_the_run():
    class Broken(FakeJob):
        def forward(self, x):
            raise ValueError("broken network")

    for accelerator in (False, True):
        with pytest.raises(ValueError, match="broken network"):
            collect(Broken(), list(range(20)), accelerator=accelerator, workers=2)


def test_an_on_batch_error_stops_the_run_early():
    decoded = []

    class Counting(FakeJob):
        def decode(self, i):
            decoded.append(i)
            return super().decode(i)

    def on_batch(results, fails):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_tracks(Counting(), list(range(200)), on_batch, workers=2, batch_size=1)
    assert len(decoded) < 20


def test_window_batcher_chunks_are_consecutive_and_tracks_come_back_in_order():
    seen = []

    def forward(x):
        seen.append(x[:, 0].tolist())
        return x[:, 0] * 2

    b = WindowBatcher(forward, 4)
    tracks = [np.arange(k, dtype=float)[:, None] + 10 * i for i, k in enumerate([5, 0, 7, 1, 6])]
    done = [d for i, t in enumerate(tracks) for d in b.add(i, t)] + b.flush()
    assert [k for k, _ in done] == [0, 1, 2, 3, 4]
    allw = np.concatenate(tracks)[:, 0]
    assert seen == [allw[i : i + 4].tolist() for i in range(0, len(allw), 4)]
    for (_, out), t in zip(done, tracks):
        assert out is None if len(t) == 0 else out.tolist() == (t[:, 0] * 2).tolist()


def test_window_batcher_splits_dict_outputs():
    b = WindowBatcher(lambda x: {"a": x[:, 0], "b": x[:, :2]}, 3)
    t = [np.ones((2, 2)), 2 * np.ones((2, 2))]
    done = b.add("x", t[0]) + b.add("y", t[1]) + b.flush()
    assert [k for k, _ in done] == ["x", "y"]
    np.testing.assert_array_equal(done[1][1]["a"], [2, 2])
    assert done[0][1]["b"].shape == (2, 2)


# -- shards elsewhere ---------------------------------------------------------------------------


def _square_shard(xs, sleep=0.0):
    time.sleep(sleep)
    return [x * x for x in xs]


def test_run_shards_on_a_thread_pool():
    got = {}
    with ThreadPoolExecutor(3) as ex:
        run_shards(ex, _square_shard, ((k, (list(range(k, k + 3)),)) for k in range(0, 30, 3)), got.__setitem__)
    assert got == {k: [x * x for x in range(k, k + 3)] for k in range(0, 30, 3)}


def test_run_shards_cancels_the_rest_when_a_shard_or_on_done_fails():
    ran = []

    def shard(k):
        ran.append(k)
        time.sleep(0.01)
        if k == 1:
            raise ValueError("shard 1 failed")
        return k

    with ThreadPoolExecutor(1) as ex:
        with pytest.raises(ValueError, match="shard 1 failed"):
            run_shards(ex, shard, ((k, (k,)) for k in range(50)), lambda k, out: None)
    assert len(ran) < 10

    ran.clear()

    def stop(k, out):
        raise KeyboardInterrupt

    with ThreadPoolExecutor(1) as ex:
        with pytest.raises(KeyboardInterrupt):
            run_shards(ex, shard, ((k, (k,)) for k in range(50)), stop)
    assert len(ran) < 10


def test_cached_model_loads_once_per_key_each_its_own_instance(monkeypatch):
    monkeypatch.setattr(jobs, "_models", type(jobs._models)())
    loads = []

    def load(model, checkpoint=None, device="cpu", precision="fp32", allow_tf32=False):
        loads.append((model, device))
        return object()

    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda _: cached_model(load, "m", None, "cpu"), range(8)))
    assert len(loads) == 1 and all(g is got[0] for g in got)
    assert cached_model(load, "m", None, "cuda:0") is not got[0]  # moving a model changes it in place
    for i in range(jobs.MODEL_CACHE_SIZE):
        cached_model(load, f"other{i}")
    cached_model(load, "m", None, "cpu")  # evicted by then: loaded again
    assert loads.count(("m", "cpu")) == 2


# -- what every job reports ---------------------------------------------------------------------


def test_one_rule_for_nothing_done():
    from embedkit.deploy.batch import TagResult
    from embedkit.extract import ExtractResult

    def ex(n, extracted=0, **kw):
        return ExtractResult(None, n, kw.get("n_done_before", 0) + kw.get("n_failed_before", 0), extracted, 0, **kw)

    assert ex(3, failures=[{}] * 3).nothing_done
    assert ex(3, n_failed_before=3).nothing_done  # failed in earlier runs: still nothing available
    assert ex(0).nothing_done
    assert not ex(3, extracted=1, failures=[{}] * 2).nothing_done  # some done, some failed
    assert not ex(3, n_done_before=1, n_failed_before=2).nothing_done
    r = ex(5, extracted=1, n_failed_before=2, failures=[{}])
    assert (r.n_inputs, r.n_done, r.n_available, r.n_failed, r.n_failed_total) == (5, 1, 1, 1, 3)

    t = TagResult("m", n_inputs=4, n_failed_before=3, failures=[{"path": "x", "reason": "bad"}])
    assert t.nothing_done and t.n_failed_total == 4
    t.n_done_before = 1
    assert not t.nothing_done
    assert not TagResult("m", n_inputs=1, n_tagged=1).nothing_done
    assert isinstance(t, JobResult)


# -- the job environment ------------------------------------------------------------------------


def test_job_environment_keeps_a_non_empty_decoder_log_at_the_jobs_home(tmp_path):
    with jobs.job_environment() as env:
        assert env.executor is None
        os.write(2, b"Xing stream size off\n")
        env.log_home = tmp_path / "store" / "decoder.log"
    assert env.kept == env.log_home and not env.log_path.exists()
    assert env.log_home.read_bytes() == b"Xing stream size off\n"
    assert env.note == f"decoder messages: {env.log_home}"


def test_job_environment_keeps_a_log_without_home_and_removes_an_empty_one():
    with jobs.job_environment() as env:
        os.write(2, b"chatter\n")
    assert env.kept == env.log_path and env.log_path.read_bytes() == b"chatter\n"
    env.log_path.unlink()
    with jobs.job_environment() as env:
        pass
    assert env.kept is None and env.note == "" and not env.log_path.exists()


def test_job_environment_keeps_the_log_of_a_failed_job_and_names_it(capsys):
    with pytest.raises(KeyboardInterrupt):
        with jobs.job_environment() as env:
            os.write(2, b"what went wrong\n")
            raise KeyboardInterrupt
    assert env.log_path.read_bytes() == b"what went wrong\n"
    assert f"native library messages: {env.log_path}" in capsys.readouterr().err
    env.log_path.unlink()
    with pytest.raises(ValueError):
        with jobs.job_environment() as env:
            raise ValueError
    assert not env.log_path.exists()
