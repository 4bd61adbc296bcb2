"""Scratch CNN: features, caches, normalisation, augmentations, model file, resume, CLI.

Tiny configurations throughout (narrow networks, 12 s clips, 1-3 epochs, one thread) so the
file runs in well under a minute on 2 cores."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from embedkit.cnn import augment as A
from embedkit.cnn.data import Clips, CropConfig, n_batches, segment_starts, train_batches
from embedkit.cnn.features import ClipCache, FeatureConfig, Normalizer, logmel, logmel_cache, raise_failures
from embedkit.cnn.model import CNNConfig, build_cnn, count_macs, load_model, save_model
from embedkit.cnn.train import TrainConfig
from embedkit.config import AudioConfig
from embedkit.errors import ConfigError, ConfigMismatchError, DatasetError, EmbedkitError, ModelLoadingError

SR = 44100


def _tone(freq: float, seconds: float, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(y: np.ndarray, sr: int = SR) -> float:
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    return float(np.argmax(spec) * sr / len(y))


# ---------------------------------------------------------------------------------------------
# Features


@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_logmel_shape_and_librosa_parity(rng):
    import librosa

    y = (0.1 * rng.standard_normal(5 * SR)).astype(np.float32)
    cfg = FeatureConfig()
    s = logmel(y, cfg)
    assert s.shape == (128, 431) == (cfg.n_mels, cfg.n_frames(5 * SR))
    ref = librosa.power_to_db(
        librosa.feature.melspectrogram(y=y, sr=SR, n_fft=2048, hop_length=512, n_mels=128),
        ref=1.0,
        amin=1e-10,
        top_db=None,
    )
    np.testing.assert_allclose(s, ref, atol=2e-3)  # dB
    assert logmel(y[None].repeat(2, 0), cfg).shape == (2, 128, 431)


def test_segment_starts_six_5s_windows_of_30s():
    cfg = FeatureConfig()
    n_frames = cfg.n_frames(30 * SR)
    starts, n = segment_starts(n_frames, cfg.hop_length, SR, 5.0)
    assert n == 431 and len(starts) == 6
    assert starts[-1] + n <= n_frames
    np.testing.assert_allclose(starts * 512, np.arange(6) * 5 * SR, atol=256)  # within half a hop
    s2, n2 = segment_starts(30 * 16000, 1, 16000, 5.0)  # waveforms: exact samples
    assert n2 == 80000 and list(s2) == [k * 80000 for k in range(6)]


def test_normalizer_fitted_on_training_clips_only(rng):
    train = [rng.normal(-40, 5, (8, 50)).astype(np.float16) for _ in range(3)]
    test = [rng.normal(+40, 50, (8, 50)).astype(np.float16)]
    norm = Normalizer("standard").fit(train)
    allx = np.concatenate([np.asarray(t, np.float64) for t in train], axis=1)
    np.testing.assert_allclose(norm.mean, allx.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(norm.std, allx.std(axis=1), rtol=1e-6)
    assert not np.allclose(Normalizer("standard").fit(train + test).mean, norm.mean)
    z = norm(torch.from_numpy(np.stack([np.asarray(t, np.float32) for t in train])))
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1) < 0.01
    mm = Normalizer("minmax")(torch.from_numpy(np.asarray(test[0], np.float32))[None])
    assert float(mm.min()) == 0.0 and abs(float(mm.max()) - 1.0) < 1e-6
    assert Normalizer.from_dict(json.loads(json.dumps(norm.to_dict()))).mean == norm.mean
    with pytest.raises(ConfigError):
        Normalizer("zscore")


def test_clip_cache_memmaps_float16_computes_once_and_reports_short_clips(tmp_path):
    import soundfile as sf

    ok, short = tmp_path / "ok.wav", tmp_path / "short.wav"
    sf.write(ok, _tone(440, 6.0, 22050), 22050)
    sf.write(short, _tone(440, 2.0, 22050), 22050)
    cache = logmel_cache(tmp_path / "cache", FeatureConfig(), AudioConfig(clip_s=6.0), min_s=5.0)
    arrays, failures = cache.build([str(ok), str(short)], workers=1)
    assert (
        isinstance(arrays[0], np.memmap)
        and arrays[0].dtype == np.float16
        and arrays[0].shape == (128, 1 + 6 * SR // 512)
    )
    assert arrays[1] is None and "too short" in failures[0][1]
    with pytest.raises(DatasetError, match="short.wav: too short"):
        raise_failures(failures, skip_bad=False)
    raise_failures(failures, skip_bad=True)
    calls = []
    again = ClipCache(
        tmp_path / "cache", "cnn-logmel", {k: v for k, v in cache.identity.items() if k != "version"}, calls.append
    )
    assert again.dir == cache.dir
    arrays2, _ = again.build([str(ok)])
    assert calls == [] and np.array_equal(arrays2[0], arrays[0])
    assert not list(cache.dir.glob("*.tmp*"))  # atomic writes leave no partial files


# ---------------------------------------------------------------------------------------------
# Augmentations: each one's measurable effect


def test_noise_hits_the_requested_snr(rng):
    y = _tone(440, 3.0)
    for snr in (10.0, 20.0):
        out = A.add_noise(y, snr, rng)
        noise = out - y
        measured = 10 * np.log10(np.mean(y.astype(np.float64) ** 2) / np.mean(noise.astype(np.float64) ** 2))
        assert abs(measured - snr) < 0.2


def test_gain_in_db():
    y = _tone(440, 1.0)
    for g in (-6.0, 3.5, 6.0):
        out = A.apply_gain(y, g)
        assert abs(20 * np.log10(np.sqrt(np.mean(out**2)) / np.sqrt(np.mean(y**2))) - g) < 1e-4


def test_time_stretch_changes_length_and_tempo_not_pitch():
    sr = 16000
    t = np.arange(8 * sr) / sr
    y = (0.3 * np.sin(2 * np.pi * 440 * t) * (np.sin(2 * np.pi * 2.0 * t) > 0)).astype(np.float32)  # gated at 2 Hz
    for rate in (0.8, 1.2):
        out = A.stretch_and_pitch(y, sr, rate=rate)
        assert abs(len(out) / len(y) - 1 / rate) < 0.01
        assert abs(_peak_hz(out[sr // 2 : -sr // 2], sr) - 440) < 3  # pitch kept
        env = np.abs(out[:: sr // 400])  # 400 Hz envelope
        env = env - env.mean()
        spec = np.abs(np.fft.rfft(env, 16 * len(env)))
        freqs = np.fft.rfftfreq(16 * len(env), 1 / 400)
        band = (freqs > 0.5) & (freqs < 6)
        assert abs(freqs[band][np.argmax(spec[band])] - 2.0 * rate) < 0.1  # tempo scaled by the rate


def test_pitch_shift_moves_a_sinusoid():
    y = _tone(440, 2.0)
    for semi in (-2.0, 2.0):
        out = A.stretch_and_pitch(y, SR, semitones=semi)
        assert len(out) == len(y)
        assert abs(_peak_hz(out[SR // 4 : -SR // 4]) / (440 * 2 ** (semi / 12)) - 1) < 0.01


def test_time_shift_and_fixed_output_length():
    y = np.arange(100, dtype=np.float32)
    np.testing.assert_array_equal(A.time_shift(y, 7), np.roll(y, 7))
    p = A.WaveParams(rate=1.2, shift=0.1)
    src = _tone(440, 1.2)
    out = A.augment_wave(src, SR, p, out_len=SR)  # a crop cut rate x longer lands on out_len
    assert len(out) == SR


def test_draw_params_respects_switches_ranges_and_probability(rng):
    none = A.draw_params(A.AugmentConfig(), rng)
    assert none.rate is none.semitones is none.shift is none.gain_db is none.snr_db is None
    cfg = A.AugmentConfig.parse("all", p=1.0)
    for _ in range(50):
        p = A.draw_params(cfg, rng)
        assert (
            0.8 <= p.rate <= 1.2
            and -2 <= p.semitones <= 2
            and -6 <= p.gain_db <= 6
            and 10 <= p.snr_db <= 20
            and abs(p.shift) <= 0.5
        )
    only_gain = A.draw_params(A.AugmentConfig.parse("gain", p=1.0), np.random.default_rng(1))
    assert only_gain.gain_db is not None and only_gain.rate is None and only_gain.snr_db is None
    with pytest.raises(ConfigError, match="unknown augmentation 'reverb'"):
        A.AugmentConfig.parse("noise,reverb")


def test_spec_augment_zeroes_bands_and_frames():
    cfg = A.AugmentConfig(freq_masks=1, freq_width=20, time_masks=1, time_width=30)
    x = torch.ones(16, 64, 200)
    A.spec_augment(x, cfg, np.random.default_rng(0))
    zero_rows = (x == 0).all(dim=2).sum(dim=1)  # fully masked mel bands per example
    zero_cols = (x == 0).all(dim=1).sum(dim=1)  # fully masked frames per example
    assert zero_rows.max() > 0 and zero_rows.max() <= 20 and zero_cols.max() > 0 and zero_cols.max() <= 30
    assert float((x == 0).float().mean()) < 0.5
    y = torch.ones(16, 64, 200)
    A.spec_augment(y, cfg, np.random.default_rng(0))
    assert torch.equal(x, y)  # same generator, same masks


def test_mixup_targets_are_convex_combinations(rng):
    x = torch.randn(8, 4, 5)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    t = torch.eye(4)[labels]
    xm, tm, lam, perm = A.mixup(x, t, 0.4, rng)
    assert 0 <= lam <= 1
    torch.testing.assert_close(tm.sum(1), torch.ones(8))
    torch.testing.assert_close(tm, lam * t + (1 - lam) * t[perm])
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x[perm])


def test_train_batches_crop_lengths_and_determinism():
    specs = [np.random.default_rng(i).normal(size=(16, 600)).astype(np.float16) for i in range(6)]
    clips = Clips(
        clean=specs, labels=np.array([0, 1, 0, 1, 0, 1]), n_classes=2, hop=512, sr=SR, normalize=Normalizer("none")
    )
    crop = CropConfig(batch_size=4, crop="random", crop_min_s=3.0, crop_max_s=5.0)
    aug = A.AugmentConfig.parse("specaugment,mixup")
    a = list(train_batches(clips, range(6), crop, aug, np.random.default_rng(3)))
    b = list(train_batches(clips, range(6), crop, aug, np.random.default_rng(3)))
    assert [x.shape[0] for x, _ in a] == [4, 2]
    for (xa, ta), (xb, tb) in zip(a, b):
        assert 1 + 3 * SR // 512 <= xa.shape[-1] <= 1 + 5 * SR // 512
        assert torch.equal(xa, xb) and torch.equal(ta, tb)
    three = list(
        train_batches(
            clips, range(6), CropConfig(batch_size=4, crops_per_clip=3), A.AugmentConfig(), np.random.default_rng(3)
        )
    )
    assert [len(x) for x, _ in three] == [4, 4, 4, 4, 2] and n_batches(
        clips, range(6), CropConfig(batch_size=4, crops_per_clip=3)
    ) == 5
    assert sum(t.sum(0) for _, t in three).tolist() == [9, 9]  # every clip three times
    fixed = list(
        train_batches(
            clips, range(6), CropConfig(batch_size=4, crop="fixed"), A.AugmentConfig(), np.random.default_rng(0)
        )
    )
    assert (
        all(x.shape[-1] == 431 for x, _ in fixed) and sum(len(x) for x, _ in fixed) == 6
    )  # one 5 s segment per 600-frame clip


# ---------------------------------------------------------------------------------------------
# Model


def test_default_network_cost_and_shapes():
    net = build_cnn(CNNConfig(n_classes=10))
    macs = count_macs(net, (1, 128, 431))
    assert 0.60e9 < macs < 0.70e9  # the issue's ~0.65 G multiply-adds per 5 s crop
    net.eval()
    assert net(torch.zeros(2, 128, 431)).shape == (2, 10)
    assert net(torch.zeros(2, 128, 260)).shape == (2, 10)  # a 3 s crop: global pooling
    textbook = build_cnn(CNNConfig(n_classes=10, block_order="conv-bn-relu-pool"))
    assert count_macs(textbook, (1, 128, 431)) == macs


def test_model_file_rebuilds_from_the_file_alone(tmp_path):
    from dataclasses import asdict

    cfg = CNNConfig(n_classes=3, channels=(4, 8))
    net = build_cnn(cfg).eval()
    norm = Normalizer("standard", [0.0] * 128, [1.0] * 128)
    payload = {
        "kind": "cnn",
        "model_config": cfg.to_dict(),
        "state_dict": net.state_dict(),
        "labels": ["a", "b", "c"],
        "features": asdict(FeatureConfig()),
        "audio": asdict(AudioConfig()),
        "normalizer": norm.to_dict(),
        "segment_s": 5.0,
    }
    save_model(tmp_path / "m.pt", payload)
    m = load_model(tmp_path / "m.pt")
    x = torch.randn(2, 128, 100)
    torch.testing.assert_close(m.net(x), net(x), rtol=0, atol=0)
    assert m.labels == ["a", "b", "c"] and m.net.classifier.out_features == 3
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(ModelLoadingError, match="bad.pt"):
        load_model(tmp_path / "bad.pt")


# ---------------------------------------------------------------------------------------------
# Training: resume equivalence, bad input


def _train(tracks, tmp_path, **kw):
    from embedkit.cnn.train import train_cnn

    opts = dict(
        cv=None,
        train=TrainConfig(
            epochs=3, batch_size=4, patience=5, crop_min_s=3, crop_max_s=5, crops_per_clip=2, lr_schedule="cosine"
        ),
        channels=(4, 8),
        features=FeatureConfig(),  # 44.1 kHz / 128 mels, not the recipe's: the checks below compute with it
        audio_cfg=AudioConfig(clip_s=12.0),
        augment=A.AugmentConfig.parse("noise,gain,shift,specaugment,mixup", wave_mode="online", p=0.7),
        runs_dir=tmp_path / "runs",
        cache=tmp_path.parent / "shared-cache",
        threads=2,
        workers=2,
    )
    opts.update(kw)
    return train_cnn(tracks, **opts)


@pytest.mark.slow
def test_resume_after_interruption_equals_uninterrupted_run(synth_tracks, tmp_path):
    full = _train(synth_tracks, tmp_path, run_dir=tmp_path / "full")

    def interrupt_after_first_epoch(e):
        if e["event"] == "epoch" and e["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(synth_tracks, tmp_path, run_dir=tmp_path / "cut", progress=interrupt_after_first_epoch)
    assert (tmp_path / "cut" / "checkpoints" / "holdout.pt").exists() and not (
        tmp_path / "cut" / "metrics.json"
    ).exists()
    resumed = _train(synth_tracks, tmp_path, run_dir=tmp_path / "cut", resume=True)
    a = torch.load(full.run_dir / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed.run_dir / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    curves_a, curves_b = full.metrics["learning_curves"]["holdout"], resumed.metrics["learning_curves"]["holdout"]
    key = ("epoch", "lr", "train_loss", "val_loss", "train_acc", "val_acc")
    assert [[r[k] for k in key] for r in curves_a] == [[r[k] for k in key] for r in curves_b] and len(curves_a) == 3
    np.testing.assert_allclose(
        [r["lr"] for r in curves_a], [1e-3 * (1 + np.cos(np.pi * e / 3)) / 2 for e in range(3)]
    )  # cosine, restored on resume
    # the stored normalisation comes from the fold's training clips only (not val / test)
    from embedkit.evaluate import make_folds

    (fold,) = make_folds(synth_tracks, "holdout", 5, 0.2, 0, 0.15)
    specs, _ = logmel_cache(tmp_path.parent / "shared-cache", FeatureConfig(), AudioConfig(clip_s=12.0), 5.0).build(
        synth_tracks["path"].tolist()
    )
    pos = {t: i for i, t in enumerate(synth_tracks["track_id"])}
    stored = torch.load(full.run_dir / "model.pt", weights_only=True)["normalizer"]["mean"]
    np.testing.assert_allclose(stored, Normalizer("standard").fit([specs[pos[t]] for t in fold.train]).mean, rtol=1e-9)
    assert not np.allclose(stored, Normalizer("standard").fit(specs).mean, rtol=1e-6)
    m = full.metrics
    assert m["kind"] == "cnn" and m["name"] == "cnn-scratch+noise+gain+shift+specaugment+mixup" and m["n_params"] > 0
    assert m["model_bytes"] == (full.run_dir / "model.pt").stat().st_size and m["inference_ms_per_track"] > 0
    # a different configuration cannot resume this run
    with pytest.raises(ConfigMismatchError, match="different configuration"):
        _train(synth_tracks, tmp_path, run_dir=tmp_path / "cut", resume=True, channels=(4, 16))
    with pytest.raises(EmbedkitError, match="already holds a run"):
        _train(synth_tracks, tmp_path, run_dir=tmp_path / "full")


@pytest.mark.slow
def test_cv_run_deploys_a_model_trained_on_every_track_and_resumes_it(synth_tracks, tmp_path):
    """After CV, model.pt is one network trained on every track for the median of the folds'
    best epochs (the folds' models stay for evaluation); an interruption inside that final fit
    resumes to the same weights."""
    kw = dict(cv=2, train=TrainConfig(epochs=3, batch_size=4, patience=1), augment=A.AugmentConfig(), threads=1)
    full = _train(synth_tracks, tmp_path, run_dir=tmp_path / "full", **kw)
    m, d = full.metrics, full.metrics["deployed_model"]
    best = [f["best_epoch"] for f in m["folds"]]
    assert (
        d["evaluated"] is False and d["source"] == "models/final.pt" and d["n_train_tracks"] == len(synth_tracks) == 20
    )
    assert d["epochs"] == max(1, int(np.ceil(np.median(best)))) and m["final_fit_seconds"] == d["train_seconds"] > 0
    assert (full.run_dir / "model.pt").read_bytes() == (full.run_dir / "models" / "final.pt").read_bytes()
    assert sorted(p.name for p in (full.run_dir / "models").iterdir()) == ["final.pt", "fold0.pt", "fold1.pt"]
    final = torch.load(full.run_dir / "model.pt", weights_only=True)
    assert final["fold"] == "final" and final["train_config"]["epochs"] == d["epochs"]
    specs, _ = logmel_cache(tmp_path.parent / "shared-cache", FeatureConfig(), AudioConfig(clip_s=12.0), 5.0).build(
        synth_tracks["path"].tolist()
    )
    np.testing.assert_allclose(
        final["normalizer"]["mean"], Normalizer("standard").fit(specs).mean, rtol=1e-9
    )  # every track
    assert list(m["learning_curves"]) == ["fold0", "fold1"]  # the scores are the folds'

    def stop_in_final(e):
        if e["event"] == "epoch" and e["fold"] == "final":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(synth_tracks, tmp_path, run_dir=tmp_path / "cut", progress=stop_in_final, **kw)
    assert (tmp_path / "cut" / "checkpoints" / "final.pt").exists() and not (tmp_path / "cut" / "model.pt").exists()
    resumed = _train(synth_tracks, tmp_path, run_dir=tmp_path / "cut", resume=True, **kw)
    a, b = final["state_dict"], torch.load(resumed.run_dir / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_one_class_too_few_clips_short_clips(synth_tracks, synth_dataset, tmp_path):
    import soundfile as sf

    one = synth_tracks[synth_tracks["label"] == synth_tracks["label"].iloc[0]]
    with pytest.raises(DatasetError, match="only one class"):
        _train(one, tmp_path)
    with pytest.raises(DatasetError, match="fewer than the 10"):
        _train(synth_tracks, tmp_path, cv=10)
    short = tmp_path / "short.wav"
    sf.write(short, _tone(440, 2.0, 22050), 22050)
    tracks = synth_tracks.copy()
    tracks.loc[0, "path"] = str(short)
    with pytest.raises(DatasetError, match=r"short.wav: too short: 2.00 s < 5 s"):
        _train(tracks, tmp_path)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*/metrics.json"))


@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_cli_train_cnn_end_to_end(synth_dataset, tmp_path):
    from embedkit.cli import app
    from embedkit.evaluate import load_runs

    runner = CliRunner()
    args = [
        "train-cnn",
        str(synth_dataset),
        "--epochs",
        "2",
        "--channels",
        "4,8",
        "--batch-size",
        "4",
        "--clip",
        "12",
        "--threads",
        "1",
        "--runs",
        str(tmp_path / "runs"),
        "--cache",
        str(tmp_path.parent / "shared-cache"),
        "--augment",
        "specaugment",
        "--crop",
        "fixed",
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    (run,) = load_runs([tmp_path / "runs"])
    assert run["kind"] == "cnn" and run["name"] == "cnn-scratch+specaugment" and run["protocol"]["type"] == "holdout"
    assert set(run["learning_curves"]["holdout"][0]) >= {"epoch", "train_loss", "val_loss", "train_acc", "val_acc"}
    assert 0 <= run["track_accuracy"] <= 1 and run["track_accuracy_vote"] is not None and run["confusion"]
    assert os.path.exists(os.path.join(run["run_dir"], "calibration.json")) and run["calibration"]["before"][
        "accuracy"
    ] == pytest.approx(run["track_accuracy"])
    model = load_model(f"{run['run_dir']}/model.pt")
    seg, mean = model.predict_proba_file(next(synth_dataset.glob("*/*.wav")))
    assert seg.shape == (2, 4) and abs(mean.sum() - 1) < 1e-5  # 12 s clip: two 5 s segments
    assert f"--resume {run['run_dir']}" in " ".join(res.output.split())  # said before training starts
    assert run["inference_note"] == "from the audio file: decode, log-mel, 2 x 5 s segments, forward, vote"
    bad = runner.invoke(app, ["train-cnn", str(synth_dataset), "--augment", "reverb", "--runs", str(tmp_path / "runs")])
    assert bad.exit_code == 1 and "unknown augmentation 'reverb'" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(app, ["train-cnn", str(synth_dataset), "--resume", str(tmp_path / "nowhere")])
    assert bad.exit_code == 1 and "not a resumable run" in bad.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
        (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--cv", "1"], "--cv needs K >= 2"),
        (["--mixup-alpha", "0", "--augment", "mixup"], "--mixup-alpha must be > 0"),
        (["--lr-schedule", "step"], "--lr-schedule must be constant, cosine or onecycle"),
        (["--crops-per-clip", "0"], "--crops-per-clip must be >= 1"),
        (["--clip", "4", "--segment", "3"], "--clip 4 s is shorter than the 5 s"),  # the 5 s crop does not fit
    ],
)
def test_cli_bad_options_fail_fast_with_one_line(args, message, synth_dataset, tmp_path):
    from embedkit.cli import app

    res = CliRunner().invoke(
        app,
        ["train-cnn", str(synth_dataset), "--runs", str(tmp_path / "runs"), "--cache", str(tmp_path / "cache"), *args],
    )
    assert (
        res.exit_code == 1
        and message in res.output
        and "Traceback" not in res.output
        and "internal error" not in res.output
    ), res.output
    assert not (tmp_path / "cache" / "cnn-logmel").exists()  # refused before any decoding


@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_pool_augmentation_missing_file_and_changed_bad_files_on_resume(synth_tracks, tmp_path):
    """Pool-mode waveform augmentation (the default mode) trains; a manifest row whose file is
    gone is skipped with --skip-bad and named otherwise; a resume whose set of bad files changed
    is refused instead of mapping predictions onto the wrong tracks."""
    tracks = synth_tracks.copy()
    tracks.loc[0, "path"] = str(tmp_path / "gone.wav")
    with pytest.raises(EmbedkitError, match=r"gone.wav: cannot read file"):
        _train(tracks, tmp_path, augment=A.AugmentConfig.parse("noise,gain"), train=_one_epoch())
    aug = A.AugmentConfig.parse("noise,gain", pool_size=2, p=1.0)  # every variant augmented (p=0.5 leaves 1 in 4 clean)
    res = _train(tracks, tmp_path, augment=aug, train=_one_epoch(), skip_bad=True, run_dir=tmp_path / "pool")
    assert [s["path"] for s in res.metrics["skipped"]] == [str(tmp_path / "gone.wav")] and res.metrics["dataset"][
        "n_tracks"
    ] == len(tracks) - 1
    (pool_dir,) = (tmp_path.parent / "shared-cache" / "cnn-pool").iterdir()
    variants = [np.load(f) for f in pool_dir.glob("*.npy")]  # one per training clip (not val / test)
    assert len(variants) >= 10 and all(v.shape[0] == 2 and v.shape[1] == 128 for v in variants)
    assert not np.array_equal(variants[0][0], variants[0][1])  # two different augmented variants

    def stop(e):
        if e["event"] == "epoch":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(tracks, tmp_path, train=_one_epoch(epochs=2), skip_bad=True, run_dir=tmp_path / "cut", progress=stop)
    tracks.loc[1, "path"] = str(tmp_path / "also-gone.wav")
    with pytest.raises(ConfigMismatchError, match="different configuration"):
        _train(tracks, tmp_path, train=_one_epoch(epochs=2), skip_bad=True, run_dir=tmp_path / "cut", resume=True)


def _one_epoch(epochs=1):
    from embedkit.cnn.train import TrainConfig

    return TrainConfig(epochs=epochs, batch_size=4, patience=5)


def test_keep_freed_memory_keeps_big_blocks_and_restores_the_default():
    """glibc returns a freed 256 MB block to the OS at once by default (so the next step
    page-faults it back in); while the trainers run, freed memory stays in the process."""
    from embedkit.cnn.runs import keep_freed_memory

    def rss_mb() -> float:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    if not os.path.exists("/proc/self/statm") or not keep_freed_memory(False):
        pytest.skip("needs glibc's mallopt and /proc")

    def rss_drop_after_free() -> float:
        a = np.ones(256 * 2**20 // 8)  # touched: resident
        before = rss_mb()
        del a
        return before - rss_mb()

    try:
        assert rss_drop_after_free() > 200  # default: unmapped on free
        assert keep_freed_memory()
        assert rss_drop_after_free() < 50  # kept for the next allocation
    finally:
        keep_freed_memory(False)


# ---------------------------------------------------------------------------------------------
# Schedules and label smoothing


def test_lr_schedules_cosine_and_onecycle():
    cos = TrainConfig(epochs=10, lr_schedule="cosine")
    assert cos.lr_factor(0) == 1.0 and cos.lr_factor(5) == pytest.approx(0.5)
    one = TrainConfig(epochs=10, lr_schedule="onecycle")  # warm-up over 3 epochs, then cosine
    f = [one.lr_factor(e) for e in range(10)]
    assert f[0] == pytest.approx(0.1) and f[1] == pytest.approx(0.4) and f[3] == 1.0
    assert all(a < b for a, b in zip(f[:3], f[1:4])) and all(a > b for a, b in zip(f[3:], f[4:]))
    assert f[-1] == pytest.approx(0.5 * (1 + np.cos(np.pi * 6 / 7)))
    assert TrainConfig(lr_schedule="constant").lr_factor(7) == 1.0
    with pytest.raises(ConfigError, match="lr_schedule must be constant, cosine or onecycle"):
        TrainConfig(lr_schedule="step").validate()
    with pytest.raises(ConfigError, match="label_smoothing must be in"):
        TrainConfig(label_smoothing=1.0).validate()


def test_label_smoothing_trains_against_smoothed_targets():
    """The epoch's loss is the cross-entropy against (1 - e) * targets + e / C, so a network
    that predicts the one-hot targets perfectly still has a loss under smoothing."""
    from embedkit.cnn.loop import soft_cross_entropy, train_epoch

    torch.manual_seed(0)
    x, t = torch.randn(8, 5), torch.eye(4)[torch.tensor([0, 0, 0, 0, 0, 0, 1, 2])]
    losses = {}
    for e in (0.0, 0.2):
        net = torch.nn.Linear(5, 4)
        with torch.no_grad():
            net.weight.zero_()
            net.bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))
        before = soft_cross_entropy(net(x), t * (1 - e) + e / 4).item()
        opt = torch.optim.SGD(net.parameters(), lr=0.0)  # no update: the reported loss is the start's
        losses[e] = (train_epoch(net, opt, [(x, t)], label_smoothing=e)["loss"], before)
    assert losses[0.0][0] == pytest.approx(losses[0.0][1])
    assert losses[0.2][0] == pytest.approx(losses[0.2][1])
    assert losses[0.2][0] > losses[0.0][0] + 0.1  # mostly-right confident predictions lose more
