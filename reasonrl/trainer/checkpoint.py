"""Checkpoints of the trainer and bit-exact resume (docs/trainer.md section 7.1).

A checkpoint is a folder ``<log.out_dir>/checkpoints/step-NNNNNN/``:

==========================  ================================================================================
``model.safetensors``       the policy (``save_pretrained``; sharded files + index for large models), with
                            ``config.json`` and ``generation_config.json``; the tokenizer's files
``optimizer.pt``            ``{"optimizer": AdamW.state_dict(), "scheduler": LambdaLR.state_dict()}``
``rng_state.pt``            torch CPU generator, every CUDA generator (when CUDA is initialised), Python
                            ``random``, NumPy's global ``RandomState``
``rewards.pt``              ``{reward name: reward.state_dict()}`` of the rewards that have one (R3: its step
                            counter and its lagged reward-policy copy; LASER: its length monitor)
``backend.pt``              ``backend.state_dict()`` of the rollout backend, when it has one
``trainer_state.json``      step, data cursor, the R3 filter's kept set (dataset positions), the adaptive
                            entropy controller, fingerprints of the dataset and of the frozen reference
                            model, the metrics history
``config.yaml``             the run's configuration
``manifest.json``           written last: format, step and the size + SHA-256 of every other file
==========================  ================================================================================

Writing is atomic: everything goes into ``.tmp-step-NNNNNN-<pid>/``, every file is fsync-ed, the manifest is
written and fsync-ed, the folder is fsync-ed and renamed to its final name, and the parent folder is fsync-ed.
A folder named ``step-*`` therefore either holds a complete checkpoint or was damaged afterwards (a truncated
or edited file, a disk error): :func:`verify_checkpoint` compares every file with the manifest, and resuming
from ``"latest"`` skips a damaged checkpoint with a :class:`CheckpointWarning` and falls back to the previous
one.

Determinism: the rollout seeds are ``cfg.seed * 1_000_003 + step`` (rollouts) and ``cfg.seed + 7919 * (step +
1)`` (R3 filter rounds), functions of the step counter that the checkpoint restores, and the global RNG
states are restored last, after the trainer is built. Resuming then gives the same parameters, bit for bit,
as the uninterrupted run on the same machine with the same thread count (docs/trainer.md 7.1 lists what is
not covered).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "CheckpointWarning",
    "FORMAT_VERSION",
    "MANIFEST",
    "write_checkpoint",
    "verify_checkpoint",
    "list_checkpoints",
    "find_latest",
    "resume_trainer",
    "capture_rng_state",
    "restore_rng_state",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
RNG_STATE = "rng_state.pt"
REWARDS = "rewards.pt"
BACKEND = "backend.pt"
REQUIRED = (TRAINER_STATE, OPTIMIZER, RNG_STATE, "config.yaml")
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Leftovers of a writer that died: its temporary folder, or the previous checkpoint of the same step that it
# was replacing (`.old-...`, only between two renames).
_LEFTOVER = re.compile(r"^\.(?:tmp|old)-step-\d+-(\d+)$")
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, damaged or does not fit the trainer; the message says which and why."""


class CheckpointWarning(UserWarning):
    """A damaged or incomplete checkpoint was skipped, or the configuration differs from the checkpoint's."""


# ----------------------------------------------------------------------------------------------------------
# Durable files
# ----------------------------------------------------------------------------------------------------------


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """fsync of a directory makes its entries (new names, renames) durable; not every platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def step_name(step: int) -> str:
    return f"step-{step:06d}"


# ----------------------------------------------------------------------------------------------------------
# RNG states
# ----------------------------------------------------------------------------------------------------------


def capture_rng_state() -> dict:
    """Every global generator a step can draw from: torch CPU, each CUDA device (only when CUDA is already
    initialised: querying it would otherwise create a context), Python ``random``, NumPy's ``RandomState``.
    Plain containers and tensors only, so that ``torch.load(weights_only=True)`` reads it."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "cuda": None, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        state["numpy"] = None
    else:
        kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
        state["numpy"] = {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),  # uint32 words, widened for torch
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        }
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`. CUDA states are restored when both the checkpoint and this
    process have them (a CPU checkpoint resumed on a GPU machine keeps its fresh CUDA seeds)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        saved, count = state["cuda"], torch.cuda.device_count()
        if len(saved) != count:
            warnings.warn(
                f"the checkpoint has {len(saved)} CUDA RNG states, this process sees {count} devices: "
                f"restoring the first {min(len(saved), count)}",
                CheckpointWarning,
                stacklevel=3,
            )
        for i, s in enumerate(saved[:count]):
            torch.cuda.set_rng_state(s, i)
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("numpy") is not None:
        import numpy as np

        n = state["numpy"]
        np.random.set_state(
            (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
        )


# ----------------------------------------------------------------------------------------------------------
# What the trainer holds
# ----------------------------------------------------------------------------------------------------------


def tensor_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes, bytes). Used for the frozen reference model, which
    is not saved (it is the initial policy, rebuilt identically by a new Trainer) but must match."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dataset_fingerprint(items) -> str:
    """SHA-256 of the prompts and references, in order: a resume with a different dataset (where the saved
    cursor and filter positions mean other prompts) is reported."""
    h = hashlib.sha256()
    for it in items:
        h.update(repr((it.get("prompt"), it.get("reference"))).encode())
        h.update(b"\x00")
    return h.hexdigest()


def _reference_fingerprint(trainer) -> str | None:
    if trainer.ref_model is None:
        return None
    if trainer._ref_fingerprint is None:  # the reference is frozen: hash it once per Trainer
        trainer._ref_fingerprint = tensor_fingerprint(trainer.ref_model)
    return trainer._ref_fingerprint


def _filter_positions(trainer) -> list[int] | None:
    """The R3 filter's kept set as positions in ``trainer.dataset`` (its items are the dataset's objects)."""
    if trainer._filter_set is None:
        return None
    where = {id(it): i for i, it in enumerate(trainer.dataset)}
    out = []
    for it in trainer._filter_set:
        if id(it) not in where:
            raise CheckpointError(
                "save_checkpoint: an item of the R3 filter's kept set is not an item of trainer.dataset "
                f"({it!r:.80}); the kept set is saved as dataset positions"
            )
        out.append(where[id(it)])
    return out


def _trainer_state(trainer) -> dict:
    return {
        "format": FORMAT_VERSION,
        "step": trainer.step_count,
        "cursor": trainer._cursor,
        "filter_set": _filter_positions(trainer),
        "entropy_controller": None if trainer.entropy_ctl is None else trainer.entropy_ctl.state_dict(),
        "dataset_size": len(trainer.dataset),
        "dataset_sha256": dataset_fingerprint(trainer.dataset),
        "reference_model_sha256": _reference_fingerprint(trainer),
        "rewards": [name for name, _, _ in trainer.rewards],
        # Python's json writes NaN / Infinity and reads them back: the history keeps its exact values.
        "history": trainer.history,
    }


def _stateful(obj) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


def list_checkpoints(root: Path) -> list[Path]:
    """The ``step-NNNNNN`` folders under ``root``, oldest first (complete or not: see verify_checkpoint)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def write_checkpoint(
    trainer, *, model_state: dict | None = None, optimizer_state: dict | None = None
) -> Path:
    """Write the trainer's complete state to ``<out_dir>/checkpoints/step-NNNNNN`` atomically (module
    docstring) and remove the oldest checkpoints beyond ``log.save_total_limit``. A checkpoint of the same
    step (the end-of-run save after a periodic one) is replaced: the old folder is renamed aside, the new
    one renamed in, then the old one removed. ``model_state`` / ``optimizer_state``: full state dicts to
    write instead of the modules' own (FSDP2 gathers them on rank 0, which alone calls this)."""
    root = Path(trainer.out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = step_name(trainer.step_count)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        trainer.model.save_pretrained(tmp, safe_serialization=True, state_dict=model_state)
        trainer.tokenizer.save_pretrained(tmp)
        optim = trainer.optimizer.state_dict() if optimizer_state is None else optimizer_state
        torch.save({"optimizer": optim, "scheduler": trainer.scheduler.state_dict()}, tmp / OPTIMIZER)
        torch.save(capture_rng_state(), tmp / RNG_STATE)
        rewards = {n: fn.state_dict() for n, fn, _ in trainer.rewards if _stateful(fn)}
        if rewards:
            torch.save(rewards, tmp / REWARDS)
        if _stateful(trainer.backend):
            torch.save(trainer.backend.state_dict(), tmp / BACKEND)
        (tmp / TRAINER_STATE).write_text(json.dumps(_trainer_state(trainer), indent=1) + "\n")
        from reasonrl.trainer.config import config_to_yaml

        (tmp / "config.yaml").write_text(config_to_yaml(trainer.config))
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                _fsync_file(p)
                files[p.relative_to(tmp).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(p)}
        for d in sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True):
            _fsync_dir(d)
        manifest = {"format": FORMAT_VERSION, "step": trainer.step_count, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _fsync_file(tmp / MANIFEST)
        _fsync_dir(tmp)
        old = None
        if final.exists():
            old = root / f".old-{name}-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    limit = max(1, int(trainer.config.log.save_total_limit))
    done = list_checkpoints(root)
    for p in done[:-limit]:
        if p != final:
            shutil.rmtree(p, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


def verify_checkpoint(path: Path) -> dict:
    """The manifest of a complete, undamaged checkpoint. Every file it lists must exist with its size and
    SHA-256; the trainer's state files must be among them.

    Raises:
        CheckpointError: no manifest (the writer stopped before the end, or the folder predates manifests),
            an unreadable manifest, a missing, truncated or altered file.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (an incomplete checkpoint)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        fmt = manifest["format"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable {MANIFEST} ({type(exc).__name__}: {exc})") from None
    if fmt != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {fmt}, this reasonrl reads format {FORMAT_VERSION}")
    missing = [f for f in REQUIRED if f not in files]
    if missing:
        raise CheckpointError(f"{path}: the manifest lists no {', '.join(missing)}")
    for rel, entry in files.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{path}: {rel} is missing")
        size = f.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(
                f"{path}: {rel} has {size} bytes, the manifest says {entry['size']} (truncated or altered)"
            )
        if _sha256(f) != entry["sha256"]:
            raise CheckpointError(f"{path}: {rel} does not match its SHA-256 in the manifest (corrupted)")
    return manifest


def find_latest(root: Path, *, warn: bool = True) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint under ``root`` that passes :func:`verify_checkpoint`, and the newer ones that did
    not (path, reason), each reported with a :class:`CheckpointWarning` when ``warn``."""
    skipped = []
    for p in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(p)
        except CheckpointError as exc:
            skipped.append((p, str(exc)))
            if warn:
                warnings.warn(f"skipping damaged checkpoint {exc}", CheckpointWarning, stacklevel=3)
            continue
        return p, skipped
    return None, skipped


def _is_checkpoint(p: Path) -> bool:
    return bool(_STEP_DIR.match(p.name)) or (p / MANIFEST).exists()


def _root(trainer, where: str | os.PathLike) -> Path:
    """The checkpoints folder that ``where`` (``"latest"``, a run, checkpoints or checkpoint folder) is in."""
    if str(where) == "latest":
        return Path(trainer.out_dir) / "checkpoints"
    p = Path(where)
    if _is_checkpoint(p):
        return p.parent
    return p / "checkpoints" if (p / "checkpoints").is_dir() else p


def _resolve(trainer, where: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the checkpoint to use or None, the damaged newer ones skipped). An explicitly named checkpoint must be
    intact: no silent fallback."""
    p = Path(where)
    if str(where) != "latest" and _is_checkpoint(p):
        verify_checkpoint(p)
        return p, []
    root = _root(trainer, where)
    if str(where) != "latest" and not root.is_dir():
        raise CheckpointError(f"resume: {p} is neither a checkpoint, a checkpoints folder nor a run folder")
    return find_latest(root)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: an existence check, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_leftovers(root: Path) -> None:
    """Remove the temporary folders of writers that died (their process is gone); put back a checkpoint that
    a dead writer had renamed aside to replace it and never replaced."""
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        m = _LEFTOVER.match(p.name)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        if p.name.startswith(".old-"):
            final = root / p.name[len(".old-") :].rsplit("-", 1)[0]
            if not final.exists():
                os.rename(p, final)
                continue
        shutil.rmtree(p, ignore_errors=True)


def _load_model(model: torch.nn.Module, path: Path) -> None:
    """The policy's parameters and buffers from ``save_pretrained``'s safetensors (one file or shards), copied
    in place so that the optimiser, the fused loss and the rollout backend keep their references."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors (or sharded index)")
    state: dict[str, torch.Tensor] = {}
    for s in shards:
        state.update(load_file(str(path / s)))
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise CheckpointError(
            f"{path}: the saved model has parameters this model lacks ({', '.join(unexpected[:5])}): a "
            "different architecture"
        )
    bad = [k for k in state if state[k].shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{path}: shape mismatch for {', '.join(bad[:5])}: a different model size")
    result = model.load_state_dict(state, strict=False)
    # Tied parameters (an lm_head tied to the embeddings) are saved once: a missing key is fine when it shares
    # its storage with a loaded one.
    loaded = {own[k].data_ptr() for k in state}
    untied = [k for k in result.missing_keys if own[k].data_ptr() not in loaded]
    if untied:
        raise CheckpointError(f"{path}: the saved model lacks {', '.join(untied[:5])}")


def _flat(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    if isinstance(d, list):
        out = {}
        for i, v in enumerate(d):
            out.update(_flat(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: d}


def _config_diff(saved_yaml: str, current_yaml: str) -> list[str]:
    """Dotted keys whose values differ between two configurations."""
    import yaml

    a, b = _flat(yaml.safe_load(saved_yaml) or {}), _flat(yaml.safe_load(current_yaml) or {})
    missing = object()
    # `log.*` (output folder, checkpoint cadence, progress bar) and `resume` do not change the numbers.
    keys = (k for k in a.keys() | b.keys() if k != "resume" and not k.startswith("log."))
    return sorted(k for k in keys if a.get(k, missing) != b.get(k, missing))


def _rewrite_metrics(trainer) -> None:
    """``metrics.jsonl`` = the checkpoint's history: records a killed run wrote after its last checkpoint
    are dropped, so that the resumed run continues the file without duplicates."""
    from reasonrl.trainer.metrics import _clean

    out = Path(trainer.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "metrics.jsonl"
    tmp = out / f".metrics.jsonl.tmp-{os.getpid()}"
    tmp.write_text("".join(json.dumps({k: _clean(v) for k, v in r.items()}) + "\n" for r in trainer.history))
    os.replace(tmp, path)


def load_checkpoint(trainer, path: Path, *, verified: bool = False, rewrite_metrics: bool = True) -> None:
    """Restore the trainer's complete state from the checkpoint at ``path`` (see the module docstring).
    Everything is checked before anything is changed: a checkpoint that does not fit the trainer (other
    rewards, another reference model, entropy control switched) raises :class:`CheckpointError` and leaves
    the trainer as it was. A different configuration or dataset only warns."""
    from reasonrl.trainer.config import config_to_yaml

    path = Path(path)
    if not verified:
        verify_checkpoint(path)
    state = json.loads((path / TRAINER_STATE).read_text())
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: trainer-state format {state.get('format')}, expected {FORMAT_VERSION}"
        )
    names = [n for n, _, _ in trainer.rewards]
    if state["rewards"] != names:
        raise CheckpointError(
            f"{path}: the checkpoint's rewards are {state['rewards']}, the trainer's {names}"
        )
    if (state["entropy_controller"] is None) != (trainer.entropy_ctl is None):
        on = "on" if trainer.entropy_ctl is not None else "off"
        raise CheckpointError(f"{path}: entropy_control.enabled differs (this trainer: {on})")
    if state["reference_model_sha256"] != _reference_fingerprint(trainer):
        raise CheckpointError(
            f"{path}: the frozen reference model differs from the run's (it is not saved: a new Trainer "
            "copies it from the initial policy). Build the Trainer from the same initial model as the run, "
            "not from a trained one; resume() loads the checkpoint's weights into the policy"
        )
    reward_state = (
        torch.load(path / REWARDS, map_location="cpu", weights_only=True)
        if (path / REWARDS).is_file()
        else {}
    )
    stateful = [n for n, fn, _ in trainer.rewards if _stateful(fn)]
    if sorted(reward_state) != sorted(stateful):
        raise CheckpointError(
            f"{path}: saved reward states {sorted(reward_state)}, this trainer's stateful "
            f"rewards {sorted(stateful)}"
        )
    if (path / BACKEND).is_file() != _stateful(trainer.backend):
        why = (
            "is saved but this backend has no load_state_dict" if (path / BACKEND).is_file() else "is missing"
        )
        raise CheckpointError(f"{path}: the rollout backend's state {why}")
    positions = state["filter_set"]
    if positions is not None and any(not 0 <= i < len(trainer.dataset) for i in positions):
        raise CheckpointError(
            f"{path}: the R3 filter set refers to dataset positions beyond the dataset's "
            f"{len(trainer.dataset)} items"
        )
    if state["dataset_size"] != len(trainer.dataset) or state["dataset_sha256"] != dataset_fingerprint(
        trainer.dataset
    ):
        warnings.warn(
            f"{path}: the dataset differs from the run's ({state['dataset_size']} items then, "
            f"{len(trainer.dataset)} now): the data cursor continues over the new one",
            CheckpointWarning,
            stacklevel=3,
        )
    diff = _config_diff((path / "config.yaml").read_text(), config_to_yaml(trainer.config))
    if diff:
        warnings.warn(
            f"{path}: the configuration differs from the checkpoint's in {', '.join(diff)}; the "
            "run continues with the current one (bit-identical continuation needs the same)",
            CheckpointWarning,
            stacklevel=3,
        )
    optim = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)
    rng = torch.load(path / RNG_STATE, map_location="cpu", weights_only=True)
    backend_state = (
        torch.load(path / BACKEND, map_location="cpu", weights_only=True)
        if (path / BACKEND).is_file()
        else None
    )

    _load_model(trainer.model, path)
    trainer.optimizer.load_state_dict(optim["optimizer"])
    trainer.scheduler.load_state_dict(optim["scheduler"])
    for n, fn, _ in trainer.rewards:
        if n in reward_state:
            fn.load_state_dict(reward_state[n])
    if trainer.entropy_ctl is not None:
        trainer.entropy_ctl.load_state_dict(state["entropy_controller"])
    trainer.step_count = int(state["step"])
    trainer._cursor = int(state["cursor"])
    trainer._filter_set = None if positions is None else [trainer.dataset[i] for i in positions]
    trainer.history = list(state["history"])
    trainer.last_record = None
    if backend_state is not None:
        trainer.backend.load_state_dict(backend_state)
    trainer.backend.sync_weights(trainer.model)  # an engine with its own weights gets the restored ones
    trainer.last_checkpoint = path
    trainer._resumed_from = path
    if rewrite_metrics:  # distributed: rank 0 alone writes files
        _rewrite_metrics(trainer)
    restore_rng_state(rng)  # last: nothing above may draw from the restored generators


def resume_trainer(trainer, where: str | os.PathLike = "latest") -> Path | None:
    """``Trainer.resume``: restore from ``where`` (``"latest"``: the newest intact checkpoint under
    ``log.out_dir``; a run folder or checkpoints folder: its newest intact one; a checkpoint folder: that
    one, which must be intact). Returns the checkpoint used, or None when ``"latest"`` finds none (the run
    starts at step 0). Damaged checkpoints newer than the one used are renamed ``.corrupt-step-NNNNNN`` (kept
    for inspection, out of the rotation) after a :class:`CheckpointWarning`."""
    dist = getattr(trainer, "dist", None)
    if dist is not None and dist.enabled:
        return _resume_distributed(trainer, where)
    root = _root(trainer, where)
    _clean_leftovers(root)  # first: a checkpoint a dead writer had renamed aside is put back
    path, skipped = _resolve(trainer, where)
    if path is None:
        if str(where) != "latest":
            raise CheckpointError(
                f"resume: no intact checkpoint under {root}"
                + "".join(f"\n  {p.name}: {why}" for p, why in skipped)
            )
        if skipped:
            warnings.warn(
                f"resume: no intact checkpoint under {root}; starting at step 0",
                CheckpointWarning,
                stacklevel=2,
            )
        return None
    load_checkpoint(trainer, path, verified=True)
    for p, _ in skipped:
        if p.parent == root and p.exists():
            aside = root / f".corrupt-{p.name}-{os.getpid()}"
            try:
                os.rename(p, aside)
            except OSError:
                continue
    return path


def _resume_distributed(trainer, where: str | os.PathLike) -> Path | None:
    """DDP: rank 0 chooses the checkpoint (cleaning leftovers and setting damaged ones aside, alone) and
    every rank loads that one, so all ranks continue from the same state. The checkpoint holds rank 0's RNG
    state, which every rank restores (rollouts are seeded per step and prompt, docs/trainer.md section 10,
    so the ranks need no streams of their own). FSDP2 is refused: the checkpoint's full state dicts would
    have to be scattered into the shards (``set_state_dict``), which is not implemented yet."""
    import torch.distributed as tdist

    dist = trainer.dist
    if dist.fsdp:
        raise CheckpointError(
            "resume: resuming under distributed.mode=fsdp2 is not supported yet (the checkpoint holds full "
            "state dicts; loading them into the shards is not implemented). Resume with distributed.mode=ddp "
            "or in one process: the checkpoint format is the same"
        )
    chosen: list = [None, None]
    if dist.is_main:
        try:
            root = _root(trainer, where)
            _clean_leftovers(root)
            path, skipped = _resolve(trainer, where)
            chosen = [None if path is None else str(path), [(str(p), why) for p, why in skipped]]
        except Exception as exc:  # noqa: BLE001 - handed to every rank, raised there
            chosen = [exc, None]
    tdist.broadcast_object_list(chosen, src=0)
    if isinstance(chosen[0], Exception):
        raise chosen[0]
    path = None if chosen[0] is None else Path(chosen[0])
    if path is None:
        if str(where) != "latest":
            raise CheckpointError(f"resume: no intact checkpoint for {where!r}")
        if chosen[1] and dist.is_main:
            warnings.warn("resume: no intact checkpoint; starting at step 0", CheckpointWarning, stacklevel=3)
        return None
    load_checkpoint(trainer, path, verified=True, rewrite_metrics=dist.is_main)  # rank 0 verified it
    dist.barrier()
    return path
