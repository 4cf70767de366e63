"""Checkpoints: a directory per step, written under a temporary name and renamed once complete, described by
its meta file (read here only: `describe`).

A checkpoint holds the modules, optimizers and LR schedules as Accelerate saves them under the strategy (per-rank
files under ZeRO and FSDP), plus the state of each other part of a run as that part gives it (`state`: train
counters, data position, EMA bookkeeping), consolidated files (`ema.safetensors`, and `weights.safetensors`
where the saved state is sharded), the versions it was written under and a manifest of every file."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pickle
import platform
import shutil
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from gen_dist import dist

if TYPE_CHECKING:
    from accelerate import Accelerator

META = "meta.json"
EMA = "ema.safetensors"
WEIGHTS = "weights.safetensors"
"""Consolidated raw weights of the sampled module, written when the strategy shards the saved state."""


VERSIONED = ("torch", "accelerate", "deepspeed", "diffusers", "webdataset")
"""Packages whose state formats a checkpoint depends on; their versions are recorded in its meta file."""


def versions() -> dict[str, str]:
    """Python's version and the installed versions of VERSIONED ("absent" where one is not installed)."""
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def version_changes(saved: dict[str, str]) -> list[str]:
    """"name saved -> now" for each recorded version that differs from this environment's."""
    return [f"{k} {saved[k]} -> {v}" for k, v in versions().items() if k in saved and saved[k] != v]


def ckpt_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A directory without its meta file never finished writing."""
    root = ckpt_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / META).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, corrupt, unsafe to unpickle, or could not be written."""


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def manifest(path: Path) -> dict[str, list[int]]:
    """{relative file: [size, crc32]} of everything in a checkpoint directory but its meta file."""
    return {str(f.relative_to(path)): [f.stat().st_size, _crc32(f)]
            for f in sorted(path.rglob("*")) if f.is_file() and f.name != META}


def _safe_globals() -> list[Any]:
    """Plain-data classes that DeepSpeed pickles into its optimizer files (enums, a scaler, fragment records)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [ZeroStageEnum, LossScaler, fragment_address]


class _MetadataUnpickler(pickle.Unpickler):
    """Torch distributed checkpoint metadata (FSDP) holds dataclasses of torch.distributed.checkpoint only."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module.startswith("torch.distributed.checkpoint.")
                   or (module, name) in {("torch", "Size"), ("torch.serialization", "_get_layout"),
                                         ("pathlib", "PosixPath"), ("collections", "OrderedDict")}
                   or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if not allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def check_safe(path: Path) -> None:
    """Unpickle every pickle file of a checkpoint with an allowlist first (torch's weights_only loader, or an
    allowlisting unpickler for distributed-checkpoint metadata), so that loading it later cannot run code."""
    for f in sorted(path.rglob("*")):
        try:
            if f.suffix in (".bin", ".pt", ".pth", ".pkl"):
                with torch.serialization.safe_globals(_safe_globals()):
                    torch.load(f, map_location="cpu", weights_only=True)
            elif f.name == ".metadata":
                with open(f, "rb") as fh:
                    _MetadataUnpickler(fh).load()
        except Exception as e:
            raise CheckpointError(f"{f} is not plain tensor data ({str(e).splitlines()[0][:200]}); refusing "
                                  f"to load it") from None


@dataclass
class Description:
    """What a checkpoint's meta file says: the one reader of it (resume, launch checks, sampling, export)."""

    path: Path
    step: int
    strategy: str
    world_size: int
    modules: list[str]
    """Trained modules, in the order Accelerate saved them."""
    state: dict[str, dict[str, Any]]
    """Each part's own state: train, data, ema."""
    versions: dict[str, str]
    files: dict[str, list[int]]

    def module_file(self, name: str) -> Path:
        """Accelerate's weights file of trained module `name` (whole weights unless the strategy shards them)."""
        i = self.modules.index(name)
        return self.path / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")

    @property
    def ema_file(self) -> Path | None:
        return self.path / EMA if EMA in self.files else None

    @property
    def weights_file(self) -> Path | None:
        """Consolidated weights of the sampled module, where the saved state is sharded."""
        return self.path / WEIGHTS if WEIGHTS in self.files else None


def _state_of_flat_meta(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-part state of a checkpoint written before parts kept their own state."""
    return {"train": {"step": meta["step"], "images": meta["images"], "nonfinite": meta["nonfinite"]},
            "data": {"epoch": meta["epoch"], "batch": meta["batch"], "layout": meta["data_layout"],
                     "done": meta["data_done"]},
            "ema": {"updates": meta["ema_updates"]}}


def describe(path: Path) -> Description:
    """The description of the checkpoint in `path`; CheckpointError when its meta file is unreadable."""
    try:
        meta = json.loads((path / META).read_text())
        state = meta["state"] if "state" in meta else _state_of_flat_meta(meta)
        return Description(path, meta["step"], meta.get("strategy", "ddp"), meta["world_size"], meta["modules"],
                           state, meta.get("versions", {}), meta.get("files", {}))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path / META} is unreadable: {type(e).__name__}: {e}") from None


def verify(path: Path) -> Description:
    """The description of a complete, intact, safe checkpoint; CheckpointError naming the first problem
    otherwise."""
    desc = describe(path)
    for name, (size, crc) in desc.files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"{path}: {name} has {f.stat().st_size} bytes, {size} were written")
        if _crc32(f) != crc:
            raise CheckpointError(f"{path}: {name} is corrupt (checksum mismatch)")
    check_safe(path)
    return desc


def latest_verified(run_dir: Path) -> Description | None:
    """The newest checkpoint that verifies; broken newer ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return verify(path)
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint {path.name}: {e}", stacklevel=3)
    return None


def latest(run_dir: Path) -> Path | None:
    found = latest_verified(run_dir)
    return found.path if found else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(acc: Accelerator, run_dir: Path, step: int, strategy: str, modules: list[str],
         state: dict[str, dict[str, Any]], files: dict[str, dict[str, torch.Tensor]], keep: int,
         keep_also: str = "", save_kwargs: dict[str, Any] | None = None) -> Path:
    """Every rank writes its part of the prepared modules, optimizers and schedules; the main rank adds `files`
    (name -> consolidated tensors) and the meta file (the parts' `state`) and publishes the directory by renaming
    it. The `keep` newest checkpoints stay, and the one named `keep_also` (the best) whatever its age;
    `save_kwargs` go to the strategy's own saving (DeepSpeed's save_checkpoint)."""
    meta = {"strategy": strategy, "world_size": acc.num_processes, "modules": modules, "state": state}
    root = ckpt_root(run_dir)
    final, tmp = root / step_name(step), root / f".tmp_{step_name(step)}"
    if dist.is_main():
        for stale in root.glob(".tmp_step_*"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    error = ""
    try:
        acc.save_state(str(tmp), **(save_kwargs or {}))
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as an iostream RuntimeError
        error = f"{type(e).__name__}: {e}"
    # Agreeing on the outcome is also the barrier that puts every rank's files in `tmp` before the rename.
    error = dist.first_error(acc, error)
    if dist.is_main() and not error:
        try:
            _publish(tmp, final, step, meta, files)
            for old in list_checkpoints(run_dir)[:-keep]:
                if old.name != keep_also:
                    shutil.rmtree(old, ignore_errors=True)
        except OSError as e:  # e.g. a full disk: the previous checkpoints stay as they are
            error = f"{type(e).__name__}: {e}"
    error = dist.first_error(acc, error)
    if error:
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"checkpoint of step {step} was not written ({error}); earlier checkpoints are intact")
    return final


def _publish(tmp: Path, final: Path, step: int, meta: dict[str, Any],
             files: dict[str, dict[str, torch.Tensor]]) -> None:
    # All randomness is derived from (seed, step, ...), so Accelerate's pickled RNG states are not needed, and
    # loading them would need an unrestricted unpickler.
    for f in tmp.glob("random_states_*.pkl"):
        f.unlink()
    for name, tensors in files.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / name))
    # The meta file, with the manifest that `verify` checks, is written last.
    (tmp / META).write_text(json.dumps({"step": step, **meta, "versions": versions(),
                                             "files": manifest(tmp)}, indent=1))
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def load(acc: Accelerator, desc: Description) -> None:
    """Restore the prepared modules, optimizers and schedules in place from a verified checkpoint."""
    acc.load_state(str(desc.path))

