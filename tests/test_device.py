"""The one device rule (embedkit.device) and backbones moved between devices.

CUDA/MPS parity tests run only where such a device exists; on CPU-only machines they skip with
the reason, and the CPU-side behaviour (auto -> cpu, clear errors, OOM back-off) is tested here.
"""

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from embedkit import device  # noqa: E402
from embedkit.backbones import load_backbone  # noqa: E402
from embedkit.errors import DeviceError, EmbedkitError  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")


def test_auto_and_cpu_resolve_here():
    assert device.resolve("cpu") == torch.device("cpu")
    auto = device.resolve("auto")
    expected = "cuda" if HAS_CUDA else ("mps" if device._mps_available(torch) else "cpu")
    assert auto.type == expected
    assert device.resolve(None) == auto
    assert device.describe("cpu")["device"] == "cpu"


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "tpu", ""])
def test_unknown_device_is_a_one_line_error(name):
    if name == "":
        assert device.resolve(name).type in ("cpu", "cuda", "mps")  # empty means auto
        return
    with pytest.raises(DeviceError, match="unknown device") as exc:
        device.resolve(name)
    assert "\n" not in str(exc.value)
    assert isinstance(exc.value, EmbedkitError)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
def test_cuda_without_cuda_says_so():
    with pytest.raises(DeviceError, match="CUDA is not available"):
        device.resolve("cuda")
    with pytest.raises(DeviceError, match="CUDA is not available"):
        device.resolve("cuda:1")


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS may have MPS")
def test_mps_off_macos_says_so():
    with pytest.raises(DeviceError, match="only on macOS"):
        device.resolve("mps")


def test_batch_policy():
    assert device.default_batch_size(torch.device("cpu"), 32) == 32
    assert device.default_batch_size(torch.device("cuda", 0), 32) == 32 * device.ACCELERATOR_BATCH_FACTOR


def test_out_of_memory_back_off_halves_and_logs():
    seen, logged = [], []

    def fn(chunk):
        if len(chunk) > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        seen.append(len(chunk))
        return list(chunk)

    out = device.run_batched(fn, list(range(10)), max_batch=16, log=logged.append)
    assert [x for chunk in out for x in chunk] == list(range(10))  # nothing lost, order kept
    assert max(seen) <= 3 and logged == [
        "out of accelerator memory: batch size lowered to 5",
        "out of accelerator memory: batch size lowered to 2",
    ]


def test_out_of_memory_at_batch_one_is_a_device_error():
    def fn(chunk):
        raise RuntimeError("out of memory")

    with pytest.raises(DeviceError, match="batch of 1"):
        device.run_batched(fn, [1, 2], max_batch=2)


def test_other_errors_are_not_swallowed():
    def fn(chunk):
        raise ValueError("bad shape")

    with pytest.raises(ValueError, match="bad shape"):
        device.run_batched(fn, [1, 2], max_batch=2)


def test_backbone_to_cpu_keeps_results(rng):
    bb = load_backbone("tiny-test")
    x = rng.standard_normal((3, 16000)).astype(np.float32)
    before = bb.embed(x)
    assert bb.to("cpu") is bb and bb.device == torch.device("cpu")
    np.testing.assert_array_equal(bb.embed(x), before)


def test_numpy_backbone_ignores_device(rng):
    bb = load_backbone("melstats")
    assert bb.to("cpu") is bb and bb.device == "cpu"


@needs_cuda
@pytest.mark.parametrize("name", ["tiny-test", "musicnn-msd"])
def test_cuda_embeddings_match_cpu(name, rng):
    x = rng.standard_normal((4, 5 * 16000)).astype(np.float32) * 0.1
    cpu = load_backbone(name).embed(x)
    gpu_bb = load_backbone(name).to(device.resolve("cuda"))
    gpu = gpu_bb.embed(x)
    np.testing.assert_allclose(gpu, cpu, atol=1e-4, rtol=1e-4)
