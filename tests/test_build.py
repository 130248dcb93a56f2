"""The installed package: the native extension is there (so the C++ paths are tested,
not skipped), and the package says which backends it uses."""

import os

import pytest

from longvita._ext import native, native_has_cuda, native_status


@pytest.mark.skipif(os.environ.get("LONGVITA_SKIP_EXT") == "1", reason="built without the extension on purpose")
def test_native_extension_is_built():
    # `python -m pytest` from the repo root would import the source tree instead of the
    # installed package and silently skip every C++ test: this test makes that loud
    assert native() is not None, f"longvita._C: {native_status()}"
    info = native().build_info()
    assert set(info) >= {"cuda", "built_with_torch"}
    assert native_has_cuda() == bool(info["cuda"])


def test_status_names_the_build():
    status = native_status()
    assert status.startswith("built (") or status.startswith("not built (")
