"""Argument checks shared by every public entry point: each error names the argument, what was expected
and what came, and every check runs before anything is changed."""
from __future__ import annotations

import difflib
import numbers

import numpy as np


def shown(value) -> str:
    """``repr(value)`` as the user would write it: numpy scalars as Python numbers (``-1.0``, not numpy 2's
    ``np.float64(-1.0)``), tuples and lists of them likewise."""
    if isinstance(value, np.generic):
        return repr(value.item())
    if isinstance(value, (tuple, list)) and len(value) <= 16:
        inner = ", ".join(shown(v) for v in value)
        return f"({inner}{',' if len(value) == 1 else ''})" if isinstance(value, tuple) else f"[{inner}]"
    return repr(value)


def check_choice(name: str, value, choices, hints: dict | None = None) -> str:
    """``value`` must be one of ``choices`` (strings); suggests the closest on a typo.

    ``hints`` maps names that users of other libraries write (lower case, e.g. ``"gpu"``) to the sentence that
    says what to write instead: a close spelling is not always the right answer ("gpu" is spelled like "cpu"
    but means "cuda").

    >>> check_choice("device", "gpu", ("cpu", "cuda"), hints={"gpu": "Did you mean 'cuda'?"})
    Traceback (most recent call last):
    ...
    ValueError: device must be one of ['cpu', 'cuda']; got 'gpu'. Did you mean 'cuda'?
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {sorted(choices)}; got {type(value).__name__} {shown(value)}")
    if value not in choices:
        key = value.lower().replace("-", "_").replace(" ", "_")
        if hints and key in hints:
            raise ValueError(f"{name} must be one of {sorted(choices)}; got {value!r}. {hints[key]}")
        # Case-insensitive first ("MSE" -> "mse"), then by spelling ("tahn" -> "tanh").
        lowered = {str(c).lower(): c for c in choices}
        close = [lowered[value.lower()]] if value.lower() in lowered else [
            lowered[m] for m in difflib.get_close_matches(value.lower(), list(lowered), n=1)]
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{name} must be one of {sorted(choices)}; got {value!r}.{hint}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {type(value).__name__} {shown(value)}")
    return bool(value)


def check_int(name: str, value, minimum: int | None = None, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer; got {type(value).__name__} {shown(value)}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")
    return value


def check_float(name: str, value, minimum: float | None = None, exclusive_minimum: bool = False,
                maximum: float | None = None, exclusive_maximum: bool = False, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__} {shown(value)}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    if minimum is not None and (value <= minimum if exclusive_minimum else value < minimum):
        raise ValueError(f"{name} must be {'>' if exclusive_minimum else '>='} {minimum}; got {value}")
    if maximum is not None and (value >= maximum if exclusive_maximum else value > maximum):
        raise ValueError(f"{name} must be {'<' if exclusive_maximum else '<='} {maximum}; got {value}")
    return value


def check_dtype(name: str, dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError as error:
        raise TypeError(f"{name} must be numpy.float32 or numpy.float64; got {dtype!r}") from error
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"{name} must be numpy.float32 or numpy.float64; got {dt}")
    return dt


def is_gpu_array(array) -> bool:
    """True for arrays in GPU memory: numba device arrays and anything with ``__cuda_array_interface__``."""
    if isinstance(array, np.ndarray):
        return False
    return hasattr(array, "__cuda_array_interface__") or bool(getattr(array, "__cuda_ndarray__", False))


def _all_finite(arr: np.ndarray) -> bool:
    """Whether every value of a float array is finite: one sum answers for all of them (NaN or inf anywhere
    makes it non-finite; a sum of finite values can overflow, so then the values are checked one by one)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(arr.sum()):
            return True
    return bool(np.isfinite(arr).all())


def as_float_matrix(name: str, array, dtype: np.dtype, n_columns: int | None = None,
                    allow_vector: bool = False, columns_meaning: str | None = None) -> np.ndarray:
    """A C-contiguous (n, m) array of ``dtype`` (a copy only when needed), with every value finite.

    Non-contiguous and Fortran-ordered arrays are accepted (copied). ``allow_vector``: a 1-D array is taken
    as one column (targets of a single-output network). ``columns_meaning`` words the column-count error.
    """
    if (type(array) is np.ndarray and array.dtype == dtype and array.ndim == 2 and array.flags.c_contiguous
            and array.shape[0] and (n_columns is None or array.shape[1] == n_columns) and _all_finite(array)):
        return array  # the common case, checked in a few microseconds: nothing to convert, nothing to copy
    if is_gpu_array(array):
        raise TypeError(f"{name} is a GPU array; the CPU device needs a host array (numpy)")
    try:
        arr = np.asarray(array)
    except (ValueError, TypeError) as error:  # ragged nested lists and the like
        raise ValueError(f"{name} must be a 2-D array of numbers; numpy cannot convert it ({error})") from None
    if arr.dtype.kind not in "fiu":  # rejects bool, complex, object, strings, dates
        kind = {"b": "boolean", "c": "complex", "O": "object", "U": "string", "S": "bytes",
                "M": "datetime", "m": "timedelta", "V": "structured"}.get(arr.dtype.kind, "non-numeric")
        raise TypeError(f"{name} must hold real numbers (float or int); got {kind} dtype {arr.dtype}")
    given_shape = arr.shape
    if arr.ndim == 1 and allow_vector:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2:
        expected = "(n_samples, n_features)" if not allow_vector else "(n_samples,) or (n_samples, n_outputs)"
        hint = (" (use .reshape(-1, 1) for one feature, or .reshape(1, -1) for one sample)"
                if arr.ndim == 1 else "")
        raise ValueError(f"{name} must be a 2-D array of shape {expected}; got shape {given_shape}{hint}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty: it has 0 samples (shape {given_shape})")
    if n_columns is not None and arr.shape[1] != n_columns:
        meaning = columns_meaning or f"the network's {'input' if 'X' in name else 'output'} size"
        raise ValueError(f"{name} must have {n_columns} columns ({meaning}); got shape {given_shape}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{name} must be finite (no NaN or inf); found {arr[tuple(bad)]} at index "
                         f"{tuple(int(i) for i in bad)}")
    with np.errstate(over="ignore"):  # reported below, as an error
        converted = np.ascontiguousarray(arr, dtype=dtype)
    if not np.isfinite(converted).all():  # finite before the cast: too large for dtype
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(converted))[0])
        raise ValueError(f"{name} has a value too large for {np.dtype(dtype).name}: {arr[bad]} at index {bad}")
    return converted
