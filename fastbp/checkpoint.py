"""Checkpoint files: a state dict (``MLP.state_dict()`` or ``Trainer.state_dict()``) in one ``.npz`` file and
back, without pickle, versioned, written atomically.

Use :meth:`fastbp.MLP.save` / :meth:`fastbp.MLP.load` and :meth:`fastbp.Trainer.save` /
:meth:`fastbp.Trainer.load`. This module knows the file format and nothing about models or trainers: what a
state holds, and whether its values make sense, is decided by ``from_state_dict`` / ``load_state_dict``.

File layout (``FORMAT_VERSION`` 1), every entry a plain numpy array, read with ``allow_pickle=False``:

- ``meta``: uint8, UTF-8 JSON ``{"format": "fastbp-checkpoint", "format_version": 1, "kind": "model" |
  "trainer", "fastbp_version", "model": {sizes, activations, dtype, seed}, "trainer": {...}}``; the trainer
  part holds the trainer state's plain fields (loss, optimizer and its hyper-parameters, the learning rate
  or built-in schedule, batch size, device, seed, n_threads, optimizer step and epoch counters, the
  shuffling RNG's state, ReduceLROnPlateau's state) and the history's stop reason.
- ``weight_<l>`` (sizes[l], sizes[l+1]) and ``bias_<l>`` (sizes[l+1],): the parameters, in the model's dtype.
- trainer files only: ``opt_state`` (2, n_params) in the model's dtype (SGD momentum buffer in row 0;
  Adam's exp_avg and exp_avg_sq in rows 0 and 1) and ``history_<name>`` (float64; ``history_epoch`` int64).

Writing goes to a temporary file in the same folder, which is flushed to disk and then renamed over the
target with ``os.replace``: a crash mid-write leaves the old file (or none), never a broken one. Reading
checks the envelope (format, version, kind) and the arrays' presence; the state's loader checks the rest,
and :func:`reported_as_checkpoint_error` turns its complaints into :class:`CheckpointError`, a
``ValueError``, naming what is wrong.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import zipfile

import numpy as np

from ._version import __version__

FORMAT = "fastbp-checkpoint"
FORMAT_VERSION = 1
KINDS = ("model", "trainer")


class CheckpointError(ValueError):
    """A checkpoint file cannot be read: not a fastbp checkpoint, truncated, corrupt or from a newer fastbp."""


@contextlib.contextmanager
def reported_as_checkpoint_error(section: str | None = None):
    """Inside: a ValueError or TypeError from loading a file's state becomes a CheckpointError
    ``checkpoint <section>: <message>`` (``checkpoint <message>`` without a section)."""
    try:
        yield
    except CheckpointError:
        raise
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {section}: {error}" if section else f"checkpoint {error}") from None


# -- files ------------------------------------------------------------------------------------------------------
def _as_path(path) -> str:
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file name (str or os.PathLike); got {type(path).__name__} {path!r}")
    path = os.fspath(path)
    if not path:
        raise ValueError("path must be a file name; got an empty string")
    return path


def write_atomic(path: str, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, flush and fsync it, then os.replace it over
    ``path``: a crash mid-write leaves the old file (or none), never a broken one. Used for every file fastbp
    writes (checkpoints here, safetensors in fastbp.interop)."""
    target = os.path.abspath(path)
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot save to {path!r}: the folder {folder!r} does not exist")
    if os.path.isdir(target):
        raise IsADirectoryError(f"cannot save to {path!r}: it is a folder")
    temp = os.path.join(folder, f".{os.path.basename(target)}.{secrets.token_hex(6)}.tmp")
    # os.open applies the umask, so the final file gets the usual permissions (mkstemp would give 0600).
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, target)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable (best effort; not every platform can open a folder)
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _read(path) -> tuple[dict, dict]:
    """(meta, arrays) of a checkpoint, with the envelope (format, version) checked."""
    path = _as_path(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a folder, not a checkpoint file")
    try:
        data = np.load(path, allow_pickle=False)
    except ValueError as error:
        if "pickle" in str(error):
            raise CheckpointError(f"{path!r} is not a fastbp checkpoint (not an .npz file, or one holding "
                                  "pickled objects, which fastbp never writes or loads)") from None
        raise CheckpointError(f"{path!r} is not a readable fastbp checkpoint ({error})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{path!r} is truncated or corrupt; cannot read it ({error})") from None
    except Exception as error:  # noqa: BLE001
        # A damaged zip directory makes the zip reader raise what it raises for zips it cannot handle: a changed
        # "version needed" field gives NotImplementedError("zip file version 11.4"), an unknown compression
        # method NotImplementedError too, a bad count OverflowError. All mean a damaged file here (fastbp writes
        # plain stored zip entries), and every damaged file gets the same error.
        raise CheckpointError(f"{path!r} is truncated or corrupt; cannot read it "
                              f"({type(error).__name__}: {error})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{path!r} is a single .npy array, not a fastbp checkpoint (.npz)")
    try:
        with data:
            if "meta" not in data.files:
                raise CheckpointError(f"{path!r} is an .npz file but not a fastbp checkpoint (no 'meta' entry; "
                                      f"it holds {sorted(data.files)[:8]})")
            arrays = {name: data[name] for name in data.files}
    except CheckpointError:
        raise
    except ValueError as error:
        if "pickle" in str(error):
            raise CheckpointError(f"{path!r} holds pickled objects, which fastbp never writes or loads") from None
        raise CheckpointError(f"{path!r} is truncated or corrupt; cannot read it ({error})") from None
    except Exception as error:  # zip CRC errors, zlib errors, short reads: all mean a damaged file
        raise CheckpointError(f"{path!r} is truncated or corrupt; cannot read it "
                              f"({type(error).__name__}: {error})") from None
    raw = arrays.pop("meta")
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise CheckpointError(f"{path!r} is not a fastbp checkpoint (its 'meta' entry is not JSON bytes)")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path!r}: the checkpoint's metadata is corrupt ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a fastbp checkpoint (its metadata has no "
                              f"format={FORMAT!r})")
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path!r}: invalid checkpoint format version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path!r} was written by a newer fastbp (checkpoint format version {version}, fastbp "
            f"{meta.get('fastbp_version', '?')}); this fastbp reads format versions up to {FORMAT_VERSION}. "
            "Upgrade fastbp to load it.")
    if meta.get("kind") not in KINDS:
        raise CheckpointError(f"{path!r}: unknown checkpoint kind {meta.get('kind')!r}")
    return meta, arrays


def _meta_bytes(meta: dict) -> np.ndarray:
    return np.frombuffer(json.dumps(meta, allow_nan=False, sort_keys=True).encode("utf-8"), dtype=np.uint8)


def _array(arrays: dict, name: str) -> np.ndarray:
    if name not in arrays:
        raise CheckpointError(f"checkpoint lacks the array {name!r}")
    return arrays[name]


# -- state dicts <-> files --------------------------------------------------------------------------------------
def write(path, kind: str, state: dict) -> None:
    """Write a state to ``path``: kind "model" with ``{"model": MLP.state_dict()}``, or kind "trainer" with
    ``Trainer.state_dict()`` (``{"model", "trainer", "opt_state", "history"}``)."""
    path = _as_path(path)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}; got {kind!r}")
    model = dict(state["model"])
    weights, biases = model.pop("weights"), model.pop("biases")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "fastbp_version": __version__,
            "model": model}
    arrays = {}
    for layer, (w, b) in enumerate(zip(weights, biases)):
        arrays[f"weight_{layer}"] = np.ascontiguousarray(w)
        arrays[f"bias_{layer}"] = np.ascontiguousarray(b)
    if kind == "trainer":
        history = dict(state["history"])
        meta["trainer"] = dict(state["trainer"]) | {"stop_reason": history.pop("stop_reason")}
        arrays["opt_state"] = np.ascontiguousarray(state["opt_state"])
        for name, values in history.items():
            arrays[f"history_{name}"] = np.asarray(values, dtype=np.int64 if name == "epoch" else np.float64)
    arrays = {"meta": _meta_bytes(meta)} | arrays
    write_atomic(path, lambda file: np.savez(file, **arrays))


def read(path) -> tuple[str, dict]:
    """``(kind, state)`` of the checkpoint at ``path``, the state shaped as :func:`write` takes it (the
    history's entries as lists). Checks the envelope and that the arrays the metadata implies are there."""
    meta, arrays = _read(path)
    model = meta.get("model")
    if not isinstance(model, dict):
        raise CheckpointError("checkpoint metadata lacks the field 'model'")
    sizes = model.get("sizes")
    n_layers = len(sizes) - 1 if isinstance(sizes, list) else 0
    model = dict(model) | {"weights": [_array(arrays, f"weight_{layer}") for layer in range(n_layers)],
                           "biases": [_array(arrays, f"bias_{layer}") for layer in range(n_layers)]}
    state = {"model": model}
    if meta["kind"] == "trainer":
        trainer = meta.get("trainer")
        if not isinstance(trainer, dict):
            raise CheckpointError("checkpoint metadata lacks the field 'trainer'")
        trainer = dict(trainer)
        history = {"stop_reason": trainer.pop("stop_reason", None)}
        for name, arr in arrays.items():
            if name.startswith("history_"):
                if arr.ndim != 1 or arr.dtype.kind not in "if":
                    raise CheckpointError(f"checkpoint array {name!r} is not a 1-D numeric array")
                history[name[len("history_"):]] = arr.tolist()
        state |= {"trainer": trainer, "opt_state": _array(arrays, "opt_state"), "history": history}
    return meta["kind"], state
