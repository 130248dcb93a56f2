"""Training checkpoints: the run folder's layout, atomic writes, verification, exact resume.

Layout: ``OUT/checkpoints/step-NNNNNNN/``. A checkpoint is written into
``step-NNNNNNN.tmp`` and renamed when complete, so a run killed mid-write leaves the
previous one as the newest complete checkpoint; the newest ``keep`` are kept.

Nothing read back from a checkpoint can execute code:

- tensors (model and optimizer state, the torch/CUDA/numpy RNG states as tensors) go to
  ``state.pt`` through ``torch.save`` of tensors and plain containers, and are read back
  with ``torch.load(weights_only=True)``, whose unpickler refuses anything else; under
  FSDP2 the model and optimizer are sharded ``torch.distributed.checkpoint`` (DCP) files
  instead. DCP's reader unpickles its ``.metadata`` file with plain ``pickle``, so before
  it does, every metadata file is unpickled by a restricted unpickler that knows only
  DCP's metadata classes, torch's dtypes and sizes (``_check_dcp_metadata``): a crafted
  one is refused before DCP reads it;
- everything else (step, schedule, data position, Python's RNG, the recipe, the world)
  is ``meta.json``;
- ``MANIFEST.json`` is written last: every file's size and SHA-256. ``resume`` verifies
  the newest complete checkpoint against it and falls back, with one warning naming the
  bad folder, to the newest one that verifies (a truncated, emptied or overwritten file
  is caught before anything is loaded). A checkpoint without a manifest was written by an
  older longvita that pickled Python objects: it is refused with one line saying so.

The module imports only the standard library at the top (``longvita train`` checks
``--resume`` before torch loads); torch comes in with ``save`` and ``load``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

from longvita.files import OutputError, default_file_mode, diagnose_folder

__all__ = ["CHECKPOINT_DIR", "CheckpointManager", "OutputError", "complete_checkpoints", "latest_checkpoint",
           "verify_checkpoint"]

CHECKPOINT_DIR = "checkpoints"
MANIFEST = "MANIFEST.json"
_FORMAT = 2  # 1: pickled state.pt/meta.pt (refused); 2: this module's layout
_HASH_CHUNK = 16 << 20


def _find_oserror(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``, if any: itself, a cause, or (DCP wraps each rank's error in
    its own exception type) one of its failures."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):
            todo += [f if isinstance(f, BaseException) else getattr(f, "exc", None) for f in failures.values()]
    return None


def _cannot_write(out: Path, what: str, cause) -> str:
    reason = cause.strerror or str(cause) if isinstance(cause, OSError) else cause
    return f"--out {out}: cannot write {what} ({reason})"


def _save_tensors(obj, path: Path) -> None:
    """``torch.save`` of tensors and plain containers through a Python file, so that a
    failing write raises the OSError that says why."""
    import torch

    with open(path, "wb") as f:
        torch.save(obj, f)
    os.chmod(path, default_file_mode())


# what DCP's .metadata pickle holds (torch 2.11-2.13): its metadata dataclasses, torch's
# dtypes, sizes and layouts, and the checkpoint's path
_DCP_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "BytesStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
     ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")}


def _check_dcp_metadata(folder: Path) -> None:
    """Unpickle every DCP metadata file in ``folder`` with an unpickler that refuses any
    global outside ``_DCP_GLOBALS`` (and torch's dtypes): CheckpointError if one holds
    anything else."""
    import pickle

    import torch

    from longvita.model import CheckpointError

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in _DCP_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"refused global {module}.{name}")

    for meta in sorted(folder.glob("*.metadata")):
        try:
            with open(meta, "rb") as f:
                Restricted(f).load()
        except Exception as exc:  # noqa: BLE001 - any failure is a refusal, in one line
            raise CheckpointError(f"{meta}: not a plain DCP metadata file ({str(exc).splitlines()[0]}); "
                                  "it is not unpickled") from None


def complete_checkpoints(out: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders under ``out/checkpoints``, oldest first (temp folders
    and folders without their ``COMPLETE`` marker are ignored)."""
    root = Path(out) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and not p.name.endswith(".tmp") and (p / "COMPLETE").is_file())


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``out`` (not verified: see ``verify_checkpoint``)."""
    done = complete_checkpoints(out)
    return done[-1] if done else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_HASH_CHUNK)
            if not block:
                return h.hexdigest()
            h.update(block)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, "COMPLETE"))


def verify_checkpoint(path: str | os.PathLike, names: list[str] | None = None) -> str | None:
    """What is wrong with the checkpoint folder ``path``, or None when every file matches its
    manifest (size, then SHA-256). ``names``: check only these manifest entries (ranks
    split the hashing of a large checkpoint)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        if (path / "state.pt").exists() or (path / "meta.pt").exists():
            return ("written by an older longvita that pickled Python objects into state.pt/meta.pt; it is not "
                    "loaded, since unpickling can run code (start a new run, or --out another folder)")
        return "no MANIFEST.json (not a complete checkpoint)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != _FORMAT or not isinstance(files, dict):
            return f"MANIFEST.json has format {manifest.get('format')!r}, this longvita reads {_FORMAT}"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        return f"MANIFEST.json is unreadable ({exc})"
    for name in sorted(files) if names is None else names:
        entry = files.get(name)
        f = path / name
        if not isinstance(entry, dict) or not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != entry.get("size"):
            return f"{name} has {size} bytes, the manifest says {entry.get('size')}"
        if _sha256(f) != entry.get("sha256"):
            return f"{name} does not match its checksum"
    return None


class CheckpointManager:
    """Save and restore one run's state in ``out/checkpoints`` (see the module docstring).

    model, optimizer, scheduler: the run's objects (``model`` the module FSDP2 wraps when
    ``sharded``). stream_state / load_stream_state: this rank's data position as a JSON-able
    value (each data-parallel group reads its own part of the data). run: what must match
    on resume (world size, cp, total steps: the cosine schedule depends on them).
    Every rank calls ``save`` / ``resume`` (collective when the world has several ranks)."""

    def __init__(self, out: str | os.PathLike, *, model, optimizer, scheduler,
                 stream_state: Callable[[], Any], load_stream_state: Callable[[Any], None],
                 run: dict, sharded: bool = False, keep: int = 2, group=None):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.out, self.root = Path(out), Path(out) / CHECKPOINT_DIR
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.stream_state, self.load_stream_state = stream_state, load_stream_state
        self.run, self.sharded, self.keep, self.group = dict(run), sharded, keep, group
        self.restored_step = 0  # the step of the checkpoint ``resume`` restored

    # ------------------------------------------------------------------ collectives
    def _rank_world(self) -> tuple[int, int]:
        from longvita.parallel import rank_world  # imported here: this module loads before torch

        return rank_world(self.group)

    def _gather(self, value) -> list:
        rank, world = self._rank_world()
        if world == 1:
            return [value]
        import torch.distributed as dist

        out = [None] * world
        dist.all_gather_object(out, value, group=self.group)
        return out

    def _barrier(self) -> None:
        if self._rank_world()[1] > 1:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def _agree(self, problem: str | None) -> str | None:
        """The first rank's problem, on every rank (so all raise, or none)."""
        return next((p for p in self._gather(problem) if p), None)

    # ------------------------------------------------------------------ state
    @staticmethod
    def _rng_state() -> tuple[dict, dict]:
        """(tensors, JSON) of every RNG the run draws from."""
        import random

        import numpy as np
        import torch

        version, key, gauss = random.getstate()
        np_kind, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
        tensors = {"torch": torch.get_rng_state(), "numpy_key": torch.from_numpy(np_key.astype(np.int64))}
        if torch.cuda.is_available():
            tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        meta = {"python": [version, list(key), gauss], "numpy": [np_kind, int(np_pos), int(np_has_gauss), float(np_gauss)]}
        return tensors, meta

    @staticmethod
    def _set_rng_state(tensors: dict, meta: dict) -> None:
        import random

        import numpy as np
        import torch

        version, key, gauss = meta["python"]
        random.setstate((version, tuple(key), gauss))
        kind, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((kind, tensors["numpy_key"].numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(tensors["torch"])
        cuda = [tensors[f"cuda{i}"] for i in range(len(tensors)) if f"cuda{i}" in tensors]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)

    # ------------------------------------------------------------------ save
    def save(self, step: int) -> Path:
        """Write ``step-NNNNNNN`` (temp folder, manifest, marker, rename), drop all but the
        newest ``keep``. Raises ``OutputError`` naming the folder when it cannot be written;
        the temp folder is then removed and the previous checkpoints stay as they were."""

        rank, _ = self._rank_world()
        final, tmp = self.root / f"step-{step:07d}", self.root / f"step-{step:07d}.tmp"
        problem = None
        if rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            except OSError as exc:
                problem = _cannot_write(self.out, f"checkpoint {tmp.name}", exc)
        problem = self._agree(problem)
        if problem:
            raise OutputError(problem)
        tensors_rng, meta_rng = self._rng_state()
        meta = {"format": _FORMAT, "step": step, "run": self.run, "scheduler": self.scheduler.state_dict(),
                "data": self._gather(self.stream_state()), "rng": meta_rng}
        try:
            if self.sharded:
                import torch.distributed.checkpoint as dcp
                from torch.distributed.checkpoint.state_dict import get_state_dict

                model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
                dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "dcp"))
                if rank == 0:
                    _save_tensors({"rng": tensors_rng}, tmp / "state.pt")
            elif rank == 0:
                _save_tensors({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                               "rng": tensors_rng}, tmp / "state.pt")
            if rank == 0:
                (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            cause = _find_oserror(exc) or (diagnose_folder(tmp) if isinstance(exc, Exception) else None)
            if cause is None:  # not the disk: a bug or an interrupt, with its traceback
                raise
            problem = _cannot_write(self.out, f"checkpoint {tmp.name}", cause)
        problem = self._agree(problem)
        if problem is None:
            self._barrier()  # every rank's files are on disk
            problem = self._agree(self._write_manifest(tmp, step) if rank == 0 else None)
        if problem:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise OutputError(problem)
        if rank == 0:
            self._publish(tmp, final)
            for old in complete_checkpoints(self.out)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return final

    @staticmethod
    def _publish(tmp: Path, final: Path) -> None:
        """The rename that makes a written checkpoint count (a kill before it leaves the
        temp folder, which nothing reads)."""
        if final.exists():  # a re-run of the same step: the new one replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)

    def _write_manifest(self, tmp: Path, step: int) -> str | None:
        try:
            files = {name: {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in _files(tmp)}
            (tmp / MANIFEST).write_text(json.dumps({"format": _FORMAT, "step": step, "files": files}, indent=1),
                                        encoding="utf-8")
            (tmp / "COMPLETE").write_text(f"{step}\n", encoding="utf-8")
            return None
        except OSError as exc:
            return _cannot_write(self.out, f"checkpoint {tmp.name}", exc)

    # ------------------------------------------------------------------ load
    def _verify(self, path: Path) -> str | None:
        """verify_checkpoint with the hashing split over the ranks; the same answer on all."""
        rank, world = self._rank_world()
        try:
            files = sorted(json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"])
        except (OSError, ValueError, KeyError, TypeError):
            files = None
        problem = verify_checkpoint(path, None if files is None else files[rank::world])
        return self._agree(problem)

    def resume(self, on_fallback: Callable[[str], None] | None = None) -> Path | None:
        """Restore the newest complete checkpoint that verifies; None when there is none.
        A newer one that does not verify is skipped with ``on_fallback(message)`` (default:
        a warning). Raises ``CheckpointError`` when checkpoints exist but none verifies."""
        from longvita.model import CheckpointError

        done = complete_checkpoints(self.out)
        bad = []
        for path in reversed(done):
            problem = self._verify(path)
            if problem is None:
                if bad:
                    message = f"checkpoint {bad[-1][0]} is unusable ({bad[-1][1]}); resuming from {path.name}"
                    (on_fallback or (lambda m: warnings.warn(m, RuntimeWarning, stacklevel=3)))(message)
                self.restored_step = self.load(path)
                return path
            bad.append((path, problem))
        if bad:
            raise CheckpointError(f"no usable checkpoint under {self.root}: {bad[0][0].name}: {bad[0][1]}"
                                  + (f" (and {len(bad) - 1} older)" if len(bad) > 1 else ""))
        return None

    def load(self, path: str | os.PathLike) -> int:
        """Restore the state of checkpoint folder ``path`` (verified or not); returns its step."""
        import torch

        from longvita.model import CheckpointError

        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: meta.json is unreadable ({exc})") from None
        if meta.get("format") != _FORMAT:
            raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, this longvita reads {_FORMAT}")
        for key in ("world", "cp", "ulysses"):
            if meta["run"].get(key, 1) != self.run.get(key, 1):
                old, new = meta["run"], self.run
                raise CheckpointError(f"{path}: written by {old.get('world')} ranks with cp {old.get('cp')}, ulysses "
                                      f"{old.get('ulysses', 1)}; resume with the same (here: {new.get('world')} ranks, "
                                      f"cp {new.get('cp')}, ulysses {new.get('ulysses', 1)})")
        if meta["run"].get("steps") != self.run.get("steps"):
            # the schedule is a function of the total: a different total would change it
            raise CheckpointError(f"{path}: the run was started with {meta['run'].get('steps')} steps, not "
                                  f"{self.run.get('steps')} (the cosine schedule depends on the total)")
        is_dcp = (path / "dcp").is_dir()
        if is_dcp != self.sharded:
            kind = "a sharded (FSDP)" if is_dcp else "an unsharded"
            raise CheckpointError(f"{path}: {kind} checkpoint; resume it with the same ranks and --cp")
        try:
            state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - an unpickling refusal or a corrupt file: one line either way
            raise CheckpointError(f"{path / 'state.pt'}: not loadable as plain tensors ({str(exc).splitlines()[0]})") from None
        if is_dcp:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            _check_dcp_metadata(path / "dcp")  # before DCP's reader unpickles it
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
            sd = {"model": model_sd, "optimizer": optim_sd}
            dcp.load(sd, checkpoint_id=str(path / "dcp"))
            set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(meta["scheduler"])
        rank, world = self._rank_world()
        data = meta["data"]
        if len(data) != world:
            raise CheckpointError(f"{path}: holds the data position of {len(data)} ranks, here are {world}")
        self.load_stream_state(data[rank])
        self._set_rng_state(state["rng"], meta["rng"])
        return int(meta["step"])
