"""Where the musicnn checkpoints come from: unpacking them from the musicnn 0.1.0 wheel without
installing it (embedkit.weights.install_wheel_files / install_musicnn), the lookup order of
embedkit.backbones.musicnn.package_dir, and the one-line error when none is found. Fake wheels
are built in tmp_path; the real checkpoints are used when this machine has them."""

from __future__ import annotations

import base64
import hashlib
import importlib.machinery
import importlib.util
import sys
import zipfile

import pytest

from embedkit.backbones import musicnn as m
from embedkit.errors import ModelLoadingError
from embedkit.weights import check_musicnn, find_wheel, install_musicnn, install_wheel_files, main

DATA = m.DATA_FILE


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def fake_files() -> dict[str, bytes]:
    """Wheel member -> bytes, in the musicnn 0.1.0 wheel's layout (tiny stand-in contents)."""
    files = {
        "musicnn/__init__.py": b"",
        "musicnn/models.py": b"import tensorflow\n",
        "musicnn/configuration.py": b"MSD_LABELS = ['rock', 'pop']\nMTT_LABELS = ['guitar']\n",
        "musicnn-0.1.0.dist-info/LICENSE.md": b"ISC\n",
        "musicnn-0.1.0.dist-info/METADATA": b"Requires-Dist: numpy (<1.17)\n",
    }
    for folder in ("MSD_musicnn", "MTT_musicnn", "MSD_vgg"):
        for f in (DATA, ".index", "checkpoint"):
            files[f"musicnn/{folder}/{f}"] = f"{folder}{f}".encode()
    return files


def make_wheel(path, files: dict[str, bytes], record: dict[str, bytes] | None = None):
    """A wheel (zip) with a RECORD listing ``record`` (default: every file, correct hashes)."""
    rows = []
    for name, data in (files if record is None else record).items():
        b64 = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{name},sha256={b64},{len(data)}")
    rows.append("musicnn-0.1.0.dist-info/RECORD,,")
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("musicnn-0.1.0.dist-info/RECORD", "\n".join(rows) + "\n")
    return path


def fake_published(files: dict[str, bytes]) -> dict[str, str]:
    """The fake wheel's own hashes, keyed like m.published_sha256()."""
    out = {"configuration.py": _sha(files["musicnn/configuration.py"])}
    for folder in ("MSD_musicnn", "MTT_musicnn"):
        for f in (DATA, ".index"):
            out[f"{folder}/{f}"] = _sha(files[f"musicnn/{folder}/{f}"])
    return out


# ---------------------------------------------------------------------------------------------
# unpacking from a wheel


def test_unpacks_only_the_checkpoint_folders_verified(tmp_path):
    files = fake_files()
    wheel = make_wheel(tmp_path / "musicnn-0.1.0-py3-none-any.whl", files)
    dest = tmp_path / "data" / "musicnn"
    written = install_wheel_files(wheel, dest, m.WHEEL_MEMBERS, fake_published(files))
    assert sorted(p.relative_to(dest).as_posix() for p in written) == sorted(
        [f"{d}/{f}" for d in ("MSD_musicnn", "MTT_musicnn") for f in (DATA, ".index", "checkpoint")]
        + ["configuration.py", "LICENSE.md"]
    )
    assert (dest / "MSD_musicnn" / DATA).read_bytes() == files[f"musicnn/MSD_musicnn/{DATA}"]
    # no code, no metadata, no unused model; no staging folder left behind
    assert not (dest / "models.py").exists() and not (dest / "MSD_vgg").exists()
    assert not list(dest.rglob("METADATA")) and not list(dest.rglob("RECORD"))
    assert [p.name for p in dest.parent.iterdir()] == ["musicnn"]


def test_corrupt_file_is_refused_and_dest_left_as_it_was(tmp_path):
    files = fake_files()
    good = fake_published(files)
    dest = tmp_path / "musicnn"
    install_wheel_files(make_wheel(tmp_path / "good.whl", files), dest, m.WHEEL_MEMBERS, good)
    (dest / "NOTES.txt").write_text("mine")  # other files in dest are never touched
    before = {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()}

    bad = dict(files)
    bad[f"musicnn/MTT_musicnn/{DATA}"] = b"flipped bits"
    with pytest.raises(ModelLoadingError, match=r"MTT_musicnn/\.data-00000-of-00001 has SHA-256 .* not the published"):
        install_wheel_files(make_wheel(tmp_path / "bad.whl", bad), dest, m.WHEEL_MEMBERS, good)
    assert {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.whl", "good.whl", "musicnn"]  # no staging left

    # a file without a published hash is still checked against the wheel's RECORD
    damaged = dict(files)
    damaged["musicnn/MSD_musicnn/checkpoint"] = b"truncat"
    wheel = make_wheel(tmp_path / "damaged.whl", damaged, record=files)
    with pytest.raises(ModelLoadingError, match="does not match the wheel's RECORD"):
        install_wheel_files(wheel, dest, m.WHEEL_MEMBERS, good)


def test_install_musicnn_checks_the_published_sha256(tmp_path):
    """The real entry point with embedkit's published hashes: the fake bytes are refused."""
    (tmp_path / "dl").mkdir()
    make_wheel(tmp_path / "dl" / "musicnn-0.1.0-py3-none-any.whl", fake_files())
    with pytest.raises(ModelLoadingError, match="not the published .* nothing installed"):
        install_musicnn(tmp_path / "dl", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    assert set(m.published_sha256()) == set(fake_published(fake_files()))


def test_wrong_or_incomplete_wheels_are_refused(tmp_path):
    files, published = fake_files(), fake_published(fake_files())
    del files["musicnn/MTT_musicnn/.index"]
    with pytest.raises(ModelLoadingError, match=r"has no file for MTT_musicnn/\.index"):
        install_wheel_files(make_wheel(tmp_path / "a.whl", files), tmp_path / "d", m.WHEEL_MEMBERS, published)
    files = {k: v for k, v in fake_files().items() if not k.startswith("musicnn/MTT_musicnn/")}
    with pytest.raises(ModelLoadingError, match="has no musicnn/MTT_musicnn/; not the expected wheel"):
        install_wheel_files(make_wheel(tmp_path / "b.whl", files), tmp_path / "d", m.WHEEL_MEMBERS, {})
    (tmp_path / "c.whl").write_bytes(b"not a zip")
    with pytest.raises(ModelLoadingError, match="not a readable wheel"):
        install_wheel_files(tmp_path / "c.whl", tmp_path / "d", m.WHEEL_MEMBERS, {})
    evil = {"musicnn/MSD_musicnn/../../escape": b"x"}
    with pytest.raises(ModelLoadingError, match="unsafe member path"):
        install_wheel_files(make_wheel(tmp_path / "e.whl", evil), tmp_path / "d", {"musicnn/MSD_musicnn/": "M/"}, {})
    assert not (tmp_path / "d").exists() and not (tmp_path / "escape").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadingError, match=r"expected one musicnn-\*\.whl in this folder, found 0"):
        find_wheel(tmp_path / "empty", "musicnn")


# ---------------------------------------------------------------------------------------------
# lookup order


def _fake_bundle(root):
    for folder in ("MSD_musicnn", "MTT_musicnn"):
        (root / folder).mkdir(parents=True)
        (root / folder / DATA).write_bytes(b"x")
    return root


@pytest.fixture
def places(tmp_path, monkeypatch):
    """Empty stand-ins for every place in the lookup order (none holds checkpoints yet)."""
    prefix, home, legacy = tmp_path / "prefix", tmp_path / "home", tmp_path / "site" / "musicnn"
    monkeypatch.delenv(m.DIR_ENV, raising=False)
    monkeypatch.setattr(sys, "prefix", str(prefix))
    monkeypatch.setenv("HOME", str(home))
    spec = importlib.machinery.ModuleSpec("musicnn", None, is_package=True)
    spec.submodule_search_locations = [str(legacy)]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: spec if n == "musicnn" else real(n, *a))
    return {
        "env": tmp_path / "env",
        "prefix": prefix / "share" / "embedkit" / "musicnn",
        "user": home / ".cache" / "embedkit" / "musicnn",
        "legacy": legacy,
    }


def test_lookup_order(places, monkeypatch):
    order = ["legacy", "user", "prefix"]  # filled from the back: each new one must win
    for key in order:
        _fake_bundle(places[key])
        assert m.package_dir("musicnn-msd") == places[key] == m.package_dir("musicnn-mtt")
    assert [p for _o, p in m.search_path()] == [places[k] for k in ("prefix", "user", "legacy")]
    # $EMBEDKIT_MUSICNN_DIR comes first and, when set, is the only place looked at
    monkeypatch.setenv(m.DIR_ENV, str(places["env"]))
    with pytest.raises(ModelLoadingError, match=r"\$EMBEDKIT_MUSICNN_DIR=.*env has no MSD_musicnn/"):
        m.package_dir("musicnn-msd")
    _fake_bundle(places["env"])
    assert m.package_dir("musicnn-msd") == places["env"]


def test_install_target_is_the_first_writable_place(places, monkeypatch):
    assert m.default_install_dir() == places["prefix"]
    monkeypatch.setattr(m.os, "access", lambda p, mode: False)  # a read-only system Python
    assert m.default_install_dir() == places["user"]
    monkeypatch.setenv(m.DIR_ENV, str(places["env"]))
    assert m.default_install_dir() == places["env"]


def test_none_found_is_one_clear_line(places, monkeypatch, capsys):
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None)
    with pytest.raises(ModelLoadingError) as exc:
        m.package_dir("musicnn-mtt")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("musicnn-mtt checkpoint (MTT_musicnn/.data-00000-of-00001) not found")
    for where in (places["prefix"], places["user"]):
        assert str(where) in msg
    for hint in ("an installed musicnn package (none)", m.INSTALL, "install-musicnn", m.DIR_ENV, m.PIP):
        assert hint in msg
    assert not m.checkpoints_available("musicnn-mtt")
    assert main(["check-musicnn"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: musicnn-msd checkpoint")


def test_unpacked_checkpoints_are_what_the_backbone_finds(places, tmp_path):
    """install-musicnn's default target is the first place in the lookup order."""
    files = fake_files()
    make_wheel(tmp_path / "musicnn-0.1.0-py3-none-any.whl", files)
    install_wheel_files(tmp_path / "musicnn-0.1.0-py3-none-any.whl", m.default_install_dir(), m.WHEEL_MEMBERS, {})
    assert m.package_dir("musicnn-msd") == places["prefix"]
    assert m._labels("musicnn-msd", places["prefix"]) == ["rock", "pop"]


# ---------------------------------------------------------------------------------------------
# the real checkpoints, when this machine has them


@pytest.mark.skipif(not m.checkpoints_available(), reason="musicnn checkpoints not installed (scripts/install.sh)")
def test_real_checkpoints_are_found_and_reinstall_verified(tmp_path, monkeypatch):
    found = check_musicnn()  # every file embedkit reads has its published SHA-256
    root = found["musicnn-msd"]
    assert m.package_dir() == root and (root / "configuration.py").is_file()
    # the real files, packed in the wheel's layout, pass install_musicnn's published-hash check
    files = {"musicnn-0.1.0.dist-info/LICENSE.md": b"ISC\n", "musicnn/configuration.py": b""}
    files["musicnn/configuration.py"] = (root / "configuration.py").read_bytes()
    for folder in ("MSD_musicnn", "MTT_musicnn"):
        for f in (DATA, ".index"):
            files[f"musicnn/{folder}/{f}"] = (found[f"musicnn-{folder[:3].lower()}"] / folder / f).read_bytes()
    wheel = tmp_path / "musicnn-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:  # stored: no compression time
        for name, data in files.items():
            z.writestr(name, data)
    dest = install_musicnn(wheel, tmp_path / "copy")
    monkeypatch.setenv(m.DIR_ENV, str(dest))
    assert check_musicnn() == {"musicnn-msd": dest, "musicnn-mtt": dest}
