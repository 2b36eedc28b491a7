"""Weights other frameworks can load: safetensors files laid out like a PyTorch ``nn.Sequential``, and direct
conversion to and from PyTorch modules.

Use :meth:`fastbp.MLP.save_safetensors` / :meth:`fastbp.MLP.load_safetensors` and :meth:`fastbp.MLP.to_torch` /
:meth:`fastbp.MLP.from_torch`. This module knows the file format and PyTorch's modules and nothing about models,
as :mod:`fastbp.checkpoint` does: it converts between a file (or a module) and a **model state dict**, the dict
``MLP.state_dict()`` returns and ``MLP.from_state_dict(state)`` takes: ``{"sizes": [int, ...], "activations":
[hidden activation names], "dtype": "float32" | "float64", "seed": int | None, "weights": [arrays (n_in,
n_out)], "biases": [arrays (n_out,)]}``. It checks what it can from the dict (field types, the dtype, shapes
that connect, finite values), since a user may hand one over.

fastbp's network ``MLP(sizes, activation)`` is the PyTorch module
``nn.Sequential(Linear(sizes[0], sizes[1]), act_0, Linear(sizes[1], sizes[2]), act_1, ..., Linear(.., sizes[-1]))``
(no activation after the last Linear: fastbp's loss applies the output transform). This module writes and reads
that correspondence:

- :func:`write_safetensors` / :func:`read_safetensors`: a `safetensors <https://github.com/huggingface/safetensors>`_
  file, written and read by fastbp itself (no new dependency), whose tensors are that Sequential's
  ``state_dict``: ``"0.weight"`` of shape ``(sizes[1], sizes[0])`` (PyTorch's ``(out, in)``, the transpose of
  ``state["weights"][0]``), ``"0.bias"``, then ``"2.weight"``, ``"2.bias"``, ... (Linear ``l`` sits at index
  ``2 l`` because one parameter-free activation module sits between two Linears). So
  ``module.load_state_dict(safetensors.torch.load_file(path))`` loads a fastbp file into PyTorch, and a file
  written by ``safetensors.torch.save_file(module.state_dict(), path)`` loads into fastbp.
- :func:`state_from_torch` / :func:`state_to_torch`: the same conversion in memory, when PyTorch is installed
  (imported only inside those two functions: ``import fastbp.interop`` never imports torch).

File layout (the safetensors format): 8 bytes, the header's length ``n`` as a little-endian unsigned 64-bit
integer; ``n`` bytes of UTF-8 JSON (padded with spaces to a multiple of 8 bytes so the data that follows is
aligned), mapping each tensor's name to ``{"dtype": "F32" | "F64", "shape": [...], "data_offsets": [begin,
end]}`` plus ``"__metadata__"``, a str -> str map; then the tensors' raw little-endian C-order bytes, back to
back, ``data_offsets`` counted from the first byte after the header. fastbp writes its architecture in the
metadata (``fastbp.format``, ``fastbp.format_version``, ``fastbp.version``, ``fastbp.sizes``,
``fastbp.activations``, ``fastbp.dtype``, ``fastbp.seed``; the ``fastbp.`` keys are reserved), so a file it
wrote loads without ``activation=``; a file from elsewhere has no such keys and needs ``activation=``.

Reading checks everything and raises :class:`fastbp.CheckpointError` (a ``ValueError``) naming what is wrong:
a truncated file, a header length beyond the file, a header that is not JSON, offsets that overlap, leave
gaps or reach past the end (the reference reader refuses the same), keys that are not the Linears of a
Sequential, shapes that do not connect, unsupported dtypes and NaN or inf values. Two documented
conversions, both exact:

- A Linear without bias (``nn.Linear(..., bias=False)``: a ``"<i>.weight"`` with no ``"<i>.bias"``) loads with
  zero biases, which computes the same function; fastbp always trains biases, so saving it again writes them.
- ``F16`` and ``BF16`` tensors (half-precision training) are widened to float32, which holds every such value
  exactly. Other dtypes (integers, bool, 8-bit floats) are refused.

Writing goes to a temporary file beside the target, flushed and fsynced, then renamed over it with
``os.replace``, as fastbp's checkpoints are: a crash mid-write leaves the old file (or none), never half a file.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np

from ._validation import check_choice, check_dtype, check_int
from ._version import __version__
from .checkpoint import CheckpointError, _as_path, write_atomic
from .kernels.pointwise import ACTIVATIONS, LEAKY_RELU_SLOPE

__all__ = ["write_safetensors", "read_safetensors", "state_from_torch", "state_to_torch", "FORMAT",
           "FORMAT_VERSION"]

FORMAT = "fastbp-mlp"
FORMAT_VERSION = 1
METADATA_PREFIX = "fastbp."
# The reference reader (safetensors' MAX_HEADER_SIZE) refuses longer headers: past it, the 8 leading bytes
# are almost surely not a header length at all (another file type).
MAX_HEADER_BYTES = 100_000_000
# Files people pass to load_safetensors by mistake, known by their first bytes (each format's magic number), so
# that the error says what the file is instead of reading its first 8 bytes as a header length.
_OTHER_FORMATS = (
    (b"PK\x03\x04", "a zip archive: an .npz file (a fastbp checkpoint: read it with fastbp.MLP.load or "
                     "fastbp.Trainer.load) or a PyTorch torch.save file (.pt / .pth: load it with torch.load, then "
                     "fastbp.MLP.from_torch)"),
    (b"PK\x05\x06", "an empty zip archive"),
    (b"\x93NUMPY", "a numpy .npy array (numpy.load reads it)"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (a Keras .h5 model, for instance)"),
    (b"\x80\x02", "a Python pickle (a legacy torch.save file?); fastbp never loads pickles"),
    (b"\x80\x03", "a Python pickle (a legacy torch.save file?); fastbp never loads pickles"),
    (b"\x80\x04", "a Python pickle; fastbp never loads pickles"),
    (b"\x80\x05", "a Python pickle; fastbp never loads pickles"),
    (b"\x1f\x8b", "a gzip-compressed file: decompress it first"),
)
# Stored dtype -> (bytes per value, little-endian numpy dtype it decodes to). BF16 has no numpy dtype: its two
# bytes are the high half of a float32, decoded by a shift.
_DTYPES = {"F64": (8, "<f8"), "F32": (4, "<f4"), "F16": (2, "<f2"), "BF16": (2, "<u2")}
# Exactly what torch's Sequential.state_dict() writes: a decimal index without leading zeros, then the name.
_KEY = re.compile(r"(0|[1-9][0-9]*)\.(weight|bias)")
_SUPPORTED_MODULES = ("nn.Linear, nn.ReLU, nn.Sigmoid, nn.Tanh, nn.Identity and "
                      f"nn.LeakyReLU(negative_slope={LEAKY_RELU_SLOPE})")
# The fields of a model state dict (fastbp.MLP.state_dict()).
_STATE_FIELDS = ("sizes", "activations", "dtype", "seed", "weights", "biases")


# -- the model state dict ---------------------------------------------------------------------------------------
def _checked_state(state) -> dict:
    """``state``, a model state dict, checked as far as it can be without building a model (a user may pass
    a dict of their own): its fields, dtype, layer widths, activation names, each array's shape and dtype (so
    the layers connect) and finite values. Returns the plain fields normalised (ints, a numpy dtype) and the
    arrays as given."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a model state dict (fastbp.MLP.state_dict()); got {type(state).__name__}")
    for key in _STATE_FIELDS:
        if key not in state:
            raise ValueError(f"the state lacks the field {key!r} (a model state dict has {list(_STATE_FIELDS)})")
    sizes = state["sizes"]
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, (Sequence, np.ndarray)):
        raise TypeError(f"state['sizes'] must be a list of layer widths like [64, 128, 10]; got {sizes!r:.80}")
    sizes = [check_int(f"state['sizes'][{i}]", s, minimum=1) for i, s in enumerate(sizes)]
    if len(sizes) < 2:
        raise ValueError(f"state['sizes'] needs at least two layers (input and output); got {sizes}")
    activations = state["activations"]
    if isinstance(activations, (str, bytes)) or not isinstance(activations, Sequence):
        raise TypeError(f"state['activations'] must be a list of names, one per hidden layer; got "
                        f"{activations!r:.80}")
    if len(activations) != len(sizes) - 2:
        raise ValueError(f"state['activations'] must hold one name per hidden layer ({len(sizes) - 2}); got "
                         f"{len(activations)} names")
    activations = [check_choice(f"state['activations'][{i}]", a, ACTIVATIONS) for i, a in enumerate(activations)]
    dtype = np.dtype(check_choice("state['dtype']", state["dtype"], ("float32", "float64")))
    seed = check_int("state['seed']", state["seed"], minimum=0, allow_none=True)
    arrays = {}
    for kind in ("weights", "biases"):
        given = state[kind]
        if not isinstance(given, (list, tuple)) or len(given) != len(sizes) - 1:
            raise ValueError(f"state[{kind!r}] must be a list of {len(sizes) - 1} arrays, one per layer; got "
                             f"{given!r:.80}")
        for layer, array in enumerate(given):
            shape = (sizes[layer], sizes[layer + 1]) if kind == "weights" else (sizes[layer + 1],)
            if not isinstance(array, np.ndarray) or array.shape != shape or array.dtype != dtype:
                got = (f"shape {array.shape} and dtype {array.dtype}" if isinstance(array, np.ndarray)
                       else type(array).__name__)
                raise ValueError(f"state[{kind!r}][{layer}] must be an array of shape {shape} and dtype "
                                 f"{dtype.name} (the state's sizes and dtype); got {got}")
            if not np.isfinite(array).all():
                raise ValueError(f"state[{kind!r}][{layer}] contains NaN or inf")
        arrays[kind] = list(given)
    return {"sizes": sizes, "activations": activations, "dtype": dtype, "seed": seed} | arrays


# -- writing ----------------------------------------------------------------------------------------------------
def write_safetensors(path, state: Mapping, *, metadata: Mapping[str, str] | None = None) -> None:
    """Write the model state dict ``state`` to ``path`` as a safetensors file PyTorch loads into an
    ``nn.Sequential``. Usually called as :meth:`fastbp.MLP.save_safetensors`.

    Parameters
    ----------
    path : str, bytes or os.PathLike
        The file to write (usually ``*.safetensors``); replaced atomically if it exists.
    state : dict
        A model state dict, as ``fastbp.MLP.state_dict()`` returns. It is checked first (its fields, dtype,
        shapes that connect, finite values): nothing is written unless fastbp could load it back.
    metadata : mapping of str to str, optional
        Extra entries for the file's ``__metadata__`` (a description, a licence...). Keys starting with
        ``"fastbp."`` are reserved for the architecture fastbp stores there.

    Notes
    -----
    The file holds, for each layer ``l``, ``"{2l}.weight"`` of shape ``(sizes[l + 1], sizes[l])`` (the transpose
    of ``state["weights"][l]``) and ``"{2l}.bias"`` of shape ``(sizes[l + 1],)``, in the state's dtype (``F32``
    or ``F64``): the ``state_dict`` of ``fastbp.interop.state_to_torch(state)``. :func:`read_safetensors` reads
    it back bit for bit.

    Examples
    --------
    >>> import os, tempfile, numpy as np, fastbp
    >>> from fastbp.interop import write_safetensors, read_safetensors
    >>> model = fastbp.MLP([4, 8, 3], activation="tanh", seed=0)
    >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> write_safetensors(path, model.state_dict(), metadata={"description": "a tiny example"})
    >>> state = read_safetensors(path)  # the architecture comes from the file's metadata
    >>> state["sizes"], state["activations"], bool(np.array_equal(state["weights"][0], model.weights[0]))
    ([4, 8, 3], ['tanh'], True)
    """
    path = _as_path(path)
    state = _checked_state(state)  # wrong shapes, dtypes or NaN/inf never reach a file
    entries = _user_metadata(metadata) | _architecture(state)
    code = "F32" if state["dtype"] == np.float32 else "F64"
    little = state["dtype"].newbyteorder("<")  # the format is little-endian on every machine
    tensors = []  # (name, array in the file's layout)
    for layer, (weight, bias) in enumerate(zip(state["weights"], state["biases"])):
        tensors.append((f"{2 * layer}.weight", weight.T))  # PyTorch's Linear stores (out, in)
        tensors.append((f"{2 * layer}.bias", bias))
    header = {"__metadata__": entries}
    offset = 0
    for name, array in tensors:
        n_bytes = array.size * little.itemsize
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + n_bytes]}
        offset += n_bytes
    text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    # Spaces up to a multiple of 8 bytes: the data then starts 8-byte aligned, as the reference writer does.
    text += b" " * (-len(text) % 8)

    def write(file):
        file.write(len(text).to_bytes(8, "little"))
        file.write(text)
        for _, array in tensors:
            # One layer at a time: the file's bytes are never assembled in memory.
            file.write(np.ascontiguousarray(array, dtype=little).data)

    write_atomic(path, write)


def _user_metadata(metadata) -> dict:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping of str to str (or None); got {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str (the safetensors format stores only strings); got "
                            f"{key!r}: {type(value).__name__} {value!r:.80}")
        if key.startswith(METADATA_PREFIX):
            raise ValueError(f"metadata key {key!r} is reserved: keys starting with {METADATA_PREFIX!r} hold the "
                             "architecture fastbp stores; choose another name")
    return dict(metadata)


def _architecture(state: dict) -> dict:
    """The ``fastbp.`` metadata entries of a checked state."""
    p = METADATA_PREFIX
    return {f"{p}format": FORMAT, f"{p}format_version": str(FORMAT_VERSION), f"{p}version": __version__,
            f"{p}sizes": json.dumps(state["sizes"]), f"{p}activations": json.dumps(state["activations"]),
            f"{p}dtype": state["dtype"].name, f"{p}seed": json.dumps(state["seed"])}


# -- reading ----------------------------------------------------------------------------------------------------
def read_safetensors(path, activation: str | Sequence[str] | None = None, *, dtype=None) -> dict:
    """The model state dict of the ``nn.Sequential`` of Linear layers stored in the safetensors file ``path``.
    Usually called as :meth:`fastbp.MLP.load_safetensors`, which builds the model from it.

    Parameters
    ----------
    path : str, bytes or os.PathLike
        A file written by :func:`write_safetensors`, or by ``safetensors.torch.save_file(module.state_dict(),
        path)`` for ``module = nn.Sequential(Linear, act, Linear, act, ..., Linear)``: tensors ``"0.weight"``
        ``(out, in)``, ``"0.bias"`` ``(out,)``, ``"2.weight"``, ``"2.bias"``, ...
    activation : str or sequence of str, optional
        The hidden-layer activation(s), as for :class:`fastbp.MLP`: one name for every hidden layer or one per
        hidden layer (``identity``, ``sigmoid``, ``tanh``, ``relu``, ``leaky_relu``). A safetensors file does not
        say which modules sat between the Linears, so a file from elsewhere needs it (unless it has a single
        Linear). A file written by fastbp names its activations; if given, they must agree.
    dtype : numpy.float32 or numpy.float64, optional
        The state's dtype. Default: the file's (float64 if any tensor is ``F64``, else float32; ``F16`` and
        ``BF16`` tensors are widened exactly to float32). Narrowing ``F64`` to float32 rounds each value.

    Returns
    -------
    dict
        A model state dict, as ``fastbp.MLP.state_dict()`` returns and ``fastbp.MLP.from_state_dict`` takes:
        ``sizes = [in of "0.weight"] + [out of each weight]``, ``activations`` (one name per hidden layer),
        ``dtype`` (``"float32"`` or ``"float64"``), ``weights[l]`` the transpose of ``"{2l}.weight"`` (a new
        C-ordered array of shape ``(sizes[l], sizes[l + 1])``), ``biases[l]`` = ``"{2l}.bias"`` (zeros where
        the Linear had no bias). ``seed`` is the stored one for a fastbp file, None otherwise.

    Raises
    ------
    fastbp.CheckpointError
        The file is not a safetensors file, is truncated or corrupt, does not hold the Linears of such a
        Sequential, holds non-float or non-finite values, or needs ``activation=``. The message says which.
    ValueError, TypeError
        ``activation`` or ``dtype`` is not valid, or disagrees with the file.

    Examples
    --------
    >>> import os, tempfile, fastbp
    >>> from fastbp.interop import write_safetensors, read_safetensors
    >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> write_safetensors(path, fastbp.MLP([4, 8, 8, 2], ["relu", "sigmoid"], seed=0).state_dict())
    >>> state = read_safetensors(path)
    >>> {key: state[key] for key in ("sizes", "activations", "dtype", "seed")}
    {'sizes': [4, 8, 8, 2], 'activations': ['relu', 'sigmoid'], 'dtype': 'float32', 'seed': 0}
    >>> [w.shape for w in state["weights"]], [b.shape for b in state["biases"]]
    ([(4, 8), (8, 8), (8, 2)], [(8,), (8,), (2,)])
    >>> fastbp.MLP.from_state_dict(state)
    MLP([4, 8, 8, 2], activation=['relu', 'sigmoid'], dtype=float32, n_params=130)

    A file saved from PyTorch, ``safetensors.torch.save_file(nn.Sequential(nn.Linear(4, 8), nn.ReLU(),
    nn.Linear(8, 2)).state_dict(), path)``, loads with ``read_safetensors(path, activation="relu")``.
    """
    path = _as_path(path)
    if dtype is not None:
        dtype = check_dtype("dtype", dtype)
    if activation is not None and not isinstance(activation, str) and (
            not isinstance(activation, Sequence) or not all(isinstance(a, str) for a in activation)):
        raise TypeError(f"activation must be a name, a list of names (one per hidden layer) or None; got "
                        f"{activation!r:.100}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no safetensors file at {path!r}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a folder, not a safetensors file")
    with open(path, "rb") as file:
        entries, metadata, data_start = _read_header(file, path)
        layers = _linear_layers(entries, path)
        sizes = _check_shapes(entries, layers, path)
        codes = {entries[name][0] for name in entries}
        natural = np.dtype(np.float64 if "F64" in codes else np.float32)
        stored = _stored_architecture(metadata, path)
        n_hidden = len(sizes) - 2
        if stored is not None:
            activations, seed = _match_stored(stored, sizes, natural, activation, path)
        else:
            activations, seed = _foreign_activations(activation, n_hidden, path), None
        dtype = dtype or natural
        weights, biases = [], []
        for weight_name, bias_name in layers:
            # The file holds (out, in); the state (n_in, n_out), in its own C-ordered memory.
            weights.append(np.ascontiguousarray(_values(file, data_start, entries, weight_name, dtype, path).T))
            if bias_name is None:
                # Linear(bias=False): a zero bias computes the same function. Every bias is set here, so a
                # model loading the state never keeps a bias of its own.
                biases.append(np.zeros(entries[weight_name][1][0], dtype=dtype))
            else:
                biases.append(_values(file, data_start, entries, bias_name, dtype, path))
    return {"sizes": [int(s) for s in sizes], "activations": list(activations), "dtype": dtype.name, "seed": seed,
            "weights": weights, "biases": biases}


def _read_header(file, path: str) -> tuple[dict, dict, int]:
    """({name: (dtype code, shape, begin, end)}, metadata, offset of the data) with the layout checked: every
    tensor inside the data, the tensors back to back with no overlap, gap or trailing bytes."""
    size = os.fstat(file.fileno()).st_size
    prefix = file.read(8)
    if len(prefix) < 8:
        raise CheckpointError(f"{path!r} is truncated: a safetensors file starts with an 8-byte header length; "
                              f"it has only {size} bytes")
    for signature, what in _OTHER_FORMATS:
        if prefix.startswith(signature):
            raise CheckpointError(f"{path!r} is not a safetensors file: it is {what}")
    n = int.from_bytes(prefix, "little")
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path!r} is not a safetensors file: its first 8 bytes give a header length of {n} "
                              f"bytes, over the format's limit of {MAX_HEADER_BYTES} (another file type, or corrupt)")
    if 8 + n > size:
        raise CheckpointError(f"{path!r} is not a safetensors file, or a truncated one: its first 8 bytes, read as "
                              f"the header length, give {n} bytes, beyond the end of the file ({size} bytes)")
    raw = file.read(n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{path!r} is not a safetensors file: its header is not UTF-8 text ({error})") from None
    if not text.startswith("{"):
        raise CheckpointError(f"{path!r} is not a safetensors file: its header does not start with '{{' (a JSON "
                              f"object); it starts with {text[:20]!r}")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except (ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path!r}: the safetensors header is not valid JSON ({error})") from None
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path!r}: the safetensors '__metadata__' must map str to str; got {metadata!r:.120}")
    data_len = size - 8 - n
    entries = {}
    for name, info in header.items():
        where = f"{path!r}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise CheckpointError(f"{where} must be described by {{'dtype', 'shape', 'data_offsets'}}; got "
                                  f"{info!r:.120}")
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(code, str):
            raise CheckpointError(f"{where}: dtype must be a string such as 'F32'; got {code!r}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(f"{where}: shape must be a list of non-negative integers; got {shape!r:.80}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets)
                or offsets[0] > offsets[1]):
            raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end; got "
                                  f"{offsets!r:.80}")
        if offsets[1] > data_len:
            raise CheckpointError(f"{where}: its data_offsets {offsets} reach beyond the {data_len} data bytes "
                                  "after the header: the file is truncated or corrupt")
        entries[name] = (code, tuple(shape), offsets[0], offsets[1])
    end, previous = 0, None
    for name, (_, _, begin, stop) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3], item[0])):
        if begin < end:
            raise CheckpointError(f"{path!r}: the data of tensors {previous!r} and {name!r} overlap (bytes "
                                  f"{begin} to {min(end, stop)}): the file is corrupt")
        if begin > end:
            raise CheckpointError(f"{path!r}: {begin - end} bytes before tensor {name!r} belong to no tensor; "
                                  "safetensors stores the tensors back to back: the file is corrupt")
        end, previous = stop, name
    if end != data_len:
        raise CheckpointError(f"{path!r}: {data_len - end} bytes after the last tensor belong to no tensor; "
                              "safetensors stores the tensors back to back: the file is corrupt")
    return entries, metadata, 8 + n


def _no_duplicates(pairs):
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"the key {duplicate!r} appears twice")
    return dict(pairs)


def _no_constants(name):
    raise ValueError(f"{name} is not JSON")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _linear_layers(entries: dict, path: str) -> list[tuple[str, str | None]]:
    """[(weight name, bias name or None)] in layer order, for keys laid out as nn.Sequential's state_dict."""
    if not entries:
        raise CheckpointError(f"{path!r} holds no tensors")
    by_index = {}
    for name in entries:
        match = _KEY.fullmatch(name)
        if match is None:
            raise CheckpointError(f"{path!r} is not the state_dict of an nn.Sequential of Linear layers: unexpected "
                                  f"tensor {name!r} (expected only '<index>.weight' and '<index>.bias')"
                                  f"{_prefix_hint(name, entries)}")
        by_index.setdefault(int(match[1]), {})[match[2]] = name
    indices = sorted(by_index)
    expected = list(range(0, 2 * len(indices), 2))
    if indices != expected:
        raise CheckpointError(
            f"{path!r} is not laid out as nn.Sequential(Linear, activation, Linear, ..., Linear): its Linear "
            f"layers must sit at indices {expected} (one parameter-free activation module between two Linears), "
            f"but it has parameters at indices {indices}")
    layers = []
    for index in indices:
        names = by_index[index]
        if "weight" not in names:
            raise CheckpointError(f"{path!r}: tensor {names['bias']!r} has no matching '{index}.weight'")
        layers.append((names["weight"], names.get("bias")))
    return layers


def _prefix_hint(name: str, entries: dict) -> str:
    """Suggests the fix when every key carries the same prefix: the state_dict of a module holding the
    Sequential (``"net.0.weight"``) rather than the Sequential's own."""
    head, _, tail = name.rpartition(".")
    prefix = head.rpartition(".")[0] + "." if "." in head else ""
    if prefix and all(key.startswith(prefix) and _KEY.fullmatch(key[len(prefix):]) for key in entries):
        return (f"; every key starts with {prefix!r}: this looks like the state_dict of a module that holds the "
                f"Sequential; save the Sequential's own state_dict (module.{prefix[:-1]}.state_dict())")
    return ""


def _check_shapes(entries: dict, layers: list, path: str) -> list[int]:
    """The layer sizes, with every tensor's dtype, byte count and shape checked."""
    for name, (code, shape, begin, end) in entries.items():
        if code not in _DTYPES:
            raise CheckpointError(f"{path!r}: tensor {name!r} has dtype {code}; fastbp loads floating-point weights: "
                                  "F32 or F64 (F16 and BF16 are widened exactly to float32)")
        count = math.prod(shape)  # Python integers: no overflow for absurd shapes
        if count * _DTYPES[code][0] != end - begin:
            raise CheckpointError(f"{path!r}: tensor {name!r} of shape {list(shape)} and dtype {code} needs "
                                  f"{count * _DTYPES[code][0]} bytes, but its data_offsets [{begin}, {end}] span "
                                  f"{end - begin}: the file is corrupt")
    sizes = []
    for layer, (weight_name, bias_name) in enumerate(layers):
        shape = entries[weight_name][1]
        if len(shape) != 2 or min(shape) < 1:
            raise CheckpointError(f"{path!r}: tensor {weight_name!r} must be a Linear weight of shape (out, in) with "
                                  f"out, in >= 1; got shape {shape}")
        if layer == 0:
            sizes.append(shape[1])
        elif shape[1] != sizes[-1]:
            raise CheckpointError(f"{path!r}: the layers do not connect: {weight_name!r} of shape {shape} takes "
                                  f"{shape[1]} inputs, but the Linear before it, {layers[layer - 1][0]!r} of shape "
                                  f"{entries[layers[layer - 1][0]][1]}, has {sizes[-1]} outputs")
        sizes.append(shape[0])
        if bias_name is not None and entries[bias_name][1] != (shape[0],):
            raise CheckpointError(f"{path!r}: tensor {bias_name!r} must have shape ({shape[0]},) to match "
                                  f"{weight_name!r} of shape {shape}; got {entries[bias_name][1]}")
    return sizes


def _stored_architecture(metadata: dict, path: str) -> dict | None:
    """The architecture fastbp wrote into the metadata, checked field by field; None for a foreign file."""
    p = METADATA_PREFIX
    if not any(key.startswith(p) for key in metadata):
        return None
    where = f"{path!r}: the fastbp architecture in the file's metadata"
    if metadata.get(f"{p}format") != FORMAT:
        raise CheckpointError(f"{where} is corrupt: {p}format must be {FORMAT!r}; got {metadata.get(f'{p}format')!r}")
    version = metadata.get(f"{p}format_version", "")
    if not (version.isascii() and version.isdigit()) or int(version) < 1:
        raise CheckpointError(f"{where} is corrupt: invalid {p}format_version {version!r}")
    if int(version) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path!r} was written by a newer fastbp ({p}format_version {version}, fastbp "
            f"{metadata.get(f'{p}version', '?')}); this fastbp reads versions up to {FORMAT_VERSION}. Upgrade "
            "fastbp to load it.")
    fields = {}
    for key in ("sizes", "activations", "seed"):
        try:
            fields[key] = json.loads(metadata.get(f"{p}{key}", ""))
        except json.JSONDecodeError:
            raise CheckpointError(f"{where} is corrupt: {p}{key} is not JSON; got "
                                  f"{metadata.get(f'{p}{key}')!r:.80}") from None
    if not isinstance(fields["sizes"], list) or not all(_is_count(s) for s in fields["sizes"]):
        raise CheckpointError(f"{where} is corrupt: {p}sizes must be a list of layer widths; got {fields['sizes']!r}")
    if (not isinstance(fields["activations"], list)
            or not all(isinstance(a, str) and a in ACTIVATIONS for a in fields["activations"])):
        raise CheckpointError(f"{where} is corrupt: {p}activations must be a list of names from "
                              f"{sorted(ACTIVATIONS)}; got {fields['activations']!r:.120}")
    if fields["seed"] is not None and not _is_count(fields["seed"]):
        raise CheckpointError(f"{where} is corrupt: {p}seed must be a non-negative integer or null; got "
                              f"{fields['seed']!r}")
    fields["dtype"] = metadata.get(f"{p}dtype")
    if fields["dtype"] not in ("float32", "float64"):
        raise CheckpointError(f"{where} is corrupt: {p}dtype must be 'float32' or 'float64'; got "
                              f"{fields['dtype']!r}")
    return fields


def _match_stored(stored: dict, sizes: list, natural: np.dtype, activation, path: str) -> tuple[list, int | None]:
    """(activations, seed) of a fastbp file, after checking its metadata against its tensors and ``activation``."""
    where = f"{path!r}: the fastbp architecture in the file's metadata"
    if stored["sizes"] != sizes:
        raise CheckpointError(f"{where} does not match its tensors: {METADATA_PREFIX}sizes is {stored['sizes']}, the "
                              f"tensors' shapes give {sizes}")
    if len(stored["activations"]) != len(sizes) - 2:
        raise CheckpointError(f"{where} is corrupt: {len(stored['activations'])} activations for "
                              f"{len(sizes) - 2} hidden layers")
    if np.dtype(stored["dtype"]) != natural:
        raise CheckpointError(f"{where} does not match its tensors: {METADATA_PREFIX}dtype is {stored['dtype']}, the "
                              f"tensors are stored as {natural.name}")
    if activation is not None:
        given = [activation] * (len(sizes) - 2) if isinstance(activation, str) else list(activation)
        if given != stored["activations"]:
            raise ValueError(f"activation={activation!r} disagrees with the activations this fastbp file was "
                             f"saved with, {stored['activations']}; leave activation out to use the stored ones")
    return stored["activations"], stored["seed"]


def _foreign_activations(activation, n_hidden: int, path: str) -> list[str]:
    """The hidden activations of a file fastbp did not write: ``activation``, one name per hidden layer."""
    if activation is None:
        if n_hidden == 0:
            return []
        raise CheckpointError(
            f"{path!r} was not written by fastbp (its metadata has no {METADATA_PREFIX!r} architecture), and a "
            "safetensors file does not say which activations sat between its Linear layers: pass them, e.g. "
            f"load_safetensors(path, activation='relu'), or a list with one name per hidden layer ({n_hidden})")
    if isinstance(activation, str):  # checked as fastbp.MLP checks it, with the same messages
        return [check_choice("activation", activation, ACTIVATIONS) for _ in range(n_hidden)]
    if len(activation) != n_hidden:
        raise ValueError(f"activation must be one name or a list with one name per hidden layer: the file holds "
                         f"{n_hidden + 1} Linear layers, so {n_hidden} hidden layer(s); got {len(activation)} names")
    return [check_choice(f"activation[{i}]", a, ACTIVATIONS) for i, a in enumerate(activation)]


def _values(file, data_start: int, entries: dict, name: str, dtype: np.dtype, path: str) -> np.ndarray:
    """Tensor ``name`` read from the file, checked finite, in ``dtype`` (a new array in the file's own layout:
    (out, in))."""
    code, shape, begin, end = entries[name]
    file.seek(data_start + begin)
    raw = file.read(end - begin)
    if len(raw) != end - begin:  # the header was checked against the size: only a file changing under us
        raise CheckpointError(f"{path!r} is truncated: tensor {name!r} ends past the end of the file")
    stored = np.frombuffer(raw, dtype=_DTYPES[code][1]).reshape(shape)
    if code == "BF16":  # bfloat16 is the high 16 bits of a float32: widening is a shift, and exact
        stored = (stored.astype(np.uint32) << 16).view(np.float32)
    if not np.isfinite(stored).all():
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(stored))[0])
        raise CheckpointError(f"{path!r}: tensor {name!r} holds {stored[bad]} at index {bad}; fastbp parameters must "
                              "be finite")
    with np.errstate(over="ignore"):  # reported below, as an error
        values = stored.astype(dtype)
    if not np.isfinite(values).all():
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(values))[0])
        raise CheckpointError(f"{path!r}: tensor {name!r} holds {stored[bad]} at index {bad}, too large for "
                              f"{dtype.name}; load it with dtype=numpy.float64")
    return values


# -- PyTorch ----------------------------------------------------------------------------------------------------
def _import_torch(caller: str):
    try:
        import torch
    except ImportError as error:
        raise ImportError(f"fastbp.interop.{caller} needs PyTorch, which is not installed: pip install torch") \
            from error
    return torch


def state_from_torch(module, *, dtype=None) -> dict:
    """The model state dict of the network ``module`` computes, an ``nn.Sequential`` of Linear and activation
    modules (the weights are copied). Usually called as :meth:`fastbp.MLP.from_torch`, which builds the model.

    Parameters
    ----------
    module : torch.nn.Sequential
        ``nn.Linear`` layers with one activation module between two of them: ``nn.ReLU``, ``nn.Sigmoid``,
        ``nn.Tanh``, ``nn.LeakyReLU`` with ``negative_slope=0.01`` (fastbp's slope is fixed) or none (two
        Linears in a row: identity). ``nn.Identity`` modules are no-ops and may sit anywhere. Nothing may
        follow the last Linear: fastbp's output layer has no activation, the loss applies the output transform.
        Linears without bias get zero biases. Exact types only: a subclass may change ``forward``.
    dtype : numpy.float32 or numpy.float64, optional
        Default: float64 if any parameter is float64, else float32 (float16 and bfloat16 widen exactly).

    Returns
    -------
    dict
        A model state dict, as ``fastbp.MLP.state_dict()`` returns and ``fastbp.MLP.from_state_dict`` takes:
        ``sizes = [in_features of the first Linear] + [out_features of each Linear]``, ``weights[l]`` the
        transpose of Linear ``l``'s weight, shape ``(in, out)`` (a numpy copy, never torch's memory), every
        bias set (zeros for a Linear without one); ``seed`` None.

    Raises
    ------
    ImportError
        PyTorch is not installed.
    TypeError, ValueError
        ``module`` is not such a Sequential; the message names the offending layer's index and type.

    Examples
    --------
    >>> import torch, fastbp
    >>> from fastbp.interop import state_from_torch
    >>> module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> state = state_from_torch(module)
    >>> state["sizes"], state["activations"], state["dtype"], state["seed"]
    ([4, 8, 2], ['tanh'], 'float32', None)
    >>> bool((torch.from_numpy(state["weights"][0]) == module[0].weight.T).all())
    True
    >>> fastbp.MLP.from_state_dict(state)
    MLP([4, 8, 2], activation='tanh', dtype=float32, n_params=58)
    """
    torch = _import_torch("state_from_torch")
    nn = torch.nn
    if dtype is not None:
        dtype = check_dtype("dtype", dtype)
    if not isinstance(module, nn.Sequential):
        hint = " (wrap it: torch.nn.Sequential(linear))" if isinstance(module, nn.Linear) else ""
        raise TypeError(f"module must be a torch.nn.Sequential of {_SUPPORTED_MODULES}; got "
                        f"{type(module).__name__}{hint}")
    linears, activations = [], []  # [(index, Linear)], one name between consecutive Linears
    pending = None  # (index, name) of the activation since the last Linear
    for index, layer in enumerate(module):  # iteration, not named_children(): a module used twice counts twice
        kind = type(layer)
        if kind is nn.Identity:
            continue
        if kind is nn.Linear:
            if linears:
                activations.append("identity" if pending is None else pending[1])
            pending = None
            linears.append((index, layer))
            continue
        name = _activation_name(nn, layer, index)
        if not linears:
            raise ValueError(f"module[{index}] is {kind.__name__}, before any nn.Linear: the first layer must be an "
                             "nn.Linear (fastbp's input layer has no activation)")
        if pending is not None:
            raise ValueError(f"module[{index}] ({kind.__name__}) follows another activation, module[{pending[0]}] "
                             f"({type(module[pending[0]]).__name__}): fastbp has one activation between two Linears")
        pending = (index, name)
    if not linears:
        raise ValueError(f"module holds no nn.Linear; fastbp needs a Sequential of {_SUPPORTED_MODULES}")
    if pending is not None:
        raise ValueError(
            f"module[{pending[0]}] is a {type(module[pending[0]]).__name__} after the last nn.Linear, which fastbp "
            "cannot hold: its output layer has no activation, because the loss applies the output transform "
            "(mse: identity, binary_cross_entropy: sigmoid, softmax_cross_entropy: softmax, poisson: exp). Drop the "
            "trailing module and train with the loss that applies it.")
    arrays, natural = [], np.dtype(np.float32)
    for position, (index, layer) in enumerate(linears):
        weight = _tensor_values(torch, layer.weight, index, "weight")
        bias = None if layer.bias is None else _tensor_values(torch, layer.bias, index, "bias")
        if min(weight.shape) < 1:
            raise ValueError(f"module[{index}] is Linear({weight.shape[1]}, {weight.shape[0]}); every fastbp layer "
                             "has at least one unit")
        if position > 0 and weight.shape[1] != arrays[-1][0].shape[0]:
            previous = linears[position - 1][0]
            raise ValueError(f"module[{index}] is Linear({weight.shape[1]}, {weight.shape[0]}), but the Linear before "
                             f"it, module[{previous}], has {arrays[-1][0].shape[0]} outputs")
        if weight.dtype == np.float64 or bias is not None and bias.dtype == np.float64:
            natural = np.dtype(np.float64)
        arrays.append((weight, bias))
    sizes = [int(arrays[0][0].shape[1])] + [int(w.shape[0]) for w, _ in arrays]
    dtype = dtype or natural
    weights, biases = [], []
    for (index, _), (weight, bias) in zip(linears, arrays):
        weights.append(np.ascontiguousarray(_narrowed(weight, dtype, f"module[{index}].weight").T))
        # Every bias set, zeros for Linear(bias=False): a model loading the state never keeps a bias of its own.
        biases.append(np.zeros(weight.shape[0], dtype=dtype) if bias is None
                      else _narrowed(bias, dtype, f"module[{index}].bias"))
    return {"sizes": sizes, "activations": activations, "dtype": dtype.name, "seed": None, "weights": weights,
            "biases": biases}


def _activation_name(nn, layer, index: int) -> str:
    """fastbp's name for the activation module ``layer``; raises for anything else."""
    known = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.LeakyReLU: "leaky_relu"}
    kind = type(layer)
    if kind in known:
        if kind is nn.LeakyReLU and layer.negative_slope != LEAKY_RELU_SLOPE:
            raise ValueError(f"module[{index}] is LeakyReLU(negative_slope={layer.negative_slope}); fastbp's "
                             f"leaky_relu has the fixed slope {LEAKY_RELU_SLOPE}")
        return known[kind]
    parent = next((base for base in (nn.Linear, nn.Identity, *known) if isinstance(layer, base)), None)
    if hasattr(layer, "has_uninitialized_params"):  # nn.LazyLinear, before it has seen an input
        why = " (a lazy module: run one forward pass so that it becomes an nn.Linear)"
    elif parent is not None:
        why = f", a subclass of nn.{parent.__name__} (its forward may differ, so fastbp takes exact types only)"
    else:
        why = ""
    raise TypeError(f"module[{index}] is {kind.__name__}{why}, which fastbp cannot represent; a Sequential for "
                    f"fastbp holds only {_SUPPORTED_MODULES}")


def _tensor_values(torch, tensor, index: int, name: str) -> np.ndarray:
    """A host numpy copy of a Linear parameter: float32, or float64 when stored so (float16 and bfloat16 widen
    exactly to float32); finite."""
    where = f"module[{index}].{name}"
    tensor = tensor.detach()
    if tensor.is_meta:
        raise ValueError(f"{where} is on the meta device and holds no values (materialise the module first)")
    if not tensor.is_floating_point():
        raise TypeError(f"{where} has dtype {tensor.dtype}; fastbp loads floating-point weights")
    wide = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    values = tensor.to(device="cpu", dtype=wide).numpy().copy()  # .copy(): never share torch's memory
    if not np.isfinite(values).all():
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(values))[0])
        raise ValueError(f"{where} holds {values[bad]} at index {bad}; fastbp parameters must be finite")
    return values


def _narrowed(values: np.ndarray, dtype: np.dtype, where: str) -> np.ndarray:
    with np.errstate(over="ignore"):  # reported below, as an error
        out = values.astype(dtype)
    if not np.isfinite(out).all():
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(out))[0])
        raise ValueError(f"{where} holds {values[bad]} at index {bad}, too large for {dtype.name}; convert with "
                         "dtype=numpy.float64")
    return out


def state_to_torch(state):
    """The ``torch.nn.Sequential`` computing the network of the model state dict ``state``, with copies of its
    weights in its dtype. Usually called as :meth:`fastbp.MLP.to_torch`.

    Parameters
    ----------
    state : dict
        A model state dict, as ``fastbp.MLP.state_dict()`` returns; checked first (its fields, dtype, shapes
        that connect, finite values).

    Returns
    -------
    torch.nn.Sequential
        ``Linear(sizes[0], sizes[1]), act_0, Linear(sizes[1], sizes[2]), ..., Linear(sizes[-2], sizes[-1])`` with
        every hidden activation a module (``nn.Identity`` for identity, ``nn.LeakyReLU(0.01)`` for leaky_relu),
        so Linear ``l`` sits at index ``2 l`` and the ``state_dict`` has the keys of :func:`write_safetensors`.
        Linear ``l``'s weight is ``state["weights"][l].T``, shape ``(out, in)``; dtype torch.float32 or float64
        as the state's. Nothing follows the last Linear: apply the loss's output transform (sigmoid, softmax)
        yourself.

    Raises
    ------
    ImportError
        PyTorch is not installed.
    TypeError, ValueError
        ``state`` is not a valid model state dict; the message names the field.

    Examples
    --------
    >>> import numpy as np, torch, fastbp
    >>> from fastbp.interop import state_to_torch
    >>> model = fastbp.MLP([4, 8, 2], activation="leaky_relu", dtype=np.float64, seed=0)
    >>> state_to_torch(model.state_dict())
    Sequential(
      (0): Linear(in_features=4, out_features=8, bias=True)
      (1): LeakyReLU(negative_slope=0.01)
      (2): Linear(in_features=8, out_features=2, bias=True)
    )
    >>> state_to_torch(model.state_dict())[0].weight.dtype
    torch.float64
    """
    torch = _import_torch("state_to_torch")
    nn = torch.nn
    state = _checked_state(state)
    dtype = torch.float64 if state["dtype"] == np.float64 else torch.float32
    modules = {"identity": nn.Identity, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU,
               "leaky_relu": lambda: nn.LeakyReLU(LEAKY_RELU_SLOPE)}
    layers = []
    for layer, (weight, bias) in enumerate(zip(state["weights"], state["biases"])):
        if layer > 0:
            layers.append(modules[state["activations"][layer - 1]]())
        # skip_init: no random initialisation that the copy below would overwrite at once.
        linear = nn.utils.skip_init(nn.Linear, weight.shape[0], weight.shape[1], dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight.T)))
            linear.bias.copy_(torch.from_numpy(np.ascontiguousarray(bias)))
        layers.append(linear)
    return nn.Sequential(*layers)
