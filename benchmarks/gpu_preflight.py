"""Checks that a machine can run benchmarks/gpu_session.sh, before device time is spent.

    python benchmarks/gpu_preflight.py deps [--strict]   # before installing longvita
    python benchmarks/gpu_preflight.py installed         # after installing it
    python benchmarks/gpu_preflight.py generate [--device cuda]   # prefill time, no torch._dynamo

``deps``: every third-party module the session imports (the package's own dependencies,
pytest and its plugins, transformers for the checkpoint tests) and the build tools
(a C++ compiler, ninja; nvcc when torch is a CUDA build) are there; the optional ones
(PyAV, flash-attn, baselines) are listed. The package's own requirements
(pyproject.toml) are compared with the installed versions: a mismatch is a warning on
the GPU machine (the session installs with ``--no-deps``, so nothing is downgraded) and
an error with ``--strict`` (the CPU rehearsal in CI, whose environment is shaped like
the lent machine's: a requirement that machine cannot meet fails there first).

``installed``: with PyAV blocked (``sys.modules['av'] = None``, so the check holds where
PyAV is installed too), every ``longvita`` module and every benchmark script imports;
the native extension is built (with its CUDA kernels when torch is a CUDA build and
nvcc exists).

``generate``: ``longvita generate`` twice in this process (the embedded default model, 8 new
tokens; the first call compiles the Triton kernels, the second finds them loaded), one
JSON line with both calls' load / prefill / decode seconds, and a failure if the eager
path imported ``torch._dynamo`` (4.75 s of an 82-token prefill on an H100 on 2026-11-25,
before the custom ops were kept for torch.compile only).

Every problem is listed, then the exit status is 1 if there was any. Standard library
only before the imports it checks, so it runs on a bare interpreter.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.metadata
import importlib.util
import os
import pkgutil
import shutil
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# module -> what needs it (the session fails without any of these)
REQUIRED = {
    "torch": "everything",
    "triton": "the Triton kernels",
    "numpy": "longvita.data, the tests",
    "safetensors": "checkpoint I/O",
    "tokenizers": "the tokenizer",
    "PIL": "image loading (pillow)",
    "tqdm": "progress bars",
    "setuptools": "building the native extension (pip install --no-build-isolation)",
    "pytest": "the tests",
    "pytest_benchmark": "the benchmarks' pytest mode (pytest-benchmark)",
    "xdist": "parallel tests (pytest-xdist)",
    "transformers": "the checkpoint tests' peer model",
}
# module -> what happens without it (the session goes on)
OPTIONAL = {
    "av": "video tests skip (PyAV; pip install 'longvita[video]')",
    "flash_attn": "the attention benchmark has no flash-attn baseline",
    "liger_kernel": "the LM-head benchmark has no Liger baseline",
    "cut_cross_entropy": "the LM-head benchmark has no cut-cross-entropy baseline",
}


class Report:
    def __init__(self):
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def ok(self, msg: str):
        print(f"  ok       {msg}")

    def warn(self, msg: str):
        self.warnings.append(msg)
        print(f"  warning  {msg}")

    def error(self, msg: str):
        self.errors.append(msg)
        print(f"  MISSING  {msg}" if msg.startswith("module ") or msg.startswith("tool ") else f"  ERROR    {msg}")

    def finish(self, what: str) -> int:
        if self.errors:
            print(f"\n{what}: {len(self.errors)} problem(s):", file=sys.stderr)
            for e in self.errors:
                print(f"  - {e}", file=sys.stderr)
            return 1
        print(f"\n{what}: ok ({len(self.warnings)} warning(s))")
        return 0


def _version(module) -> str:
    return str(getattr(module, "__version__", "?"))


def _requirement_parser():
    try:
        from packaging.markers import default_environment  # noqa: F401
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors packaging; the image always has pip
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def _project_requirements(path: str) -> list[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    with open(path, "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def check_requirements(rep: Report, strict: bool, pyproject: str) -> None:
    """The package's own requirements against what is installed (pip --no-deps skips this)."""
    Requirement = _requirement_parser()
    for spec in _project_requirements(pyproject):
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            have = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            rep.error(f"requirement {spec!r}: {req.name} is not installed")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            msg = (f"requirement {spec!r} (pyproject.toml) is not met: {req.name} {have} is installed"
                   + ("" if strict else "; the session installs with --no-deps and goes on"))
            (rep.error if strict else rep.warn)(msg)
        else:
            rep.ok(f"requirement {spec!r}: {req.name} {have}")


def check_deps(strict: bool, pyproject: str) -> int:
    rep = Report()
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    for mod, why in REQUIRED.items():
        if mod == "triton" and not sys.platform.startswith("linux"):
            continue
        try:
            m = importlib.import_module(mod)
        except Exception as exc:  # noqa: BLE001 - a broken install counts as missing
            rep.error(f"module {mod} ({why}): {type(exc).__name__}: {exc}")
        else:
            rep.ok(f"{mod} {_version(m)}")
    for mod, without in OPTIONAL.items():
        if importlib.util.find_spec(mod) is None:
            print(f"  optional {mod} not installed: {without}")
        else:
            print(f"  optional {mod} installed")

    cuda_torch = None
    try:
        import torch

        cuda_torch = torch.version.cuda
    except Exception:  # noqa: BLE001 - reported above
        pass
    if not (shutil.which("c++") or shutil.which("g++") or os.environ.get("CXX")):
        rep.error("tool c++ (building the native extension): no C++ compiler on PATH")
    else:
        rep.ok("C++ compiler")
    if shutil.which("ninja") is None:
        rep.error("tool ninja (torch's extension builder): not on PATH (pip install ninja)")
    else:
        rep.ok("ninja")
    if cuda_torch:
        cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or ""
        nvcc = shutil.which("nvcc") or (cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")))
        if nvcc:
            rep.ok(f"nvcc (torch built with CUDA {cuda_torch})")
        else:
            rep.warn(f"no nvcc (torch built with CUDA {cuda_torch}): the CUDA C++ kernels will not be built, "
                     "Triton's are still tested and measured")
    check_requirements(rep, strict, pyproject)
    return rep.finish("dependencies")


def _import_blocking_av(name: str, loader):
    """Import with PyAV blocked, so a module importing it at import time fails here too."""
    saved = sys.modules.get("av", "<absent>")
    sys.modules["av"] = None  # type: ignore[assignment]  (import av -> ImportError)
    try:
        return loader()
    finally:
        if saved == "<absent>":
            sys.modules.pop("av", None)
        else:
            sys.modules["av"] = saved


def _explain(exc: BaseException) -> str:
    msg = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ImportError) and exc.name == "av":
        msg += " (PyAV is optional: import it inside the function that decodes video)"
    where = traceback.extract_tb(exc.__traceback__)
    inner = [f for f in where if "importlib" not in f.filename]
    if inner:
        f = inner[-1]
        msg += f" [at {os.path.relpath(f.filename)}:{f.lineno}]"
    return msg


def _module_names(paths: list[str], prefix: str) -> list[str]:
    """Every module of a package from its files, importing nothing (pkgutil.walk_packages
    imports the subpackages, and one that fails would stop the walk)."""
    names = []
    for m in pkgutil.iter_modules(paths):
        names.append(prefix + m.name)
        if m.ispkg:
            names += _module_names([os.path.join(p, m.name) for p in paths if os.path.isdir(os.path.join(p, m.name))],
                                   prefix + m.name + ".")
    return sorted(names)


def check_installed(bench_dir: str, require: list[str]) -> int:
    rep = Report()
    for mod in require:  # extra modules a caller needs (also how the tests inject a failure)
        try:
            _import_blocking_av(mod, lambda m=mod: importlib.import_module(m))
            rep.ok(f"{mod}")
        except Exception as exc:  # noqa: BLE001
            rep.error(f"module {mod}: {_explain(exc)}")
    try:
        import torch  # noqa: F401  (first: longvita._C links against libtorch, which this loads)
        import longvita
    except Exception as exc:  # noqa: BLE001
        rep.error(f"import longvita: {_explain(exc)}")
        return rep.finish("installed package")
    print(f"longvita {longvita.__version__} from {os.path.dirname(longvita.__file__)}")
    names = [n for n in _module_names(list(longvita.__path__), "longvita.") if n != "longvita.__main__"]  # __main__ runs the CLI
    good = 0
    for name in names:
        try:
            _import_blocking_av(name, lambda n=name: importlib.import_module(n))
            good += 1
        except Exception as exc:  # noqa: BLE001
            rep.error(f"{name} does not import without PyAV: {_explain(exc)}")
    rep.ok(f"{good} of {len(names)} longvita modules import without PyAV")

    sys.path.insert(0, bench_dir)  # the scripts import `common` and `make_results` as top-level modules
    imported: list[str] = []
    scripts = sorted(f for f in os.listdir(bench_dir) if f.endswith(".py") and f not in ("conftest.py", "gpu_preflight.py"))
    for fname in scripts:
        path = os.path.join(bench_dir, fname)
        modname = f"_preflight_{fname[:-3]}"

        def load(path=path, modname=modname):
            spec = importlib.util.spec_from_file_location(modname, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[modname] = module  # dataclasses look their module up there
            spec.loader.exec_module(module)  # the scripts guard main() with __name__
            return module

        try:
            _import_blocking_av(fname, load)
        except Exception as exc:  # noqa: BLE001
            sys.modules.pop(modname, None)
            rep.error(f"benchmark script {fname} does not import: {_explain(exc)}")
        else:
            imported.append(fname)
    rep.ok(f"{len(imported)} of {len(scripts)} benchmark scripts import ({', '.join(imported)})")

    import torch

    from longvita._ext import native, native_has_cuda, native_links_shared_libstdcxx, native_status

    if native_links_shared_libstdcxx() is False:
        rep.error("native extension links libstdc++ statically: its error messages would crash the process "
                  "(setup.py links the libstdc++ that torch loaded; see its _torch_libstdcxx)")
    if native() is None:
        rep.error(f"native extension longvita._C: {native_status()}")
    elif (torch.version.cuda and shutil.which("nvcc") and not native_has_cuda()
          and os.environ.get("LONGVITA_SKIP_CUDA") != "1"):  # skipped on purpose: fine
        rep.error(f"native extension built without its CUDA kernels although torch has CUDA {torch.version.cuda} "
                  f"and nvcc exists: {native_status()}")
    else:
        rep.ok(f"native extension {native_status()}")
    return rep.finish("installed package")


class _ImportWitness(importlib.abc.MetaPathFinder):
    """Records the longvita frames of the stack that first imports ``name``."""

    def __init__(self, name: str):
        self.name, self.frames = name, None

    def find_spec(self, fullname, path, target=None):
        if fullname == self.name and self.frames is None:
            self.frames = [f"{os.path.relpath(f.filename, ROOT)}:{f.lineno} {f.name}"
                           for f in traceback.extract_stack() if os.sep + "longvita" + os.sep in f.filename]
        return None  # the normal finders import it


def check_generate(device: str, dtype: str) -> int:
    import contextlib
    import io
    import json

    witness = _ImportWitness("torch._dynamo")
    sys.meta_path.insert(0, witness)
    from longvita import cli

    runs = []
    for _ in range(2):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = cli.main(["generate", "--device", device, "--dtype", dtype, "--max-new-tokens", "8", "--json"])
        if rc:
            print(buf.getvalue(), file=sys.stderr)
            print(f"generate on {device}: exit status {rc}", file=sys.stderr)
            return 1
        out = json.loads(buf.getvalue().strip().splitlines()[-1])
        runs.append({k: out[k] for k in ("load_s", "inputs_s", "prefill_s", "decode_s") if k in out})
    sys.meta_path.remove(witness)
    frames = witness.frames or []
    # the kernels' eager path must not import it (the custom ops are for torch.compile only);
    # an import from model construction (nn.init under torch.device('meta') goes through
    # torch._refs, whose decorator imports torch._dynamo) is reported, not failed: it is the
    # model's loading, not the prefill
    from_kernels = any("longvita/kernels/" in f.replace(os.sep, "/") for f in frames)
    print(json.dumps({"generate": device, "dtype": dtype, "cold": runs[0], "warm": runs[1],
                      "dynamo_imported": witness.frames is not None, "dynamo_imported_by": frames[-3:]}))
    if from_kernels:
        print("a kernel's eager path imported torch._dynamo (seconds of every first call): " + " <- ".join(frames[::-1]),
              file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("deps", help="before installing: modules, build tools, requirement versions")
    d.add_argument("--strict", action="store_true", help="a pyproject requirement the environment does not meet is an error")
    d.add_argument("--pyproject", default=os.path.join(ROOT, "pyproject.toml"), help="whose requirements to check")
    i = sub.add_parser("installed", help="after installing: every module and benchmark script imports without PyAV")
    i.add_argument("--bench-dir", default=HERE, help="folder of benchmark scripts to import (default: this one)")
    i.add_argument("--require", action="append", default=[], metavar="MODULE", help="another module that must import")
    g = sub.add_parser("generate", help="longvita generate twice: prefill seconds, and no torch._dynamo import")
    g.add_argument("--device", default="cuda")
    g.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    if args.what == "generate":
        return check_generate(args.device, args.dtype)
    if args.what == "deps":
        return check_deps(args.strict, args.pyproject)
    return check_installed(args.bench_dir, args.require)


if __name__ == "__main__":
    sys.exit(main())
