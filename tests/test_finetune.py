"""Fine-tuning: frozen / unfrozen parameter sets, batch-norm handling, resume across the
unfreezing boundary, CLI end to end and bad input. Uses the random `tiny-test` backbone;
musicnn-msd gets a one-step integration check (weights ship in the musicnn wheel)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from embedkit.cnn.augment import AugmentConfig
from embedkit.cnn.finetune import (
    FinetuneConfig,
    FinetuneTask,
    apply_phase,
    backbone_blocks,
    finetune,
    trainable_names,
    used_parameters,
)
from embedkit.cnn.finetuned import build_finetune_net, load_finetuned
from embedkit.cnn.train import TrainConfig
from embedkit.config import AudioConfig
from embedkit.errors import BackboneError, ConfigError


def _tiny_net(n_classes=3):
    from embedkit.backbones import load_backbone

    bb = load_backbone("tiny-test")
    return build_finetune_net(bb.torch_module(), bb.spec.embedding_dim, n_classes, 0.25), bb


def test_frozen_phase_trains_only_the_new_layer_and_keeps_bn_statistics():
    import copy

    net, _ = _tiny_net()
    net = copy.deepcopy(net)
    apply_phase(net, FinetuneConfig("tiny-test"), "frozen")
    assert trainable_names(net) == {"head.1.weight", "head.1.bias"}
    bns = [m for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and net.head.training
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}  # weights + running stats
    head_before = net.head[1].weight.clone()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], 1e-2)
    y = 0.1 * torch.randn(4, 16000)
    loss = torch.nn.functional.cross_entropy(net(y), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    after = net.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. BN running_mean / var
    assert not torch.equal(head_before, net.head[1].weight)


def test_unfreeze_all_and_top_blocks():
    net, bb = _tiny_net()
    used = used_parameters(net.backbone, 16000, 1.0)
    blocks = [n for n, _, _ in backbone_blocks(net.backbone, used)]
    assert blocks == ["features.0", "features.1", "features.4", "features.5"]
    apply_phase(net, FinetuneConfig("tiny-test", unfreeze="all"), "finetune", used)
    assert trainable_names(net) == {f"backbone.{n}" for n in used} | {"head.1.weight", "head.1.bias"}
    assert net.backbone.training
    apply_phase(net, FinetuneConfig("tiny-test", unfreeze="top:2"), "finetune", used)
    assert trainable_names(net) == {
        "backbone.features.4.weight",
        "backbone.features.4.bias",
        "backbone.features.5.weight",
        "backbone.features.5.bias",
        "head.1.weight",
        "head.1.bias",
    }
    assert net.backbone.features[5].training and not net.backbone.features[1].training  # frozen BN stays in eval


def test_optimizer_rates_per_phase(synth_dataset):
    from embedkit.cnn.data import Clips

    _, bb = _tiny_net()
    task = FinetuneTask(FinetuneConfig("tiny-test", frozen_epochs=2)).bind(
        TrainConfig(), AugmentConfig(), AudioConfig(), ["a", "b", "c"]
    )
    task.clips = Clips(
        clean=[], labels=np.zeros(0, int), n_classes=3, hop=1, sr=16000, normalize=lambda x: x, spectrogram=False
    )
    model = task.build_model()
    assert [task.phase(e) for e in range(4)] == ["frozen", "frozen", "finetune", "finetune"]
    frozen = task.make_optimizer(model, "frozen")
    assert [g["lr"] for g in frozen.param_groups] == [1e-2] and len(frozen.param_groups[0]["params"]) == 2
    ft = task.make_optimizer(model, "finetune")
    assert [g["lr"] for g in ft.param_groups] == [1e-4, 5e-5]
    # every fold starts from the pretrained weights, not from the previous fold's
    with torch.no_grad():
        model.backbone.features[0].weight.add_(1.0)
    assert torch.equal(task.build_model().backbone.features[0].weight, bb.torch_module().features[0].weight)


def _ft(tracks, tmp_path, **kw):
    opts = dict(
        train=TrainConfig(epochs=3, batch_size=4, patience=5),
        ft=FinetuneConfig("tiny-test", frozen_epochs=1, unfreeze="top:2"),
        audio_cfg=AudioConfig(clip_s=12.0),
        augment=AugmentConfig.parse("noise,gain,mixup", p=0.7, wave_mode="online"),
        runs_dir=tmp_path / "runs",
        cache=tmp_path.parent / "shared-cache",
        threads=1,
        workers=2,
    )
    opts.update(kw)
    return finetune(tracks, "tiny-test", **opts)


@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_resume_across_the_unfreezing_boundary(synth_tracks, tmp_path):
    full = _ft(synth_tracks, tmp_path, run_dir=tmp_path / "full")

    def interrupt(e):
        if e["event"] == "epoch" and e["epoch"] == 1:  # the last frozen epoch
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _ft(synth_tracks, tmp_path, run_dir=tmp_path / "cut", progress=interrupt)
    resumed = _ft(synth_tracks, tmp_path, run_dir=tmp_path / "cut", resume=True)
    a = torch.load(full.run_dir / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed.run_dir / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    m = full.metrics
    assert (
        m["kind"] == "finetune" and m["backbone"] == "tiny-test" and m["name"] == "finetune-tiny-test+noise+gain+mixup"
    )
    assert [r["phase"] for r in m["learning_curves"]["holdout"]] == ["frozen", "finetune", "finetune"]
    model = load_finetuned(full.run_dir / "model.pt")
    seg, mean = model.predict_proba_file(synth_tracks["path"].iloc[0])
    assert seg.shape == (2, 4) and abs(mean.sum() - 1) < 1e-5


def test_bad_input(synth_tracks, tmp_path):
    with pytest.raises(BackboneError, match="unknown backbone 'nope'; valid names"):
        finetune(synth_tracks, "nope", runs_dir=tmp_path)
    with pytest.raises(BackboneError, match="melstats.*no PyTorch module"):
        finetune(synth_tracks, "melstats", runs_dir=tmp_path)
    with pytest.raises(ConfigError, match="specaugment needs a spectrogram"):
        _ft(synth_tracks, tmp_path, augment=AugmentConfig.parse("specaugment"))
    with pytest.raises(ConfigError, match="unfreeze must be"):
        _ft(synth_tracks, tmp_path, ft=FinetuneConfig("tiny-test", unfreeze="top:0"))


def test_cli_finetune_end_to_end(synth_dataset, tmp_path):
    from embedkit.cli import app
    from embedkit.evaluate import load_runs

    runner = CliRunner()
    base = [
        "finetune",
        str(synth_dataset),
        "--runs",
        str(tmp_path / "runs"),
        "--cache",
        str(tmp_path.parent / "shared-cache"),
        "--clip",
        "12",
        "--threads",
        "1",
    ]
    res = runner.invoke(
        app, base + ["--backbone", "tiny-test", "--epochs", "2", "--frozen-epochs", "1", "--batch-size", "4"]
    )
    assert res.exit_code == 0, res.output
    (run,) = load_runs([tmp_path / "runs"])
    assert (
        run["kind"] == "finetune"
        and run["name"] == "finetune-tiny-test"
        and len(run["learning_curves"]["holdout"]) == 2
    )
    assert os.path.exists(os.path.join(run["run_dir"], "calibration.json")) and set(run["calibration"]["after"]) == {
        "ece",
        "nll",
        "brier",
        "accuracy",
    }
    bad = runner.invoke(app, base + ["--backbone", "nope"])
    assert bad.exit_code == 1 and "unknown backbone 'nope'" in bad.output and "Traceback" not in bad.output


@pytest.mark.slow
def test_musicnn_blocks_and_one_training_step():
    from embedkit.backbones import load_backbone
    from embedkit.backbones.musicnn import checkpoints_available

    if not checkpoints_available("musicnn-msd"):
        pytest.skip("musicnn checkpoints not found: bash scripts/install.sh")

    bb = load_backbone("musicnn-msd")
    module = bb.torch_module()
    used = used_parameters(module, 16000, 3.0)
    assert not any(n.startswith("tag_head") for n in used)  # the tag layer does not feed the embedding
    net = build_finetune_net(module, 200, 4, 0.25)
    body = apply_phase(net, FinetuneConfig("musicnn-msd", unfreeze="top:2"), "finetune", used)
    assert {n for n in trainable_names(net) if n.startswith("backbone.")} == {
        "backbone.dense.weight",
        "backbone.dense.bias",
        "backbone.pen_bn.gamma",
        "backbone.pen_bn.beta",
    }
    opt = torch.optim.Adam([{"params": list(net.head.parameters())}, {"params": body, "lr": 5e-5}], 1e-4)
    w0 = net.backbone.dense.weight.clone()
    frozen0 = net.backbone.mid_w[0].clone()
    loss = torch.nn.functional.cross_entropy(net(0.1 * torch.randn(2, 3 * 16000)), torch.tensor([0, 3]))
    loss.backward()
    opt.step()
    assert not torch.equal(w0, net.backbone.dense.weight) and torch.equal(frozen0, net.backbone.mid_w[0])
