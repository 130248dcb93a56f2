"""Dependencies point one way (docs/architecture.md, "Layers"): every import of every module
under longvita/, lazy ones inside functions included, read from its syntax tree."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "longvita"

# what each top-level part may import from longvita (besides itself)
ALLOWED = {
    "common": set(),
    "files": {"common"},
    "_ext": {"_C"},  # the compiled extension
    "kernels": {"common", "files", "_ext"},
    "model": {"common", "files", "_ext", "kernels"},
    "data": {"common", "files"},
    "pipeline": {"common", "files", "_ext", "kernels", "model", "data"},
    "parallel": {"common", "files", "_ext", "kernels", "model"},
    "runtime": {"common", "files", "_ext", "kernels", "model", "data", "parallel", "pipeline"},
    "eval": {"common", "files", "_ext", "kernels", "model", "data", "parallel", "pipeline", "runtime"},
    # beside runtime: may use what runtime may, and runtime itself; nothing imports it
    "integrations": {"common", "files", "_ext", "kernels", "model", "data", "parallel", "pipeline", "runtime"},
    "cli": {"common", "files", "_ext", "kernels", "model", "data", "parallel", "pipeline", "runtime", "eval",
            "__version__"},
}
# the model is plain (parallelism comes from outside) and data knows no ranks; the LM-head
# kernel may all-reduce its global label count over a group it is given
NO_DISTRIBUTED = ("model", "data")


def _part(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.module, node.lineno)] + [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
    return out


def _modules():
    return [p for p in ROOT.rglob("*.py") if _part(p) not in ("__init__", "__main__")]


def test_every_part_is_in_the_table():
    assert {_part(p) for p in _modules()} <= set(ALLOWED), {_part(p) for p in _modules()} - set(ALLOWED)


def test_imports_point_down():
    bad = []
    for path in _modules():
        part = _part(path)
        for name, line in _imports(path):
            if not name.startswith("longvita."):
                continue
            target = name.split(".")[1]
            if target != part and target not in ALLOWED[part]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def test_model_and_data_never_import_torch_distributed():
    bad = [f"{p.relative_to(ROOT)}:{line} imports {name}" for p in _modules() if _part(p) in NO_DISTRIBUTED
           for name, line in _imports(p) if name.startswith("torch.distributed")]
    assert not bad, "\n".join(bad)


def test_the_probe_catches_an_upward_import(tmp_path, monkeypatch):
    """A control: the walk finds an upward import when one is there."""
    fake = tmp_path / "longvita"
    (fake / "model").mkdir(parents=True)
    (fake / "model" / "bad.py").write_text("def f():\n    from longvita.parallel import ring_attention\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", fake)
    try:
        test_imports_point_down()
    except AssertionError as exc:
        assert "model/bad.py:2 imports longvita.parallel" in str(exc)
    else:
        raise AssertionError("the upward import was not found")


def test_kernel_families_are_modules_named_apart_from_their_functions():
    """``import longvita.kernels.attention`` gives the family's package and
    ``longvita.kernels.varlen_attention`` is the function (issue 26: a package re-exporting a
    function of its own submodule's name made ``import longvita.kernels.varlen_attention``
    return the function). No name the package exports is the name of one of its modules."""
    import importlib
    import pkgutil
    import types

    kernels = importlib.import_module("longvita.kernels")
    families = {"attention": "varlen_attention", "lm_head": "linear_cross_entropy",
                "pixel_shuffle": "pixel_shuffle_project", "lse_merge": "lse_merge_", "norm": "rms_norm",
                "rope": "apply_rope_qk", "glu": "swiglu"}
    for family, function in families.items():
        module = importlib.import_module(f"longvita.kernels.{family}")
        assert isinstance(module, types.ModuleType) and getattr(kernels, family) is module, family
        assert callable(getattr(kernels, function)) and not isinstance(getattr(kernels, function), types.ModuleType)
        assert getattr(module, function) is getattr(kernels, function), family
    submodules = {m.name for m in pkgutil.iter_modules(kernels.__path__)}
    assert submodules >= set(families)
    assert not submodules & set(kernels.__all__), submodules & set(kernels.__all__)
