"""Checkpoints: a model or a whole trainer in one ``.npz`` file, without pickle, versioned, written atomically.

Use :meth:`fastbp.MLP.save` / :meth:`fastbp.MLP.load` and :meth:`fastbp.Trainer.save` /
:meth:`fastbp.Trainer.load`; this module holds the format.

File layout (``FORMAT_VERSION`` 1), every entry a plain numpy array, read with ``allow_pickle=False``:

- ``meta``: uint8, UTF-8 JSON ``{"format": "fastbp-checkpoint", "format_version": 1, "kind": "model" |
  "trainer", "fastbp_version", "model": {sizes, activations, dtype, seed}, "trainer": {...}}``; the trainer
  part holds the loss, optimizer and its hyper-parameters, the learning rate or built-in schedule, batch
  size, device, seed, optimizer step and epoch counters, the shuffling RNG's state and the history's
  stop reason.
- ``weight_<l>`` (sizes[l], sizes[l+1]) and ``bias_<l>`` (sizes[l+1],): the parameters, in the model's dtype.
- trainer files only: ``opt_state`` (2, n_params) in the model's dtype (SGD momentum buffer in row 0;
  Adam's exp_avg and exp_avg_sq in rows 0 and 1) and ``history_<name>`` (float64; ``history_epoch`` int64).

Writing goes to a temporary file in the same folder, which is flushed to disk and then renamed over the
target with ``os.replace``: a crash mid-write leaves the old file (or none), never a broken one. Reading
checks everything (format, version, every field's type and range, every array's shape, dtype and
finiteness) and raises :class:`CheckpointError`, a ``ValueError``, naming what is wrong.
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import zipfile

import numpy as np

from ._validation import check_choice, check_float, check_int
from .model import MLP
from .schedules import Constant, ExponentialDecay, StepDecay

FORMAT = "fastbp-checkpoint"
FORMAT_VERSION = 1
SCHEDULES = {cls.__name__: cls for cls in (Constant, ExponentialDecay, StepDecay)}
HISTORY_FLOATS = ("loss", "val_loss", "val_accuracy", "lr", "time")


class CheckpointError(ValueError):
    """A checkpoint file cannot be read: not a fastbp checkpoint, truncated, corrupt or from a newer fastbp."""


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


def _write_atomic(path: str, arrays: dict) -> None:
    """np.savez into a temporary file beside ``path``, fsync, then os.replace it over ``path``."""
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
            np.savez(file, **arrays)
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
    if meta.get("kind") not in ("model", "trainer"):
        raise CheckpointError(f"{path!r}: unknown checkpoint kind {meta.get('kind')!r}")
    return meta, arrays


def _meta_bytes(meta: dict) -> np.ndarray:
    return np.frombuffer(json.dumps(meta, allow_nan=False, sort_keys=True).encode("utf-8"), dtype=np.uint8)


def _field(section: dict, where: str, key: str):
    if not isinstance(section, dict) or key not in section:
        raise CheckpointError(f"checkpoint {where} lacks the field {key!r}")
    return section[key]


def _checked(where: str, check, *args, **kwargs):
    """Run a _validation check on a stored field, turning its complaint into a CheckpointError."""
    try:
        return check(*args, **kwargs)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {where}: {error}") from None


def _array(arrays: dict, name: str, shape: tuple, dtype) -> np.ndarray:
    if name not in arrays:
        raise CheckpointError(f"checkpoint lacks the array {name!r}")
    arr = arrays[name]
    if arr.shape != shape or arr.dtype != np.dtype(dtype):
        raise CheckpointError(f"checkpoint array {name!r} must have shape {shape} and dtype {np.dtype(dtype)}; "
                              f"it has shape {arr.shape} and dtype {arr.dtype}")
    return arr


# -- models -----------------------------------------------------------------------------------------------------
def _model_entries(model: MLP) -> tuple[dict, dict]:
    if not isinstance(model, MLP):
        raise TypeError(f"model must be a fastbp.MLP; got {type(model).__name__}")
    model.check_parameters()
    meta = {"sizes": [int(s) for s in model.sizes], "activations": list(model.activations),
            "dtype": model.dtype.name, "seed": model.seed}
    arrays = {}
    for layer, (w, b) in enumerate(zip(model.weights, model.biases)):
        arrays[f"weight_{layer}"] = np.ascontiguousarray(w)
        arrays[f"bias_{layer}"] = np.ascontiguousarray(b)
    return meta, arrays


def _model_from(meta: dict, arrays: dict) -> MLP:
    spec = _field(meta, "metadata", "model")
    sizes = _field(spec, "model", "sizes")
    activations = _field(spec, "model", "activations")
    if not isinstance(sizes, list) or not isinstance(activations, list):
        raise CheckpointError("checkpoint model: sizes and activations must be lists")
    dtype = _checked("model", check_choice, "dtype", _field(spec, "model", "dtype"), ("float32", "float64"))
    try:
        model = MLP(sizes, activation=activations, dtype=np.dtype(dtype), seed=_field(spec, "model", "seed"))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint model: {error}") from None
    for layer in range(len(model.sizes) - 1):
        model.weights[layer][...] = _array(arrays, f"weight_{layer}", model.weights[layer].shape, model.dtype)
        model.biases[layer][...] = _array(arrays, f"bias_{layer}", model.biases[layer].shape, model.dtype)
    _checked("model", model.check_parameters)  # finite values
    return model


def save_model(model: MLP, path) -> None:
    """Write ``model`` to ``path`` (one .npz file; see the module docstring)."""
    path = _as_path(path)
    model_meta, arrays = _model_entries(model)
    meta = _envelope("model") | {"model": model_meta}
    _write_atomic(path, {"meta": _meta_bytes(meta)} | arrays)


def load_model(path) -> MLP:
    """The model stored in ``path`` (a model or a trainer checkpoint)."""
    meta, arrays = _read(path)
    return _model_from(meta, arrays)


def _envelope(kind: str) -> dict:
    from . import __version__

    return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "fastbp_version": __version__}


# -- trainers ---------------------------------------------------------------------------------------------------
def _lr_spec(lr) -> dict:
    if type(lr) in SCHEDULES.values():
        return {"type": type(lr).__name__} | dataclasses.asdict(lr)
    if callable(lr):
        return {"type": "custom", "repr": repr(lr)[:200]}
    return {"type": "number", "value": float(lr)}


def _lr_from(spec: dict):
    kind = _field(spec, "trainer lr", "type")
    if kind == "number":
        return _checked("trainer", check_float, "lr", _field(spec, "trainer lr", "value"), minimum=0.0,
                        exclusive_minimum=True)
    if kind == "custom":
        raise CheckpointError(
            f"this checkpoint was saved with a custom learning-rate callable ({spec.get('repr', '?')}), which "
            "cannot be stored in a file; pass it again: fastbp.Trainer.load(path, lr=your_schedule)")
    if kind not in SCHEDULES:
        raise CheckpointError(f"checkpoint trainer: unknown learning-rate schedule {kind!r}")
    cls = SCHEDULES[kind]
    kwargs = {}
    for f in dataclasses.fields(cls):
        value = _field(spec, f"trainer lr ({kind})", f.name)
        if f.name == "step_size":
            kwargs[f.name] = _checked("trainer lr", check_int, "step_size", value, minimum=1)
        else:
            kwargs[f.name] = _checked("trainer lr", check_float, f.name, value)
    return cls(**kwargs)


def save_trainer(trainer, path) -> None:
    """Write ``trainer`` (its model, optimizer state, schedule, RNG and history) to ``path``."""
    from .trainer import Trainer

    if not isinstance(trainer, Trainer):
        raise TypeError(f"trainer must be a fastbp.Trainer; got {type(trainer).__name__}")
    path = _as_path(path)
    model_meta, arrays = _model_entries(trainer.model)
    history = trainer.history
    meta = _envelope("trainer") | {"model": model_meta, "trainer": {
        "loss": trainer.loss, "optimizer": trainer.optimizer, "lr": _lr_spec(trainer.lr),
        "momentum": trainer.momentum, "dampening": trainer.dampening, "nesterov": trainer.nesterov,
        "weight_decay": trainer.weight_decay, "betas": list(trainer.betas), "eps": trainer.eps,
        "batch_size": trainer.batch_size, "device": trainer.device, "seed": trainer.seed,
        "steps_done": int(trainer.steps_done), "epochs_done": int(trainer.epochs_done),
        "rng_state": trainer._rng.bit_generator.state, "stop_reason": history.stop_reason,
    }}
    arrays["opt_state"] = np.ascontiguousarray(trainer.opt_state)
    arrays["history_epoch"] = np.asarray(history.epoch, dtype=np.int64)
    for name in HISTORY_FLOATS:
        arrays[f"history_{name}"] = np.asarray(history[name], dtype=np.float64)
    _write_atomic(path, {"meta": _meta_bytes(meta)} | arrays)


def load_trainer(path, *, lr=None, device=None):
    """The trainer stored in ``path``; ``lr`` replaces the stored rate or schedule, ``device`` the device."""
    from .trainer import History, Trainer

    path = _as_path(path)
    if device is not None:
        from .backends import DEVICES

        check_choice("device", device, DEVICES)
    if lr is not None:
        Trainer._check_lr(lr)
    meta, arrays = _read(path)
    if meta["kind"] != "trainer":
        raise CheckpointError(f"{path!r} holds a model, not a trainer; read it with fastbp.MLP.load")
    model = _model_from(meta, arrays)
    spec = _field(meta, "metadata", "trainer")
    get = lambda key: _field(spec, "trainer", key)  # noqa: E731
    stored_lr = _lr_from(_field(spec, "trainer", "lr")) if lr is None else lr
    betas = get("betas")
    if not isinstance(betas, list):
        raise CheckpointError(f"checkpoint trainer: betas must be a list; got {betas!r}")
    try:
        trainer = Trainer(model, loss=get("loss"), optimizer=get("optimizer"), lr=stored_lr,
                          momentum=get("momentum"), dampening=get("dampening"), nesterov=get("nesterov"),
                          weight_decay=get("weight_decay"), betas=tuple(betas), eps=get("eps"),
                          batch_size=get("batch_size"), device=device or get("device"), seed=get("seed"))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint trainer: {error}") from None
    except RuntimeError as error:  # a GPU run resumed where there is no usable GPU
        raise RuntimeError(f"{error} To resume on the CPU: fastbp.Trainer.load(path, device='cpu').") from None
    opt_state = _array(arrays, "opt_state", trainer.opt_state.shape, model.dtype)
    if not np.isfinite(opt_state).all():
        raise CheckpointError("checkpoint array 'opt_state' contains NaN or inf")
    trainer.opt_state[...] = opt_state
    trainer.steps_done = _checked("trainer", check_int, "steps_done", get("steps_done"), minimum=0)
    trainer.epochs_done = _checked("trainer", check_int, "epochs_done", get("epochs_done"), minimum=0)
    rng_state = get("rng_state")
    if not isinstance(rng_state, dict) or rng_state.get("bit_generator") != "PCG64":
        raise CheckpointError(f"checkpoint trainer: rng_state must be a PCG64 state; got {rng_state!r:.100}")
    try:
        trainer._rng.bit_generator.state = rng_state
    except (TypeError, ValueError, KeyError) as error:
        raise CheckpointError(f"checkpoint trainer: invalid rng_state ({error})") from None
    history = History()
    n_epochs = None
    for name in ("epoch",) + HISTORY_FLOATS:
        arr = arrays.get(f"history_{name}")
        expected = np.int64 if name == "epoch" else np.float64
        if arr is None or arr.ndim != 1 or arr.dtype != expected:
            raise CheckpointError(f"checkpoint array 'history_{name}' is missing or not a 1-D {np.dtype(expected)} "
                                  "array")
        if name in ("epoch", "loss", "lr", "time"):
            n_epochs = arr.shape[0] if n_epochs is None else n_epochs
            if arr.shape[0] != n_epochs:
                raise CheckpointError(f"checkpoint history: history_{name} has {arr.shape[0]} entries, "
                                      f"history_epoch has {n_epochs}")
        setattr(history, name, arr.tolist())
    for name in ("val_loss", "val_accuracy"):
        if len(history[name]) > n_epochs:
            raise CheckpointError(f"checkpoint history: more {name} entries than epochs")
    stop_reason = get("stop_reason")
    if not isinstance(stop_reason, str):
        raise CheckpointError(f"checkpoint trainer: stop_reason must be a string; got {stop_reason!r}")
    history.stop_reason = stop_reason
    trainer.history = history
    return trainer
