"""AST backbones: parity with transformers' own extractor + model (tiny random config), the
5 s variant, directory validation, fast offline failure, and the CLI end to end."""

import json
import time

import numpy as np
import pytest

pytest.importorskip("transformers")
import torch  # noqa: E402

from embedkit.backbones import ast, load_backbone  # noqa: E402
from embedkit.errors import BackboneError, ModelLoadingError  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(ast_tiny_dir):
    """Tiny random AST with an AudioSet head (conftest's, shared with test_backbone_contract)."""
    return ast_tiny_dir


@pytest.fixture(scope="module")
def tiny_plain_dir(tmp_path_factory):
    return ast.write_random_model(tmp_path_factory.mktemp("ast") / "plain", seed=1, classifier=False)


@pytest.fixture
def hf_isolated(clean_home, tmp_path, monkeypatch):
    """Empty HOME and Hugging Face cache, no env overrides: the default hub id is not cached."""
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(v, raising=False)
    return clean_home


def audio(n=3, seconds=5.0, seed=0):
    rng = np.random.default_rng(seed)
    x = (0.1 * rng.standard_normal((n, int(seconds * 16000)))).astype(np.float32)
    x[0] *= np.linspace(0, 2, x.shape[1], dtype=np.float32)
    return x


def reference(d, x, head: bool):
    """transformers' own feature extractor + model, as its documentation uses them."""
    import warnings

    from transformers import ASTFeatureExtractor, ASTForAudioClassification, ASTModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fe = ASTFeatureExtractor.from_pretrained(d)
    model = (ASTForAudioClassification if head else ASTModel).from_pretrained(d).eval()
    inputs = fe(list(x), sampling_rate=16000, return_tensors="pt")
    with torch.inference_mode():
        if head:
            pooled = model.audio_spectrogram_transformer(**inputs).pooler_output
            return pooled.numpy(), torch.sigmoid(model(**inputs).logits).numpy()
        return model(**inputs).pooler_output.numpy(), None


@pytest.mark.slow
def test_parity_with_transformers(tiny_dir):
    x = audio()
    bb = load_backbone("ast", checkpoint=str(tiny_dir))
    out = bb.outputs(x)
    emb_ref, clip_ref = reference(tiny_dir, x, head=True)
    assert out["embedding"].dtype == np.float32 and out["embedding"].shape == (3, 32)
    assert np.abs(emb_ref).max() > 0.1
    np.testing.assert_allclose(out["embedding"], emb_ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(out["clipwise"], clip_ref, rtol=0, atol=1e-5)
    assert bb.spec.embedding_dim == 32 and bb.spec.sample_rate == 16000 and bb.spec.outputs == ("clipwise",)
    assert bb.output_labels("clipwise")[0] == "Speech" and len(bb.output_labels("clipwise")) == 527


def test_parity_without_head(tiny_plain_dir):
    x = audio(2, 3.0, seed=2)
    bb = load_backbone("ast", checkpoint=str(tiny_plain_dir))
    emb_ref, _ = reference(tiny_plain_dir, x, head=False)
    np.testing.assert_allclose(bb.embed(x), emb_ref, rtol=0, atol=1e-5)
    assert bb.spec.outputs == ()
    with pytest.raises(BackboneError, match="no classification head"):
        bb.outputs(x)


def test_registered_spec_matches_ast_base():
    from transformers import ASTConfig

    from embedkit.backbones import get_spec

    spec, cfg = get_spec("ast"), ASTConfig()
    assert (spec.embedding_dim, spec.frontend["max_length"], spec.frontend["n_mels"]) == (
        cfg.hidden_size,
        cfg.max_length,
        cfg.num_mel_bins,
    )


def test_ast_5s_keeps_the_positions_a_5s_segment_uses(tiny_dir):
    full = load_backbone("ast", checkpoint=str(tiny_dir))
    short = load_backbone("ast-5s", checkpoint=str(tiny_dir))
    p_full = full.torch_module().ast.embeddings.position_embeddings.detach()
    p_short = short.torch_module().ast.embeddings.position_embeddings.detach()
    f_dim, h = 12, p_full.shape[-1]
    grid_full = p_full[:, 2:].reshape(1, f_dim, 101, h)
    assert p_short.shape == (1, 2 + f_dim * 50, h)
    torch.testing.assert_close(p_short[:, 2:].reshape(1, f_dim, 50, h), grid_full[:, :, :50], rtol=0, atol=0)
    torch.testing.assert_close(p_short[:, :2], p_full[:, :2], rtol=0, atol=0)
    x = audio(2, 5.0)
    e = short.embed(x)
    assert e.shape == (2, 32) and np.isfinite(e).all()
    assert short.spec.frontend["max_length"] == 512
    with pytest.raises(BackboneError, match="shorter --segment"):
        short.embed(audio(1, 6.0))
    with pytest.raises(BackboneError, match="shorter --segment"):
        full.embed(audio(1, 11.0))
    longer = load_backbone("ast", checkpoint=str(tiny_dir), max_length=1536)  # interpolated positions
    assert longer.torch_module().ast.embeddings.position_embeddings.shape[1] == 2 + f_dim * 153
    assert longer.embed(audio(1, 15.0)).shape == (1, 32)


def test_torch_module_trains(tiny_dir):
    bb = load_backbone("ast", checkpoint=str(tiny_dir))
    m = bb.torch_module()
    x = audio(2, 2.0)
    with torch.no_grad():
        np.testing.assert_allclose(m(torch.from_numpy(x)).numpy(), bb.embed(x), rtol=0, atol=1e-6)
    m.train()
    m(torch.from_numpy(x)).sum().backward()
    m.eval()
    assert m.ast.embeddings.patch_embeddings.projection.weight.grad is not None


def test_offline_hub_id_fails_fast(hf_isolated, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(ModelLoadingError, match="HF_HUB_OFFLINE") as e:
        load_backbone("ast")
    assert time.perf_counter() - t < 5
    assert ast.DEFAULT_MODEL in str(e.value) and "\n" not in str(e.value)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: the probe fails at once
    t = time.perf_counter()
    with pytest.raises(ModelLoadingError, match="unreachable"):
        load_backbone("ast", checkpoint="someone/some-ast")
    assert time.perf_counter() - t < 5
    assert list(hf_isolated.iterdir()) == []


def test_hub_id_from_local_cache_offline(tiny_dir, hf_isolated, monkeypatch, tmp_path):
    """A hub id already in the Hugging Face cache loads with HF_HUB_OFFLINE=1 (no network)."""
    import shutil

    repo = tmp_path / "hf-cache" / "models--someone--tiny-ast"  # the hub cache layout
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    shutil.copytree(tiny_dir, repo / "snapshots" / "0123abcd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bb = load_backbone("ast", checkpoint="someone/tiny-ast")
    assert bb.path == repo / "snapshots" / "0123abcd"
    assert bb.weights_id == load_backbone("ast", checkpoint=str(tiny_dir)).weights_id
    (repo / "snapshots" / "0123abcd" / "model.safetensors").unlink()
    with pytest.raises(ModelLoadingError, match="only partly in the local Hugging Face cache"):
        load_backbone("ast", checkpoint="someone/tiny-ast")


def test_env_var_and_missing_dir(tiny_dir, hf_isolated, monkeypatch):
    monkeypatch.setenv("EMBEDKIT_AST_MODEL", str(tiny_dir))
    assert load_backbone("ast").path == tiny_dir
    with pytest.raises(ModelLoadingError, match="not found"):
        load_backbone("ast", checkpoint="./no/such/dir")


@pytest.mark.parametrize(
    "case", ["file", "no-config", "wrong-type", "no-preprocessor", "no-weights", "corrupt-weights", "wrong-shapes"]
)
def test_bad_directories(case, tiny_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    if case == "file":
        d = d / "config.json"
    elif case == "no-config":
        (d / "config.json").unlink()
    elif case == "wrong-type":
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "model_type": "vit"}))
    elif case == "no-preprocessor":
        (d / "preprocessor_config.json").unlink()
    elif case == "no-weights":
        (d / "model.safetensors").unlink()
    elif case == "corrupt-weights":
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 3])
    elif case == "wrong-shapes":
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "hidden_size": 64, "intermediate_size": 128}))
    with pytest.raises(ModelLoadingError) as e:
        load_backbone("ast", checkpoint=str(d))
    assert "\n" not in str(e.value)


@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_cli_extract_ast_end_to_end(cli, tiny_dir, synth_dataset, tmp_path, hf_isolated):
    from embedkit.store import Store

    cache = tmp_path / "cache"
    r = cli(
        [
            "extract",
            str(synth_dataset),
            "--backbone",
            "ast",
            "--checkpoint",
            str(tiny_dir),
            "--cache",
            str(cache),
            "--clip",
            "5",
            "--segment",
            "5",
            "--output",
            "clipwise",
            "--workers",
            "1",
        ]
    )
    assert r.exit_code == 0, r.output
    (store_dir,) = [p for p in (cache / "ast").iterdir() if p.is_dir()]
    meta, X = Store(store_dir).read()
    _, P = Store(store_dir).read("clipwise")
    assert X.shape == (20, 32) and P.shape == (20, 527) and np.isfinite(X).all()
    assert list(hf_isolated.iterdir()) == []


def test_cli_offline_hub_id_is_one_line(cli, synth_dataset, tmp_path, hf_isolated, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    r = cli(["extract", str(synth_dataset), "--backbone", "ast", "--cache", str(tmp_path / "c")])
    assert time.perf_counter() - t < 10
    assert r.exit_code != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "HF_HUB_OFFLINE" in lines[0], r.stderr
    assert list(hf_isolated.iterdir()) == []


def test_cli_bad_directory_is_one_line(cli, tiny_dir, synth_dataset, tmp_path, hf_isolated):
    import shutil

    d = tmp_path / "vit"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "vit"}))
    r = cli(
        ["extract", str(synth_dataset), "--backbone", "ast", "--checkpoint", str(d), "--cache", str(tmp_path / "c")]
    )
    assert r.exit_code != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "not an Audio Spectrogram Transformer" in lines[0], r.stderr
    assert list(hf_isolated.iterdir()) == []
