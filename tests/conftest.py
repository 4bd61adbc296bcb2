import os

# Before torch is imported anywhere: avoid OpenMP spin-waiting (see embedkit.cli.main).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EMBEDKIT_SHARED", ROOT.parent / "shared"))
GTZAN = SHARED / "data" / "gtzan_mini"
FMA_SAMPLE = SHARED / "data" / "fma_sample" / "000002.mp3"
GOLDEN = SHARED / "golden"

needs_shared = pytest.mark.skipif(not GTZAN.exists(), reason=f"real data not found at {GTZAN} (../shared absent)")


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory):
    """4 classes x 5 clips of 12 s at 22.05 kHz (WAV), generated once per session."""
    from embedkit.synth import make_dataset

    return make_dataset(tmp_path_factory.mktemp("synth"), n_classes=4, per_class=5, duration_s=12.0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
