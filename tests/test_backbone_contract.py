"""The backbone contract, checked on EVERY registered backbone (new ones are picked up
automatically from the registry): float32 output of the declared size, no NaN (noise and
silence), deterministic, batched equals one-at-a-time, extra outputs match their label lists,
and the windows of embedkit.audio.segments cover a clip of awkward length without drift.

Backbones whose real weights are not available here are built from random weights in the
official formats (PANNs: checkpoint files; AST: a tiny save_pretrained directory). musicnn's
weights come from the ``musicnn`` package: its backbones skip only when that package is absent.
"""

import numpy as np
import pytest

from embedkit.audio.segments import segment
from embedkit.backbones import get_spec, list_backbones, load_backbone
from embedkit.config import SegmentConfig

NAMES = [s.name for s in list_backbones()]
#: the contract over every backbone; the largest network (Cnn14, 80 M parameters) in the slow tier
PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n == "panns-cnn14" else n for n in NAMES]
CLIP_S = 6.8  # awkward length: 3 windows of 3 s at hop 1.5 s, and a 0.8 s tail


def _weights_for(spec, request):
    """checkpoint argument for families without packaged weights (None: packaged / none):
    conftest's random checkpoints, the same files test_panns and test_ast use."""
    if spec.family == "panns":
        return str(request.getfixturevalue("panns_checkpoint")(spec.name.removeprefix("panns-")))
    if spec.family == "ast":
        return str(request.getfixturevalue("ast_tiny_dir"))
    if spec.family == "musicnn":
        from embedkit.backbones.musicnn import checkpoints_available

        if not checkpoints_available(spec.name):
            pytest.skip("musicnn checkpoints not found: bash scripts/install.sh")
    return None


@pytest.fixture(scope="module")
def loaded(request):
    cache = {}

    def get(name):
        if name not in cache:
            spec = get_spec(name)
            cache[name] = load_backbone(name, checkpoint=_weights_for(spec, request))
        return cache[name]

    return get


def test_registry_is_populated():
    for expected in ("panns-cnn14", "panns-cnn10", "ast", "ast-5s", "melstats", "tiny-test"):
        assert expected in NAMES


@pytest.mark.parametrize("name", PARAMS)
@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_contract(name, loaded):
    registered = get_spec(name)
    bb = loaded(name)
    spec = bb.spec
    assert (spec.name, spec.family, spec.sample_rate) == (registered.name, registered.family, registered.sample_rate)
    if registered.family != "ast":  # AST's width comes from the (tiny, test) directory's config
        assert spec.embedding_dim == registered.embedding_dim
    sr = spec.sample_rate
    seg_s = min(registered.segment_s, 3.0)  # short windows keep the big CNNs cheap
    hop_s = seg_s / 2

    # windows cover the clip (HEAR-style: regular, no drift, uncovered tail shorter than a hop)
    n = int(round(CLIP_S * sr))
    y = (0.1 * np.random.default_rng(0).standard_normal(n)).astype(np.float32)
    frames, start_s, end_s = segment(y, sr, SegmentConfig(seg_s, hop_s))
    k = np.arange(len(frames))
    assert len(frames) >= 2 and frames.shape[1] == int(round(seg_s * sr))
    np.testing.assert_array_equal(np.round(start_s * sr).astype(int), np.round(k * hop_s * sr).astype(int))
    assert start_s[0] == 0 and (start_s[1:] <= end_s[:-1]).all()
    assert CLIP_S - end_s[-1] < hop_s
    np.testing.assert_array_equal(frames[-1], y[int(round(start_s[-1] * sr)) :][: frames.shape[1]])

    emb = bb.embed(frames)
    assert emb.dtype == np.float32 and emb.shape == (len(frames), spec.embedding_dim)
    assert np.isfinite(emb).all()
    assert np.abs(emb).max() > 0  # not a constant-zero stub
    np.testing.assert_array_equal(bb.embed(frames), emb)  # deterministic
    scale = max(1.0, float(np.abs(emb).max()))
    for i in range(len(frames)):  # batch composition does not change a row
        np.testing.assert_allclose(bb.embed(frames[i : i + 1])[0], emb[i], rtol=1e-5, atol=1e-5 * scale)
    assert not np.allclose(emb[0], emb[-1])  # different input, different embedding

    silent = bb.embed(np.zeros((1, frames.shape[1]), np.float32))
    assert silent.shape == (1, spec.embedding_dim) and np.isfinite(silent).all()

    if spec.outputs:
        out = bb.outputs(frames)
        np.testing.assert_allclose(out["embedding"], emb, rtol=1e-6, atol=1e-6 * scale)
        for name_ in spec.outputs:
            labels = bb.output_labels(name_)
            assert out[name_].dtype == np.float32 and out[name_].shape == (len(frames), len(labels))
            assert np.isfinite(out[name_]).all()


@pytest.mark.parametrize("name", PARAMS)
def test_every_torch_backbone_fine_tunes(name, loaded):
    """Fine-tuning works on any registered PyTorch backbone: the frozen phase trains only the
    new layer; unfreezing the top block makes one step move exactly that block and the layer."""
    import copy

    import torch

    from embedkit.cnn.finetune import (
        FinetuneConfig,
        apply_phase,
        backbone_blocks,
        trainable_names,
        used_parameters,
    )
    from embedkit.cnn.finetuned import build_finetune_net

    bb = loaded(name)
    module = bb.torch_module()
    if module is None:
        pytest.skip(f"{name} is not a PyTorch backbone")
    sr, seconds = bb.spec.sample_rate, min(bb.spec.segment_s, 1.0)
    used = used_parameters(module, sr, seconds)
    assert used, "no parameter reaches the embedding"
    net = build_finetune_net(copy.deepcopy(module), bb.spec.embedding_dim, 3, 0.0)
    apply_phase(net, FinetuneConfig(name), "frozen", used)
    assert trainable_names(net) == {"head.1.weight", "head.1.bias"}
    top, _, top_params = backbone_blocks(net.backbone, {f"{n}" for n in used})[-1]
    apply_phase(net, FinetuneConfig(name, unfreeze="top:1"), "finetune", used)
    moving = {n for n, p in net.backbone.named_parameters() if p.requires_grad}
    assert (
        moving
        and moving <= used
        and {id(p) for p in top_params} == {id(p) for _, p in net.backbone.named_parameters() if _ in moving}
    )
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], 1e-3)
    y = 0.1 * torch.randn(4, int(round(seconds * sr)), generator=torch.Generator().manual_seed(0))
    torch.nn.functional.cross_entropy(net(y), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"backbone.{n}" for n in moving} | {"head.1.weight", "head.1.bias"}
