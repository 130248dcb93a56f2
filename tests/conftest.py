"""Test set-up. Without CUDA, Triton kernels run in Triton's CPU interpreter: that
needs TRITON_INTERPRET=1 before triton is first imported, so it is set here, at
collection time, before any longvita module loads."""

import os

import pytest


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_numpy_problem() -> str | None:
    """Triton 3.6's interpreter is numpy underneath and numpy 2.4 breaks it (wrong results
    and crashes deep in the kernels): refuse to run rather than fail a hundred tests."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None  # on a GPU (or with TRITON_INTERPRET=0) numpy's version does not matter
    import numpy

    major, minor = (int(x) for x in numpy.__version__.split(".")[:2])
    if (major, minor) < (2, 4):
        return None
    return (
        f"the CPU tests run Triton kernels in Triton 3.6's interpreter (TRITON_INTERPRET=1), which "
        f"numpy {numpy.__version__} breaks: it needs numpy<2.4. Fix: pip install 'numpy<2.4' "
        f"(the test extra pins it: pip install --no-build-isolation '.[test]'), or run the tests on a GPU."
    )


def pytest_configure(config):
    problem = _interpreter_numpy_problem()
    if problem:
        pytest.exit(problem, returncode=4)

import torch  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs per test, reproducible from the printed seed on failure."""
    seed = int.from_bytes(os.urandom(4), "little") if os.environ.get("LONGVITA_TEST_SEED") is None else int(os.environ["LONGVITA_TEST_SEED"])
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"\n[seed] reproduce with LONGVITA_TEST_SEED={seed}")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
