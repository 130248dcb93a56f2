"""PyAV is optional (the `video` extra) and numpy is not pinned for users: the package,
its CLI and everything the GPU session imports work without PyAV; only video decoding
needs it, and then says how to install it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import pytest

BLOCK_AV = "import sys; sys.modules['av'] = None  # `import av` now raises ImportError\n"


def _python(code: str, timeout: int = 300):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # a user's shell
    # outside the repo, so the installed package is what imports
    return subprocess.run([sys.executable, "-c", BLOCK_AV + textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=tempfile.gettempdir())


def test_no_longvita_module_imports_av_at_import_time():
    r = _python("""
        import importlib, os, pkgutil
        import torch
        import longvita

        def names(paths, prefix):
            for m in pkgutil.iter_modules(paths):
                yield prefix + m.name
                if m.ispkg:
                    yield from names([os.path.join(p, m.name) for p in paths if os.path.isdir(os.path.join(p, m.name))],
                                     prefix + m.name + ".")

        found = [n for n in names(list(longvita.__path__), "longvita.") if n != "longvita.__main__"]
        bad = []
        for name in found:
            try:
                importlib.import_module(name)
            except Exception as exc:
                bad.append(f"{name}: {type(exc).__name__}: {exc}")
        assert len(found) > 10 and "longvita.data.video" in found, found
        assert not bad, bad
        print(len(found))
    """)
    assert r.returncode == 0, r.stdout + r.stderr


def test_generate_without_pyav():
    r = _python("""
        from longvita.cli import main
        sys.exit(main(["generate", "--max-new-tokens", "2", "--json"]))
    """)
    assert r.returncode == 0, r.stderr
    assert '"tokens"' in r.stdout


def test_load_video_without_pyav_says_how_to_install(tmp_path, monkeypatch):
    from longvita.data import InputError, load_video

    monkeypatch.setitem(sys.modules, "av", None)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match=r"clip\.mp4.*PyAV.*longvita\[video\]"):
        load_video(clip)
    with pytest.raises(InputError, match="does not exist"):  # a missing file is still reported as such
        load_video(tmp_path / "missing.mp4")


def test_numpy_and_pyav_not_required_by_the_package():
    """The GPU machine's numpy (2.5) must not be downgraded and it has no PyAV: the
    package's own requirements pin neither; the test extra carries both."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    deps = [d.replace(" ", "") for d in project["dependencies"]]
    assert not [d for d in deps if d.startswith("av")], deps
    assert not [d for d in deps if d.startswith("numpy") and "<" in d], deps
    extras = project["optional-dependencies"]
    assert any(d.startswith("av") for d in extras["video"])
    assert any(d.startswith("av") for d in extras["test"])
    assert any(d.replace(" ", "").startswith("numpy<2.4") for d in extras["test"])
