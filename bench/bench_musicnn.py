"""musicnn forward speed: seconds per 30 s clip (6 segments of 5 s at 16 kHz, one batch) and clips/s.

Variants, all measured in this run on the same clip and thread count:
  embed      log-mel + network as Backbone.embed runs it (pruned plan, see backbones/musicnn.py)
  network    network only, log-mel precomputed (the "bare forward")
  full       network only, pruning switched off (the path used for training / large inputs)
  naive      network only, a line-by-line port (NCHW convs, ReLU and eval-mode batch_norm on
             the full conv maps, then max over frequency): "a straightforward PyTorch port"
The reference is the original TensorFlow graph: measured here when TensorFlow is importable,
otherwise the 0.21 s per clip on 2 cores quoted in issue 2 (uncontended machine).

    python bench/bench_musicnn.py                 # 2 threads, 20 repeats
    python bench/bench_musicnn.py --quick         # 5 repeats (smoke run)
    python bench/bench_musicnn.py --tf-python /path/to/tf-venv/bin/python   # also time TF
      (that venv: pip install tensorflow-cpu==2.21.0 "tf_keras~=2.21.0")
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

TF_QUOTED_S = 0.21  # issue 2: original TF graph, one 30 s clip, 2 cores
NAIVE_QUOTED_S = 0.27  # issue 2: a straightforward PyTorch port
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def load_clip() -> tuple[np.ndarray, str]:
    """30 s at 16 kHz: a real GTZAN clip when ../shared exists, else a generated chord."""
    from embedkit.audio import decoding as audio
    from embedkit.config import AudioConfig

    path = SHARED / "data" / "gtzan_mini" / "blues" / "blues.00000.flac"
    if path.exists():
        return audio.load(path, 16000, AudioConfig()), str(path)
    t = np.arange(30 * 16000) / 16000
    y = sum(0.1 * np.sin(2 * np.pi * f * k * t) / k for f in (261.63, 329.63, 392.0) for k in (1, 2, 3))
    return y.astype(np.float32), "generated chord"


def naive_forward(net, logmel):
    """Line-by-line port of musicnn.models.build_musicnn on the module's weights."""
    import torch
    import torch.nn.functional as F

    def bn(x, m):  # what nn.BatchNorm2d does in eval mode (one fused kernel)
        return F.batch_norm(x, m.center, m.std**2 - 1e-3, m.gamma, m.beta, False, 0.0, 1e-3)

    x = bn(logmel.unsqueeze(1), net.in_bn)  # [B, 1, T, 96]
    feats = []
    for (kind, k), w, b, m in zip(net.front_kind, net.front_w, net.front_b, net.front_bn):
        pad = (3, 3) if kind == "timbral" else ((k - 1) // 2, k - 1 - (k - 1) // 2)
        u = torch.relu(F.conv2d(F.pad(x, (0, 0, *pad)), w, b))  # [B, C, T, F]
        feats.append(bn(u, m).amax(dim=3))
    front = torch.cat(feats, 1)
    return net._rest(front, F.conv1d(front, net.mid_w[0], net.mid_b[0], padding=3))


def tf_worker(npz: str, model_dir: str, threads: int, repeats: int) -> dict:
    """Time the original graph (musicnn/models.py, TF1-style session) on the log-mel in ``npz``.

    Runs in this interpreter or, with --tf-python, in another one (TensorFlow does not install
    beside this project's pins). Needs tensorflow + tf_keras; musicnn is found through a
    symlink so that no other package of this environment shadows the TF interpreter's own."""
    import tempfile

    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tf.compat.v1.layers needs Keras 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    link_dir = tempfile.mkdtemp()
    os.symlink(Path(model_dir).parent, Path(link_dir) / "musicnn")
    sys.path.insert(0, link_dir)
    import tensorflow as tf
    from musicnn import models

    logmel = np.load(npz)["logmel"]
    tf.compat.v1.disable_eager_execution()
    with tf.name_scope("model"):
        x = tf.compat.v1.placeholder(tf.float32, [None, None, logmel.shape[2]])
        is_training = tf.compat.v1.placeholder(tf.bool)
        y, *_ = models.define_model(x, is_training, Path(model_dir).name, 50)
        tags = tf.nn.sigmoid(y)
    cfg = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=threads, inter_op_parallelism_threads=1)
    sess = tf.compat.v1.Session(config=cfg)
    tf.compat.v1.train.Saver().restore(sess, str(Path(link_dir) / "musicnn" / Path(model_dir).name) + "/")
    best, med = timeit(lambda: sess.run(tags, feed_dict={x: logmel, is_training: False}), repeats)
    return {
        "min": best,
        "median": med,
        "taggram": sess.run(tags, feed_dict={x: logmel, is_training: False}).tolist(),
        "version": tf.__version__,
    }


def measure_tf(logmel: np.ndarray, model_dir: str, threads: int, repeats: int, tf_python: str | None) -> dict | None:
    """TF timing in-process when importable, else via --tf-python, else None (quoted figure)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        npz = str(Path(tmp) / "logmel.npz")
        np.savez(npz, logmel=logmel)
        if tf_python:
            cmd = [tf_python, __file__, "--tf-worker", npz, model_dir, str(threads), str(repeats)]
            res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TF_USE_LEGACY_KERAS": "1"})
            if res.returncode != 0:
                raise SystemExit(f"--tf-python run failed:\n{res.stderr[-2000:]}")
            return json.loads(res.stdout.strip().splitlines()[-1])
        if importlib.util.find_spec("tensorflow") is None:
            return None
        return tf_worker(npz, model_dir, threads, repeats)


def timeit(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up (oneDNN primitive creation, plan build)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="musicnn-msd", choices=["musicnn-msd", "musicnn-mtt"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="5 repeats (smoke run)")
    ap.add_argument(
        "--omp-passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE (much faster on a loaded machine)"
    )
    ap.add_argument(
        "--tf-python", help="a Python with tensorflow + tf_keras to time the original graph in (e.g. a venv)"
    )
    args = ap.parse_args()
    repeats = 5 if args.quick else args.repeats
    if args.omp_passive:  # must precede the OpenMP runtime's start, i.e. importing torch
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

    import torch

    from embedkit.audio.segments import segment
    from embedkit.backbones import load_backbone
    from embedkit.backbones.musicnn import _MODEL_DIR, package_dir
    from embedkit.config import SegmentConfig

    torch.set_num_threads(args.threads)
    clip, source = load_clip()
    frames, _, _ = segment(clip, 16000, SegmentConfig(segment_s=5.0, hop_s=5.0))
    bb = load_backbone(args.backbone)
    net = bb.torch_module().eval()
    y = torch.from_numpy(np.ascontiguousarray(frames))
    print(
        f"{args.backbone} ({bb.weights_id}), clip: {source}, {len(frames)} segments x {frames.shape[1]} samples, torch threads: {args.threads}, repeats: {repeats}"
    )
    print(
        f"  load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (timings are only comparable on an idle machine), "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )

    results: dict[str, tuple[float, float]] = {}
    with torch.inference_mode():
        logmel = net.logmel(y)
        out_plan = net.forward_logmel(logmel)
        results["embed"] = timeit(lambda: net(y), repeats)
        results["network"] = timeit(lambda: net.forward_logmel(logmel), repeats)
        net.use_pruned_plan = False
        try:
            out_full = net.forward_logmel(logmel)
            results["full"] = timeit(lambda: net.forward_logmel(logmel), repeats)
        finally:
            net.use_pruned_plan = True
        out_naive = naive_forward(net, logmel)
        results["naive"] = timeit(lambda: naive_forward(net, logmel), max(3, repeats // 2))
    for name, out in (("full", out_full), ("naive", out_naive)):
        err = (out["taggram"] - out_plan["taggram"]).abs().max().item()
        print(f"  check: {name} vs pruned plan, max |taggram diff| = {err:.1e}")
        if err > 1e-4:
            raise SystemExit(f"variant {name} disagrees with the plan ({err:.1e}): benchmark invalid")

    tf_res = measure_tf(
        logmel.numpy(),
        str(package_dir(args.backbone) / _MODEL_DIR[args.backbone]),
        args.threads,
        repeats,
        args.tf_python,
    )
    if tf_res is not None:
        results["tensorflow"] = (tf_res["min"], tf_res["median"])
        err = np.abs(np.asarray(tf_res["taggram"]) - out_plan["taggram"].numpy()).max()
        print(f"  check: TensorFlow {tf_res['version']} vs pruned plan, max |taggram diff| = {err:.1e}")
        tf_ref, tf_note = (
            tf_res["min"],
            f"TensorFlow {tf_res['version']} measured in this run, {args.threads} intra-op threads",
        )
    else:
        tf_ref, tf_note = TF_QUOTED_S, "quoted in issue 2 (TensorFlow not importable here; see --tf-python)"

    naive = results["naive"][0]
    print(f"\n  {'variant':<11} {'s/clip min':>10} {'median':>8} {'clips/s':>8} {'vs naive':>9} {'vs TF':>7}")
    for name, (best, med) in results.items():
        print(f"  {name:<11} {best:10.4f} {med:8.4f} {1 / best:8.1f} {naive / best:8.2f}x {tf_ref / best:6.2f}x")
    print(f"  load average after: {os.getloadavg()[0]:.1f}")
    print(f"\n  TF reference: {tf_ref:.3f} s/clip, {tf_note}.")
    print(
        f"  naive port measured {naive:.3f} s/clip here (issue 2 quotes ~{NAIVE_QUOTED_S} s on an idle 2-core machine);"
    )
    print(
        f"  bare forward (network) is {naive / results['network'][0]:.1f}x the naive port; scaled to the quoted "
        f"naive figure that is ~{NAIVE_QUOTED_S * results['network'][0] / naive:.3f} s/clip (rough: load slows variants unequally)."
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--tf-worker":  # child process of --tf-python
        print(json.dumps(tf_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))))
    else:
        main()
