"""fastbp.interop: safetensors files laid out as a PyTorch nn.Sequential, and conversion to and from PyTorch.

The public API is the MLP's methods (save_safetensors, load_safetensors, from_torch, to_torch); the format and its
checks are also tested on the interop functions they call, which convert between a file (or a torch module) and
a model state dict (MLP.state_dict()) and never import fastbp.model.

PyTorch and the safetensors package are the references where installed: a fastbp file loaded by
``load_state_dict(safetensors.torch.load_file(path))`` computes what fastbp computes, and a file saved by
``safetensors.torch.save_file`` loads into fastbp. The format tests need neither: a small reader and writer here,
independent of fastbp.interop, check and build the bytes (header length, JSON header, offsets, tensor data).
"""
import ast
import doctest
import json
import os
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest

import fastbp
from fastbp import interop
from fastbp.checkpoint import CheckpointError
from fastbp.interop import read_safetensors, state_from_torch, state_to_torch, write_safetensors

ACTIVATIONS = ["identity", "sigmoid", "tanh", "relu", "leaky_relu"]
# (sizes, hidden activations): no hidden layer, one, two, three with mixed activations.
ARCHITECTURES = [([3, 2], []), ([4, 6, 3], ["relu"]), ([5, 7, 6, 2], ["tanh", "leaky_relu"]),
                 ([2, 4, 5, 3, 1], ["sigmoid", "identity", "relu"])]
ARCH_IDS = ["no-hidden", "one-hidden", "two-hidden", "three-hidden"]
# float32 outputs differ from PyTorch's by summation order and exp/tanh rounding only (a few ulps); float64
# likewise, at float64's precision.
OUTPUT_TOLERANCES = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}


def make_model(sizes, activations, dtype, seed=1):
    model = fastbp.MLP(sizes, activations, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for b in model.biases:  # non-zero biases, so a bias mix-up would show
        b[...] = rng.normal(scale=0.5, size=b.shape)
    # Values with no short decimal form, a subnormal and a negative zero: only a bit-exact copy keeps them.
    w = model.weights[0]
    w[0, 0] = np.nextafter(w[0, 0], dtype(1))
    w.flat[-1] = np.finfo(dtype).smallest_subnormal
    model.biases[-1][0] = -0.0
    return model


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_same_model(loaded, model, seed=True):
    assert (loaded.sizes, loaded.activations, loaded.dtype) == (model.sizes, model.activations, model.dtype)
    if seed:
        assert loaded.seed == model.seed
    for a, b in zip(loaded.weights + loaded.biases, model.weights + model.biases):
        assert same_bits(a, b)


def assert_same_state(state, expected, seed=True):
    """``state`` is a model state dict equal to ``expected`` (MLP.state_dict()): plain fields equal and of the
    same types, every array bit for bit, C-ordered, writeable, no two sharing memory."""
    assert set(state) == set(expected) == {"sizes", "activations", "dtype", "seed", "weights", "biases"}
    for key in ("sizes", "activations", "dtype") + (("seed",) if seed else ()):
        assert state[key] == expected[key] and type(state[key]) is type(expected[key]), key
    assert all(type(s) is int for s in state["sizes"]) and all(type(a) is str for a in state["activations"])
    assert len(state["weights"]) == len(expected["weights"]) and len(state["biases"]) == len(expected["biases"])
    arrays = state["weights"] + state["biases"]
    for a, b in zip(arrays, expected["weights"] + expected["biases"]):
        assert same_bits(a, b) and a.flags.c_contiguous and a.flags.writeable
    assert not any(np.shares_memory(a, b) for i, a in enumerate(arrays) for b in arrays[:i])


def fastbp_outputs(model, X):
    """The network's raw output: with loss="mse" predict applies no output transform."""
    return fastbp.Trainer(model, loss="mse").predict(X)


# -- an independent reader and writer of the safetensors format ---------------------------------------------------
CODES = {"F32": "<f4", "F64": "<f8", "F16": "<f2"}


def read_raw(path):
    """(header length, header dict, data bytes) of a safetensors file, by the format's definition."""
    data = pathlib.Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8:8 + n].decode("utf-8")), data[8 + n:]


def raw_tensor(header, body, name):
    info = header[name]
    begin, end = info["data_offsets"]
    return np.frombuffer(body[begin:end], dtype=CODES[info["dtype"]]).reshape(info["shape"])


def encode(array, code):
    if code == "BF16":  # the high 16 bits of each float32
        return (np.ascontiguousarray(array, dtype="<f4").view("<u4") >> 16).astype("<u2").tobytes()
    return np.ascontiguousarray(array, dtype=CODES[code]).tobytes()


def write_raw(path, tensors, metadata=None, code="F32"):
    """A safetensors file holding ``tensors`` ({name: array}, each stored as ``code``, or {name: (code, array)}),
    back to back in the given order."""
    header, chunks, offset = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, value in tensors.items():
        tensor_code, array = value if isinstance(value, tuple) else (code, value)
        chunk = encode(array, tensor_code)
        header[name] = {"dtype": tensor_code, "shape": list(np.shape(array)),
                        "data_offsets": [offset, offset + len(chunk)]}
        chunks.append(chunk)
        offset += len(chunk)
    write_bytes(path, header, b"".join(chunks))


def write_bytes(path, header, body, header_text=None):
    text = (json.dumps(header) if header_text is None else header_text).encode("utf-8")
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(text)) + text + body)


def torch_layout(model):
    """{key: array} of the PyTorch Sequential's state_dict, built by hand from the fastbp model."""
    out = {}
    for layer, (w, b) in enumerate(zip(model.weights, model.biases)):
        out[f"{2 * layer}.weight"] = w.T
        out[f"{2 * layer}.bias"] = b
    return out


# -- fastbp's own round trip and the bytes it writes (no torch, no safetensors) ------------------------------------
@pytest.mark.parametrize("sizes, activations", ARCHITECTURES, ids=ARCH_IDS)
def test_round_trip_is_bit_exact(tmp_path, dtype, sizes, activations):
    model = make_model(sizes, activations, dtype)
    path = tmp_path / "model.safetensors"
    model.save_safetensors(path)
    assert_same_model(fastbp.MLP.load_safetensors(path), model)
    assert_same_model(fastbp.MLP.load_safetensors(path, activation=activations), model)  # the stored names, repeated


@pytest.mark.parametrize("sizes, activations", ARCHITECTURES, ids=ARCH_IDS)
def test_read_safetensors_returns_the_state_dict_written(tmp_path, dtype, sizes, activations):
    model = make_model(sizes, activations, dtype)
    path = tmp_path / "model.safetensors"
    write_safetensors(path, model.state_dict())
    state = read_safetensors(path)
    assert_same_state(state, model.state_dict())
    assert_same_model(fastbp.MLP.from_state_dict(state), model)
    model.save_safetensors(tmp_path / "b.safetensors")  # the method writes the same bytes
    assert (tmp_path / "b.safetensors").read_bytes() == path.read_bytes()


def test_every_activation_round_trips(tmp_path):
    path = tmp_path / "model.safetensors"
    for activation in ACTIVATIONS:
        model = make_model([3, 4, 4, 2], activation, np.float32)
        model.save_safetensors(path)
        assert_same_model(fastbp.MLP.load_safetensors(path), model)


def test_file_bytes_follow_the_format(tmp_path, dtype):
    model = make_model([5, 7, 6, 2], ["tanh", "leaky_relu"], dtype, seed=4)
    path = tmp_path / "model.safetensors"
    model.save_safetensors(path, metadata={"description": "a test model", "licence": "MIT"})
    n, header, body = read_raw(path)
    assert n % 8 == 0 and os.path.getsize(path) == 8 + n + len(body)  # data 8-byte aligned, nothing after it
    code = "F32" if dtype == np.float32 else "F64"
    assert sorted(header) == ["0.bias", "0.weight", "2.bias", "2.weight", "4.bias", "4.weight", "__metadata__"]
    for name, expected in torch_layout(model).items():
        assert header[name]["dtype"] == code and header[name]["shape"] == list(expected.shape)
        # Little-endian, C order, (out, in): the bytes PyTorch's Linear weight holds.
        assert raw_tensor(header, body, name).tobytes() == np.ascontiguousarray(expected, dtype=CODES[code]).tobytes()
    spans = sorted(tuple(info["data_offsets"]) for name, info in header.items() if name != "__metadata__")
    assert spans[0][0] == 0 and spans[-1][1] == len(body)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # back to back
    meta = header["__metadata__"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["description"] == "a test model" and meta["licence"] == "MIT"
    assert (meta["fastbp.format"], meta["fastbp.format_version"], meta["fastbp.dtype"]) == ("fastbp-mlp", "1",
                                                                                            np.dtype(dtype).name)
    assert json.loads(meta["fastbp.sizes"]) == [5, 7, 6, 2]
    assert json.loads(meta["fastbp.activations"]) == ["tanh", "leaky_relu"]
    assert json.loads(meta["fastbp.seed"]) == 4 and meta["fastbp.version"] == fastbp.__version__


def test_dtype_conversion_on_load(tmp_path):
    model = make_model([4, 6, 3], "relu", np.float64)
    path = tmp_path / "model.safetensors"
    model.save_safetensors(path)
    narrow = fastbp.MLP.load_safetensors(path, dtype=np.float32)
    assert narrow.dtype == np.float32
    for a, b in zip(narrow.weights + narrow.biases, model.weights + model.biases):
        assert same_bits(a, b.astype(np.float32))
    single = make_model([4, 6, 3], "relu", np.float32)
    single.save_safetensors(path)
    wide = fastbp.MLP.load_safetensors(path, dtype="float64")
    for a, b in zip(wide.weights + wide.biases, single.weights + single.biases):
        assert same_bits(a, b.astype(np.float64))  # widening is exact


def test_half_precision_tensors_widen_exactly(tmp_path):
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(3, 2)).astype(np.float16).astype(np.float32)
    # bfloat16 values: float32 with the low 16 bits cleared.
    w2 = (rng.normal(size=(2, 3)).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
    b0, b2 = np.array([1.5, -2.0, 0.25], np.float32), np.array([0.5, -0.125], np.float32)
    path = tmp_path / "half.safetensors"
    write_raw(path, {"0.weight": ("F16", w0), "0.bias": ("F16", b0), "2.weight": ("BF16", w2), "2.bias": ("BF16", b2)})
    model = fastbp.MLP.load_safetensors(path, activation="tanh")
    assert model.dtype == np.float32 and model.sizes == [2, 3, 2]
    assert same_bits(model.weights[0], np.ascontiguousarray(w0.T)) and same_bits(model.weights[1], w2.T.copy())
    assert same_bits(model.biases[0], b0) and same_bits(model.biases[1], b2)
    assert fastbp.MLP.load_safetensors(path, activation="tanh", dtype=np.float64).weights[1].dtype == np.float64


def test_mixed_f32_f64_file_loads_as_float64(tmp_path):
    path = tmp_path / "mixed.safetensors"
    w = np.arange(6, dtype=np.float64).reshape(3, 2) / 7
    write_raw(path, {"0.weight": ("F64", w), "0.bias": ("F32", np.ones(3))})
    model = fastbp.MLP.load_safetensors(path)  # a single Linear: no activation to name
    assert model.dtype == np.float64 and model.sizes == [2, 3] and same_bits(model.weights[0], w.T.copy())


def test_foreign_file_loads_with_activation(tmp_path):
    model = make_model([5, 7, 6, 2], ["sigmoid", "relu"], np.float64)
    path = tmp_path / "foreign.safetensors"
    write_raw(path, torch_layout(model), code="F64")  # no metadata, as safetensors.torch.save_file writes
    loaded = fastbp.MLP.load_safetensors(path, activation=["sigmoid", "relu"])
    assert_same_model(loaded, model, seed=False)
    assert loaded.seed is None
    assert fastbp.MLP.load_safetensors(path, activation="tanh").activations == ["tanh", "tanh"]
    X = np.random.default_rng(0).normal(size=(4, 5))
    np.testing.assert_array_equal(fastbp_outputs(loaded, X), fastbp_outputs(model, X))


def with_biases_7(state):
    """A model of ``state``'s architecture whose biases are all 7: loading the state into it must set every
    bias (zeros for a Linear without one), not leave the model's own."""
    model = fastbp.MLP(state["sizes"], state["activations"], dtype=np.dtype(state["dtype"]), seed=0)
    for b in model.biases:
        b[...] = 7
    model.load_state_dict(state)
    return model


def test_linear_without_bias_loads_with_zero_bias(tmp_path):
    rng = np.random.default_rng(0)
    w0, w2, b2 = rng.normal(size=(4, 3)), rng.normal(size=(2, 4)), rng.normal(size=2)
    path = tmp_path / "nobias.safetensors"
    write_raw(path, {"0.weight": w0, "2.weight": w2, "2.bias": b2}, code="F64")
    state = read_safetensors(path, activation="relu")
    assert len(state["biases"]) == 2 and same_bits(state["biases"][0], np.zeros(4))
    assert same_bits(state["biases"][1], b2)
    loaded = with_biases_7(state)
    assert loaded.biases[0].tobytes() == np.zeros(4).tobytes() and same_bits(loaded.biases[1], b2)
    model = fastbp.MLP.load_safetensors(path, activation="relu")
    assert model.biases[0].tobytes() == np.zeros(4).tobytes() and same_bits(model.biases[1], b2)
    X = rng.normal(size=(5, 3))
    expected = np.maximum(X @ w0.T, 0) @ w2.T + b2  # what Linear(bias=False), ReLU, Linear computes
    np.testing.assert_allclose(fastbp_outputs(model, X), expected, rtol=1e-13, atol=1e-14)
    np.testing.assert_array_equal(fastbp_outputs(loaded, X), fastbp_outputs(model, X))
    model.save_safetensors(path)  # fastbp trains biases, so it writes them
    assert "0.bias" in read_raw(path)[1]


def test_key_order_in_the_header_does_not_matter(tmp_path):
    model = make_model([4, 6, 3], "relu", np.float32)
    layout = torch_layout(model)
    path = tmp_path / "reordered.safetensors"
    write_raw(path, dict(reversed(list(layout.items()))))  # data stored last layer first
    assert_same_model(fastbp.MLP.load_safetensors(path, activation="relu"), model, seed=False)


def test_path_types_overwrite_and_no_temporary_files(tmp_path):
    model = make_model([3, 4, 2], "tanh", np.float32)
    model.save_safetensors(str(tmp_path / "a.safetensors"))
    model.save_safetensors(pathlib.Path(tmp_path / "b.safetensors"))
    model.save_safetensors(os.fsencode(tmp_path / "c.safetensors"))
    other = make_model([3, 5, 2], "relu", np.float64)
    other.save_safetensors(tmp_path / "c.safetensors")  # replaces the file
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "b.safetensors", "c.safetensors"]
    assert_same_model(fastbp.MLP.load_safetensors(os.fsencode(tmp_path / "a.safetensors")), model)
    assert_same_model(fastbp.MLP.load_safetensors(str(tmp_path / "c.safetensors")), other)


@pytest.mark.parametrize("failure", ["before-rename", "at-rename", "interrupt"])
def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch, failure):
    path = tmp_path / "model.safetensors"
    make_model([3, 4, 2], "relu", np.float32).save_safetensors(path)
    good = path.read_bytes()
    error = KeyboardInterrupt if failure == "interrupt" else OSError

    def broken(*args):
        raise error("crash")
    # fsync runs once the whole file is written to the temporary file, os.replace after it.
    monkeypatch.setattr(interop.os, "replace" if failure == "at-rename" else "fsync", broken)
    with pytest.raises(error):
        make_model([3, 5, 2], "tanh", np.float64).save_safetensors(path)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["model.safetensors"]  # the temporary file was removed


def test_save_rejects_bad_arguments(tmp_path):
    model = make_model([3, 4, 2], "relu", np.float32)
    path = tmp_path / "model.safetensors"
    with pytest.raises(TypeError, match=r"state must be a model state dict \(fastbp.MLP.state_dict\(\)\); got MLP"):
        write_safetensors(path, model)  # the model itself, not its state dict
    with pytest.raises(TypeError, match="metadata must be a mapping of str to str.*got list"):
        model.save_safetensors(path, metadata=[("a", "b")])
    with pytest.raises(TypeError, match="metadata must map str to str.*'n': int 3"):
        model.save_safetensors(path, metadata={"n": 3})
    with pytest.raises(ValueError, match="metadata key 'fastbp.sizes' is reserved"):
        model.save_safetensors(path, metadata={"fastbp.sizes": "[1, 2]"})
    with pytest.raises(FileNotFoundError, match="the folder .* does not exist"):
        model.save_safetensors(tmp_path / "missing" / "model.safetensors")
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        model.save_safetensors(tmp_path)
    with pytest.raises(TypeError, match="path must be a file name"):
        model.save_safetensors(3)
    model.weights[1][0, 0] = np.nan
    with pytest.raises(ValueError, match=r"model.weights\[1\] contains NaN or inf"):
        model.save_safetensors(path)
    with pytest.raises(ValueError, match=r"state\['weights'\]\[1\] contains NaN or inf"):
        write_safetensors(path, model.state_dict())
    model.weights[1][0, 0] = 0
    model.weights[0] = model.weights[0].astype(np.float64)  # replaced by an array the model cannot train
    with pytest.raises(TypeError, match=r"model.weights\[0\] must have the model's dtype float32; got float64"):
        model.save_safetensors(path)
    assert os.listdir(tmp_path) == []  # nothing written


def good_state():
    return make_model([3, 4, 2], "relu", np.float32).state_dict()


def changed(key, value, layer=None):
    """A good state with ``state[key]`` (or ``state[key][layer]``) replaced; value None removes the field."""
    state = good_state()
    if layer is not None:
        state[key][layer] = value
    elif value is None:
        del state[key]
    else:
        state[key] = value
    return state


BAD_STATES = [
    ("not-a-dict", [1, 2], TypeError, r"state must be a model state dict \(fastbp.MLP.state_dict\(\)\); got list"),
    ("no-biases", changed("biases", None), ValueError, r"the state lacks the field 'biases'"),
    ("sizes-str", changed("sizes", "3,4,2"), TypeError, r"state\['sizes'\] must be a list of layer widths"),
    ("sizes-zero", changed("sizes", [3, 0, 2]), ValueError, r"state\['sizes'\]\[1\] must be >= 1; got 0"),
    ("sizes-float", changed("sizes", [3, 4.0, 2]), TypeError, r"state\['sizes'\]\[1\] must be an integer"),
    ("one-layer", changed("sizes", [3]), ValueError, r"state\['sizes'\] needs at least two layers"),
    ("activations-str", changed("activations", "relu"), TypeError,
     r"state\['activations'\] must be a list of names, one per hidden layer"),
    ("activations-count", changed("activations", ["relu", "tanh"]), ValueError,
     r"state\['activations'\] must hold one name per hidden layer \(1\); got 2 names"),
    ("activation-unknown", changed("activations", ["gelu"]), ValueError,
     r"state\['activations'\]\[0\] must be one of .*got 'gelu'"),
    ("dtype", changed("dtype", "float16"), ValueError, r"state\['dtype'\] must be one of \['float32', 'float64'\]"),
    ("dtype-not-str", changed("dtype", np.float32), TypeError, r"state\['dtype'\] must be a string"),
    ("seed", changed("seed", -1), ValueError, r"state\['seed'\] must be >= 0; got -1"),
    ("weights-count", changed("weights", [np.zeros((3, 4), np.float32)]), ValueError,
     r"state\['weights'\] must be a list of 2 arrays, one per layer"),
    ("weights-do-not-connect", changed("weights", np.zeros((5, 2), np.float32), layer=1), ValueError,
     r"state\['weights'\]\[1\] must be an array of shape \(4, 2\) and dtype float32 \(the state's sizes and "
     r"dtype\); got shape \(5, 2\) and dtype float32"),
    ("weights-dtype", changed("weights", np.zeros((3, 4)), layer=0), ValueError,
     r"state\['weights'\]\[0\] must be an array of shape \(3, 4\) and dtype float32 .*dtype float64"),
    ("bias-list", changed("biases", [0.0, 0.0], layer=1), ValueError,
     r"state\['biases'\]\[1\] must be an array of shape \(2,\) .*got list"),
    ("bias-inf", changed("biases", np.array([0, np.inf], np.float32), layer=1), ValueError,
     r"state\['biases'\]\[1\] contains NaN or inf"),
]


@pytest.mark.parametrize("state, error, pattern", [c[1:] for c in BAD_STATES], ids=[c[0] for c in BAD_STATES])
def test_write_safetensors_checks_the_state(tmp_path, state, error, pattern):
    with pytest.raises(error, match=pattern):
        write_safetensors(tmp_path / "model.safetensors", state)
    assert os.listdir(tmp_path) == []  # nothing written
    write_safetensors(tmp_path / "model.safetensors", good_state())  # the table's states differ by one defect
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_load_rejects_bad_arguments(tmp_path):
    path = tmp_path / "model.safetensors"
    make_model([3, 4, 2], "relu", np.float32).save_safetensors(path)
    with pytest.raises(FileNotFoundError, match="no safetensors file at"):
        fastbp.MLP.load_safetensors(tmp_path / "missing.safetensors")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        fastbp.MLP.load_safetensors(tmp_path)
    with pytest.raises(ValueError, match="dtype must be numpy.float32 or numpy.float64; got float16"):
        fastbp.MLP.load_safetensors(path, dtype=np.float16)
    with pytest.raises(TypeError, match="activation must be a name, a list of names .* or None; got 3"):
        fastbp.MLP.load_safetensors(path, activation=3)
    with pytest.raises(ValueError, match=r"activation='tanh' disagrees with the activations this fastbp file was "
                                         r"saved with, \['relu'\]"):
        fastbp.MLP.load_safetensors(path, activation="tanh")
    with pytest.raises(ValueError, match=r"activation='tanh' disagrees"):
        read_safetensors(path, activation="tanh")
    with pytest.raises(TypeError, match="activation must be a name, a list of names .* or None; got 3"):
        read_safetensors(path, activation=3)


# -- files that must be refused -----------------------------------------------------------------------------------
GOOD = {"0.weight": np.arange(6.0).reshape(3, 2), "0.bias": np.ones(3), "2.weight": np.ones((2, 3)),
        "2.bias": np.zeros(2)}


def good_header(code="F32"):
    """The header of GOOD (4-byte values), offsets back to back, and its data length (68 bytes)."""
    header, offset = {}, 0
    for name in GOOD:
        shape = list(GOOD[name].shape)
        size = int(np.prod(shape)) * 4
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return header, offset


def corrupt(header=None, body=None, text=None, raw=None):
    """A file content: raw bytes, or a header (dict or text) and a data section (bytes or its length)."""
    def build(path):
        if raw is not None:
            pathlib.Path(path).write_bytes(raw)
            return
        h, size = good_header() if header is None else header
        data = body if isinstance(body, bytes) else b"\0" * (size if body is None else body)
        write_bytes(path, h, data, header_text=text)
    return build


def with_entry(name, **changes):
    h, size = good_header()
    h[name] = h[name] | changes
    return h, size


def tensors_file(tensors, **kwargs):
    return lambda path: write_raw(path, tensors, **kwargs)


OVERLAP = good_header()
OVERLAP[0]["0.bias"]["data_offsets"] = [20, 32]  # starts inside 0.weight's bytes [0, 24)
GAP = good_header()
for _name in ("0.bias", "2.weight", "2.bias"):
    GAP[0][_name]["data_offsets"] = [o + 4 for o in GAP[0][_name]["data_offsets"]]

BAD_FILES = [
    ("empty", corrupt(raw=b""), r"is truncated: a safetensors file starts with an 8-byte header length; it has only "
                                r"0 bytes"),
    ("5-bytes", corrupt(raw=b"\x01\x02\x03\x04\x05"), r"it has only 5 bytes"),
    ("header-past-end", corrupt(raw=struct.pack("<Q", 1000) + b"{}"),
     r"is not a safetensors file, or a truncated one: its first 8 bytes, read as the header length, give 1000 "
     r"bytes, beyond the end of the file \(10 bytes\)"),
    ("huge-header-length", corrupt(raw=b"\xff" * 8 + b"\0" * 100),
     r"is not a safetensors file: its first 8 bytes give a header length of \d+ bytes, over the format's limit"),
    ("zip", corrupt(raw=b"PK\x03\x04\x14\x00\x00\x00" + b"\0" * 100),
     r"is not a safetensors file: it is a zip archive: an .npz file \(a fastbp checkpoint: read it with "
     r"fastbp.MLP.load"),
    ("npy", corrupt(raw=b"\x93NUMPY\x01\x00" + b"\0" * 100), r"is not a safetensors file: it is a numpy .npy array"),
    ("pickle", corrupt(raw=b"\x80\x04\x95" + b"\0" * 100), r"is not a safetensors file: it is a Python pickle"),
    ("data-cut-short", corrupt(body=40), r"tensor '2.weight': its data_offsets \[36, 60\] reach beyond the 40 data "
                                         r"bytes after the header: the file is truncated or corrupt"),
    ("not-utf8", corrupt(raw=struct.pack("<Q", 4) + b"{\xff\xfe}"), r"its header is not UTF-8 text"),
    ("not-an-object", corrupt(text='["0.weight"]', body=0), r"its header does not start with '\{'"),
    ("bad-json", corrupt(text='{"0.weight": {"dtype": "F32",', body=0), r"the safetensors header is not valid JSON"),
    ("duplicate-key", corrupt(text='{"a": {}, "a": {}}', body=0), r"not valid JSON \(the key 'a' appears twice\)"),
    ("nan-literal", corrupt(text='{"a": NaN}', body=0), r"not valid JSON \(NaN is not JSON\)"),
    ("metadata-not-str", corrupt(header=(good_header()[0] | {"__metadata__": {"n": 1}}, 68)),
     r"'__metadata__' must map str to str"),
    ("entry-not-a-dict", corrupt(header=({"0.weight": [1, 2]}, 0)),
     r"tensor '0.weight' must be described by \{'dtype', 'shape', 'data_offsets'\}"),
    ("entry-lacks-offsets", corrupt(header=({"0.weight": {"dtype": "F32", "shape": [1, 1]}}, 0)),
     r"tensor '0.weight' must be described by"),
    ("dtype-not-str", corrupt(header=with_entry("0.bias", dtype=32)), r"tensor '0.bias': dtype must be a string"),
    ("negative-dim", corrupt(header=with_entry("0.bias", shape=[-3])),
     r"tensor '0.bias': shape must be a list of non-negative integers; got \[-3\]"),
    ("bool-dim", corrupt(header=with_entry("0.bias", shape=[True])), r"shape must be a list of non-negative integ"),
    ("offsets-reversed", corrupt(header=with_entry("0.bias", data_offsets=[36, 24])),
     r"tensor '0.bias': data_offsets must be \[begin, end\] with 0 <= begin <= end; got \[36, 24\]"),
    ("offsets-three", corrupt(header=with_entry("0.bias", data_offsets=[24, 30, 36])),
     r"data_offsets must be \[begin, end\]"),
    ("overlap", corrupt(header=OVERLAP), r"the data of tensors '0.weight' and '0.bias' overlap \(bytes 20 to 24\)"),
    ("gap", corrupt(header=GAP, body=72), r"4 bytes before tensor '0.bias' belong to no tensor"),
    ("gap-at-start", corrupt(header=with_entry("0.weight", data_offsets=[68, 92]), body=92),
     r"24 bytes before tensor '0.bias' belong to no tensor"),
    ("trailing-bytes", corrupt(body=76), r"8 bytes after the last tensor belong to no tensor"),
    ("size-mismatch", corrupt(header=with_entry("0.weight", shape=[3, 3])),
     r"tensor '0.weight' of shape \[3, 3\] and dtype F32 needs 36 bytes, but its data_offsets \[0, 24\] span 24"),
    ("int-dtype", corrupt(header=with_entry("0.bias", dtype="I32")),
     r"tensor '0.bias' has dtype I32; fastbp loads floating-point weights: F32 or F64 \(F16 and BF16 are widened"),
    ("fp8-dtype", corrupt(header=good_header(code="F8_E4M3")), r"tensor '0.weight' has dtype F8_E4M3"),
    ("no-tensors", corrupt(header=({"__metadata__": {"a": "b"}}, 0)), r"holds no tensors"),
    ("prefixed-keys", tensors_file({f"net.{k}": v for k, v in GOOD.items()}),
     r"unexpected tensor 'net.0.weight' \(expected only '<index>.weight' and '<index>.bias'\); every key starts "
     r"with 'net.'.*module.net.state_dict\(\)"),
    ("batchnorm-key", tensors_file(GOOD | {"0.running_mean": np.zeros(3)}), r"unexpected tensor '0.running_mean'"),
    ("leading-zero", tensors_file({"00.weight": GOOD["0.weight"]}), r"unexpected tensor '00.weight'"),
    ("odd-index", tensors_file({"0.weight": GOOD["0.weight"], "1.weight": GOOD["2.weight"]}),
     r"its Linear layers must sit at indices \[0, 2\] .* but it has parameters at indices \[0, 1\]"),
    ("index-missing", tensors_file({"0.weight": GOOD["0.weight"], "4.weight": GOOD["2.weight"]}),
     r"must sit at indices \[0, 2\] .* at indices \[0, 4\]"),
    ("not-from-zero", tensors_file({"2.weight": GOOD["0.weight"]}), r"must sit at indices \[0\] .* indices \[2\]"),
    ("bias-without-weight", tensors_file({"0.weight": GOOD["0.weight"], "2.bias": GOOD["2.bias"]}),
     r"tensor '2.bias' has no matching '2.weight'"),
    ("weight-1d", tensors_file({"0.weight": np.ones(3)}),
     r"tensor '0.weight' must be a Linear weight of shape \(out, in\) with out, in >= 1; got shape \(3,\)"),
    ("weight-0-wide", tensors_file({"0.weight": np.ones((3, 0))}), r"got shape \(3, 0\)"),
    ("weight-3d", tensors_file({"0.weight": np.ones((3, 2, 1))}), r"got shape \(3, 2, 1\)"),
    ("layers-do-not-connect", tensors_file(GOOD | {"2.weight": np.ones((2, 4))}),
     r"the layers do not connect: '2.weight' of shape \(2, 4\) takes 4 inputs, but the Linear before it, "
     r"'0.weight' of shape \(3, 2\), has 3 outputs"),
    ("bias-length", tensors_file(GOOD | {"0.bias": np.ones(4)}),
     r"tensor '0.bias' must have shape \(3,\) to match '0.weight' of shape \(3, 2\); got \(4,\)"),
    ("bias-2d", tensors_file(GOOD | {"2.bias": np.ones((2, 1))}), r"tensor '2.bias' must have shape \(2,\)"),
    ("nan-weight", tensors_file(GOOD | {"2.weight": np.array([[1, 2, 3], [4, np.nan, 6]])}),
     r"tensor '2.weight' holds nan at index \(1, 1\); fastbp parameters must be finite"),
    ("inf-bias", tensors_file(GOOD | {"0.bias": np.array([0, -np.inf, 0])}),
     r"tensor '0.bias' holds -inf at index \(1,\); fastbp parameters must be finite"),
    ("nan-bf16", tensors_file(GOOD | {"0.bias": ("BF16", np.array([0, np.nan, 0]))}),
     r"'0.bias' holds nan at index \(1,\); fastbp parameters must be finite"),
]


@pytest.mark.parametrize("load", [read_safetensors, fastbp.MLP.load_safetensors], ids=["read", "MLP.load"])
@pytest.mark.parametrize("build, pattern", [case[1:] for case in BAD_FILES], ids=[case[0] for case in BAD_FILES])
def test_bad_file_is_refused(tmp_path, build, pattern, load):
    path = tmp_path / "bad.safetensors"
    build(path)
    with pytest.raises(CheckpointError, match=pattern) as info:
        load(path, activation="relu")  # the one thing a foreign file may need from the caller
    assert isinstance(info.value, ValueError) and repr(str(path)) in str(info.value)  # names the file


def test_the_good_file_of_the_bad_file_table_loads(tmp_path):
    """The table's cases differ from this file by one defect each."""
    corrupt()(tmp_path / "a.safetensors")
    assert fastbp.MLP.load_safetensors(tmp_path / "a.safetensors", activation="relu").sizes == [2, 3, 2]
    tensors_file(GOOD)(tmp_path / "b.safetensors")
    assert fastbp.MLP.load_safetensors(tmp_path / "b.safetensors", activation="relu").sizes == [2, 3, 2]
    assert read_safetensors(tmp_path / "b.safetensors", activation="relu")["sizes"] == [2, 3, 2]


def test_too_large_for_float32_is_refused(tmp_path):
    path = tmp_path / "big.safetensors"
    write_raw(path, GOOD | {"0.bias": np.array([0, 1e300, 0])}, code="F64")
    with pytest.raises(CheckpointError, match=r"tensor '0.bias' holds 1e\+300 at index \(1,\), too large for "
                                              r"float32; load it with dtype=numpy.float64"):
        fastbp.MLP.load_safetensors(path, activation="relu", dtype=np.float32)
    assert fastbp.MLP.load_safetensors(path, activation="relu").biases[0][1] == 1e300


def test_foreign_file_needs_activations(tmp_path):
    path = tmp_path / "foreign.safetensors"
    write_raw(path, GOOD)
    with pytest.raises(CheckpointError, match=r"was not written by fastbp \(its metadata has no 'fastbp.' "
                                              r"architecture\).*pass them, e.g. load_safetensors\(path, "
                                              r"activation='relu'\), or a list with one name per hidden layer \(1\)"):
        fastbp.MLP.load_safetensors(path)
    with pytest.raises(ValueError, match=r"the file holds 2 Linear layers, so 1 hidden layer\(s\); got 2 names"):
        fastbp.MLP.load_safetensors(path, activation=["relu", "tanh"])
    with pytest.raises(ValueError, match=r"activation must be one of .*got 'gelu'"):
        fastbp.MLP.load_safetensors(path, activation="gelu")
    # read_safetensors checks the names itself (as fastbp.MLP does, same messages): its state is always valid.
    with pytest.raises(ValueError, match=r"activation must be one of .*got 'gelu'"):
        read_safetensors(path, activation="gelu")
    with pytest.raises(ValueError, match=r"activation\[0\] must be one of .*got 'gelu'"):
        read_safetensors(path, activation=["gelu"])
    with pytest.raises(CheckpointError, match=r"pass them"):
        read_safetensors(path)
    assert read_safetensors(path, activation=["tanh"])["activations"] == ["tanh"]


def rewrite_metadata(path, **changes):
    """Rewrite a fastbp file with some metadata entries changed (None: removed)."""
    _, header, body = read_raw(path)
    meta = header["__metadata__"]
    for key, value in changes.items():
        key = "fastbp." + key
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    write_bytes(path, header, body)


BAD_METADATA = [
    ("format", dict(format="other"), r"is corrupt: fastbp.format must be 'fastbp-mlp'; got 'other'"),
    ("format-missing", dict(format=None), r"fastbp.format must be 'fastbp-mlp'; got None"),
    ("newer-version", dict(format_version="2", version="9.0"),
     r"was written by a newer fastbp \(fastbp.format_version 2, fastbp 9.0\); this fastbp reads versions up to 1. "
     r"Upgrade fastbp"),
    ("version-not-a-number", dict(format_version="one"), r"invalid fastbp.format_version 'one'"),
    ("version-zero", dict(format_version="0"), r"invalid fastbp.format_version '0'"),
    ("sizes-not-json", dict(sizes="[3, 4"), r"fastbp.sizes is not JSON"),
    ("sizes-not-list", dict(sizes='"3,4,2"'), r"fastbp.sizes must be a list of layer widths"),
    ("sizes-disagree", dict(sizes="[3, 5, 2]"),
     r"does not match its tensors: fastbp.sizes is \[3, 5, 2\], the tensors' shapes give \[3, 4, 2\]"),
    ("unknown-activation", dict(activations='["gelu"]'), r"fastbp.activations must be a list of names from"),
    ("activation-count", dict(activations='["relu", "relu"]'), r"is corrupt: 2 activations for 1 hidden layers"),
    ("dtype-name", dict(dtype="float16"), r"fastbp.dtype must be 'float32' or 'float64'; got 'float16'"),
    ("dtype-disagrees", dict(dtype="float64"),
     r"does not match its tensors: fastbp.dtype is float64, the tensors are stored as float32"),
    ("seed", dict(seed="-1"), r"fastbp.seed must be a non-negative integer or null; got -1"),
]


@pytest.mark.parametrize("changes, pattern", [case[1:] for case in BAD_METADATA], ids=[c[0] for c in BAD_METADATA])
def test_corrupt_fastbp_metadata_is_refused(tmp_path, changes, pattern):
    path = tmp_path / "model.safetensors"
    make_model([3, 4, 2], "relu", np.float32).save_safetensors(path)
    rewrite_metadata(path, **changes)
    with pytest.raises(CheckpointError, match=pattern):
        fastbp.MLP.load_safetensors(path)
    with pytest.raises(CheckpointError, match=pattern):
        read_safetensors(path)


def test_without_fastbp_metadata_a_fastbp_file_is_a_foreign_file(tmp_path):
    model = make_model([3, 4, 2], "sigmoid", np.float32)
    path = tmp_path / "model.safetensors"
    model.save_safetensors(path, metadata={"note": "kept"})
    rewrite_metadata(path, **{k: None for k in ("format", "format_version", "version", "sizes", "activations",
                                                "dtype", "seed")})
    with pytest.raises(CheckpointError, match="pass them"):
        fastbp.MLP.load_safetensors(path)
    assert_same_model(fastbp.MLP.load_safetensors(path, activation="sigmoid"), model, seed=False)


# -- imports and the docstring examples -------------------------------------------------------------------------
def test_import_does_not_import_torch_or_safetensors():
    code = ("import sys, fastbp.interop; bad = [m for m in ('torch', 'safetensors') if m in sys.modules]; "
            "assert not bad, bad")
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in [str(pathlib.Path(__file__).parents[1]),
                                                                  os.environ.get("PYTHONPATH")] if p)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr


def test_interop_never_imports_fastbp_model():
    """The file-format module converts state dicts: importing the model (at module level or in a function)
    would make an import cycle, since fastbp.model imports it."""
    tree = ast.parse(pathlib.Path(interop.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add(("." * node.level) + (node.module or ""))
            imported.update(f"{'.' * node.level}{node.module + '.' if node.module else ''}{a.name}"
                            for a in node.names)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert ".checkpoint" in imported  # the walk sees the imports
    assert not {name for name in imported if name in (".model", "fastbp.model") or name.endswith(".MLP")
                or name == "MLP"}, imported


def test_clear_import_error_without_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ImportError, match=r"fastbp.interop.state_to_torch needs PyTorch, which is not installed: "
                                          r"pip install torch"):
        fastbp.MLP([2, 2], seed=0).to_torch()
    with pytest.raises(ImportError, match=r"fastbp.interop.state_from_torch needs PyTorch.*pip install torch"):
        fastbp.MLP.from_torch(object())
    with pytest.raises(ImportError, match=r"fastbp.interop.state_to_torch needs PyTorch"):
        state_to_torch(fastbp.MLP([2, 2], seed=0).state_dict())
    with pytest.raises(ImportError, match=r"fastbp.interop.state_from_torch needs PyTorch"):
        state_from_torch(object())


@pytest.mark.parametrize("name", ["write_safetensors", "read_safetensors", "state_from_torch", "state_to_torch"])
def test_docstring_examples(name):
    if name in ("state_from_torch", "state_to_torch"):
        pytest.importorskip("torch")
    tests = [t for t in doctest.DocTestFinder().find(interop) if t.name == f"fastbp.interop.{name}"]
    assert len(tests) == 1 and tests[0].examples
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(tests[0])
    assert runner.summarize(verbose=False).failed == 0


# -- PyTorch and the safetensors package as references -----------------------------------------------------------
@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.fixture
def st(torch):
    return pytest.importorskip("safetensors.torch")


def torch_outputs(torch, module, X):
    with torch.no_grad():
        return module(torch.from_numpy(X)).numpy()


def reference_module(torch, sizes, activations, dtype):
    """The Sequential a fastbp network corresponds to, built from PyTorch's own modules (not by to_torch)."""
    nn = torch.nn
    modules = {"identity": nn.Identity, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU,
               "leaky_relu": nn.LeakyReLU}  # LeakyReLU's default slope is 0.01
    layers = []
    for layer in range(len(sizes) - 1):
        if layer > 0:
            layers.append(modules[activations[layer - 1]]())
        layers.append(nn.Linear(sizes[layer], sizes[layer + 1]))
    return nn.Sequential(*layers).to(torch.float64 if dtype == np.float64 else torch.float32)


TORCH_CASES = ([(sizes, acts) for sizes, acts in ARCHITECTURES]
               + [([4, 9, 7, 3], [act, act]) for act in ACTIVATIONS])
TORCH_IDS = ARCH_IDS + ACTIVATIONS


@pytest.mark.parametrize("sizes, activations", TORCH_CASES, ids=TORCH_IDS)
def test_pytorch_loads_a_fastbp_file(tmp_path, torch, st, dtype, sizes, activations):
    model = make_model(sizes, activations, dtype)
    path = tmp_path / "model.safetensors"
    model.save_safetensors(path)
    module = reference_module(torch, sizes, activations, dtype)
    module.load_state_dict(st.load_file(path))  # strict: exactly the Sequential's keys and shapes
    X = np.random.default_rng(0).normal(scale=2.0, size=(16, sizes[0])).astype(dtype)
    expected = fastbp_outputs(model, X)
    got = torch_outputs(torch, module, X)
    assert got.dtype == expected.dtype
    np.testing.assert_allclose(got, expected, **OUTPUT_TOLERANCES[dtype])
    for name, value in torch_layout(model).items():  # and the tensors bit for bit
        assert st.load_file(path)[name].numpy().tobytes() == np.ascontiguousarray(value).tobytes()


def test_safetensors_reads_fastbp_metadata(tmp_path, st):
    from safetensors import safe_open

    path = tmp_path / "model.safetensors"
    make_model([3, 4, 2], "relu", np.float64, seed=5).save_safetensors(path, metadata={"note": "été"})
    with safe_open(str(path), framework="pt") as file:
        meta = file.metadata()
        assert sorted(file.keys()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert meta["note"] == "été" and meta["fastbp.activations"] == '["relu"]' and meta["fastbp.seed"] == "5"


@pytest.mark.parametrize("sizes, activations", TORCH_CASES, ids=TORCH_IDS)
def test_a_pytorch_file_loads_into_fastbp(tmp_path, torch, st, dtype, sizes, activations):
    torch.manual_seed(0)
    module = reference_module(torch, sizes, activations, dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()  # biases too, not PyTorch's small uniform start
    path = tmp_path / "torch.safetensors"
    st.save_file(module.state_dict(), path)
    model = fastbp.MLP.load_safetensors(path, activation=activations)
    assert model.sizes == sizes and model.activations == activations and model.dtype == dtype
    X = np.random.default_rng(1).normal(size=(16, sizes[0])).astype(dtype)
    np.testing.assert_allclose(fastbp_outputs(model, X), torch_outputs(torch, module, X), **OUTPUT_TOLERANCES[dtype])
    for layer, linear in enumerate(module[::2]):
        assert same_bits(model.weights[layer], linear.weight.detach().numpy().T.copy())


def test_a_pytorch_file_without_biases_and_in_half_precision(tmp_path, torch, st):
    nn = torch.nn
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 6, bias=False), nn.Tanh(), nn.Linear(6, 3))
    path = tmp_path / "torch.safetensors"
    for half in (torch.float16, torch.bfloat16):
        st.save_file(module.to(half).state_dict(), path)
        model = fastbp.MLP.load_safetensors(path, activation="tanh")
        assert model.dtype == np.float32 and model.biases[0].tobytes() == np.zeros(6, np.float32).tobytes()
        wide = module.float()
        assert same_bits(model.weights[0], wide[0].weight.detach().numpy().T.copy())
        assert same_bits(model.biases[1], wide[2].bias.detach().numpy())
        X = np.random.default_rng(2).normal(size=(8, 4)).astype(np.float32)
        np.testing.assert_allclose(fastbp_outputs(model, X), torch_outputs(torch, wide, X), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sizes, activations", ARCHITECTURES, ids=ARCH_IDS)
def test_to_torch_and_back_are_exact(torch, dtype, sizes, activations):
    model = make_model(sizes, activations, dtype)
    module = model.to_torch()
    assert isinstance(module, torch.nn.Sequential)
    assert list(module.state_dict()) == list(torch_layout(model))  # the keys of a saved file
    for name, value in torch_layout(model).items():
        assert module.state_dict()[name].numpy().tobytes() == np.ascontiguousarray(value).tobytes()
    X = np.random.default_rng(0).normal(size=(16, sizes[0])).astype(dtype)
    np.testing.assert_allclose(torch_outputs(torch, module, X), fastbp_outputs(model, X), **OUTPUT_TOLERANCES[dtype])
    back = fastbp.MLP.from_torch(module)
    assert_same_model(back, model, seed=False)
    assert back.seed is None
    state = state_from_torch(module)
    assert state["seed"] is None
    assert_same_state(state, model.state_dict(), seed=False)
    direct = state_to_torch(model.state_dict())
    assert list(direct.state_dict()) == list(module.state_dict()) and repr(direct) == repr(module)
    for name, value in module.state_dict().items():
        assert direct.state_dict()[name].numpy().tobytes() == value.numpy().tobytes()
    with torch.no_grad():  # copies, both ways
        module[0].weight.add_(1.0)
    assert_same_model(back, model, seed=False)
    back.weights[0] += 1
    assert not np.array_equal(back.weights[0], model.weights[0])


def test_to_torch_module_trains(torch):
    """Parameters, not buffers: PyTorch's optimizer can continue training a fastbp network."""
    module = make_model([3, 4, 2], "relu", np.float32).to_torch()
    assert all(p.requires_grad for p in module.parameters()) and len(list(module.parameters())) == 4
    before = module[0].weight.detach().clone()
    module(torch.ones(5, 3)).square().sum().backward()
    torch.optim.SGD(module.parameters(), lr=0.1).step()
    assert not torch.equal(before, module[0].weight)


def test_from_torch_accepts_identity_and_consecutive_linears(torch):
    nn = torch.nn
    relu = nn.ReLU(inplace=True)
    module = nn.Sequential(nn.Identity(), nn.Linear(3, 5), relu, nn.Identity(), nn.Linear(5, 4), nn.Linear(4, 4),
                           nn.LeakyReLU(0.01), nn.Linear(4, 6, bias=False), relu, nn.Linear(6, 2), nn.Identity())
    model = fastbp.MLP.from_torch(module)
    assert model.sizes == [3, 5, 4, 4, 6, 2]
    assert model.activations == ["relu", "identity", "leaky_relu", "relu"]  # the shared ReLU counts twice
    assert model.biases[3].tobytes() == np.zeros(6, np.float32).tobytes()
    state = state_from_torch(module)
    assert len(state["biases"]) == 5 and same_bits(state["biases"][3], np.zeros(6, np.float32))
    assert with_biases_7(state).biases[3].tobytes() == np.zeros(6, np.float32).tobytes()
    X = np.random.default_rng(3).normal(size=(8, 3)).astype(np.float32)
    np.testing.assert_allclose(fastbp_outputs(model, X), torch_outputs(torch, module, X), rtol=1e-5, atol=1e-6)


def test_from_torch_dtypes(torch):
    nn = torch.nn
    module = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2))
    assert fastbp.MLP.from_torch(module).dtype == np.float32
    wide = fastbp.MLP.from_torch(module, dtype=np.float64)
    assert wide.dtype == np.float64 and same_bits(wide.weights[0], module[0].weight.detach().double().numpy().T.copy())
    assert fastbp.MLP.from_torch(module.double()).dtype == np.float64
    narrow = fastbp.MLP.from_torch(module, dtype="float32")
    assert same_bits(narrow.weights[1], module[2].weight.detach().float().numpy().T.copy())
    half = module.to(torch.bfloat16)
    model = fastbp.MLP.from_torch(half)
    assert model.dtype == np.float32 and same_bits(model.weights[0], half[0].weight.detach().float().numpy().T.copy())
    mixed = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2).double())
    assert fastbp.MLP.from_torch(mixed).dtype == np.float64


BAD_MODULES = [
    ("not-sequential", lambda nn: nn.Linear(3, 2), TypeError,
     r"module must be a torch.nn.Sequential of nn.Linear, nn.ReLU.*; got Linear \(wrap it: "
     r"torch.nn.Sequential\(linear\)\)"),
    ("module-list", lambda nn: nn.ModuleList([nn.Linear(3, 2)]), TypeError, r"got ModuleList$"),
    ("conv", lambda nn: nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Conv1d(1, 1, 1)), TypeError,
     r"module\[2\] is Conv1d, which fastbp cannot represent; a Sequential for fastbp holds only nn.Linear, nn.ReLU, "
     r"nn.Sigmoid, nn.Tanh, nn.Identity and nn.LeakyReLU\(negative_slope=0.01\)"),
    ("gelu", lambda nn: nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)), TypeError,
     r"module\[1\] is GELU, which fastbp cannot represent"),
    ("dropout", lambda nn: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Dropout(), nn.Linear(4, 2)), TypeError,
     r"module\[2\] is Dropout"),
    ("nested", lambda nn: nn.Sequential(nn.Sequential(nn.Linear(3, 2))), TypeError, r"module\[0\] is Sequential"),
    ("subclass", lambda nn: nn.Sequential(type("MyLinear", (nn.Linear,), {})(3, 2)), TypeError,
     r"module\[0\] is MyLinear, a subclass of nn.Linear \(its forward may differ, so fastbp takes exact types only\)"),
    ("subclass-relu", lambda nn: nn.Sequential(nn.Linear(3, 4), type("R", (nn.ReLU,), {})(), nn.Linear(4, 2)),
     TypeError, r"module\[1\] is R, a subclass of nn.ReLU"),
    ("lazy", lambda nn: nn.Sequential(nn.LazyLinear(2)), TypeError,
     r"module\[0\] is LazyLinear \(a lazy module: run one forward pass so that it becomes an nn.Linear\)"),
    ("leaky-slope", lambda nn: nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.2), nn.Linear(4, 2)), ValueError,
     r"module\[1\] is LeakyReLU\(negative_slope=0.2\); fastbp's leaky_relu has the fixed slope 0.01"),
    ("trailing-activation", lambda nn: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Sigmoid()),
     ValueError, r"module\[3\] is a Sigmoid after the last nn.Linear, which fastbp cannot hold: its output layer has "
                 r"no activation, because the loss applies the output transform"),
    ("leading-activation", lambda nn: nn.Sequential(nn.Tanh(), nn.Linear(3, 2)), ValueError,
     r"module\[0\] is Tanh, before any nn.Linear: the first layer must be an nn.Linear"),
    ("two-activations", lambda nn: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Identity(), nn.Tanh(),
                                                 nn.Linear(4, 2)), ValueError,
     r"module\[3\] \(Tanh\) follows another activation, module\[1\] \(ReLU\): fastbp has one activation between two"),
    ("empty", lambda nn: nn.Sequential(), ValueError, r"module holds no nn.Linear"),
    ("only-identity", lambda nn: nn.Sequential(nn.Identity()), ValueError, r"module holds no nn.Linear"),
    ("shapes", lambda nn: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(5, 2)), ValueError,
     r"module\[2\] is Linear\(5, 2\), but the Linear before it, module\[0\], has 4 outputs"),
    ("zero-width", lambda nn: nn.Sequential(nn.Linear(3, 0)), ValueError,
     r"module\[0\] is Linear\(3, 0\); every fastbp layer has at least one unit"),
]


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")  # nn.Linear(3, 0)
@pytest.mark.parametrize("build, error, pattern", [c[1:] for c in BAD_MODULES], ids=[c[0] for c in BAD_MODULES])
def test_from_torch_refuses(torch, build, error, pattern):
    with pytest.raises(error, match=pattern):
        fastbp.MLP.from_torch(build(torch.nn))
    with pytest.raises(error, match=pattern):
        state_from_torch(build(torch.nn))


def test_from_torch_refuses_bad_values(torch):
    nn = torch.nn
    module = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"dtype must be numpy.float32 or numpy.float64"):
        fastbp.MLP.from_torch(module, dtype=np.int32)
    with torch.no_grad():
        module[2].bias[1] = float("nan")
    with pytest.raises(ValueError, match=r"module\[2\].bias holds nan at index \(1,\); fastbp parameters must be "
                                         r"finite"):
        fastbp.MLP.from_torch(module)
    big = nn.Sequential(nn.Linear(3, 4)).double()
    with torch.no_grad():
        big[0].weight[0, 1] = 1e300
    with pytest.raises(ValueError, match=r"module\[0\].weight holds 1e\+300 at index \(0, 1\), too large for "
                                         r"float32"):
        fastbp.MLP.from_torch(big, dtype=np.float32)
    assert fastbp.MLP.from_torch(big).weights[0][1, 0] == 1e300
    meta = nn.Sequential(nn.Linear(3, 4, device="meta"))
    with pytest.raises(ValueError, match=r"module\[0\].weight is on the meta device"):
        fastbp.MLP.from_torch(meta)


def test_to_torch_refuses_bad_models(torch):
    with pytest.raises(TypeError, match=r"state must be a model state dict \(fastbp.MLP.state_dict\(\)\); got "
                                        r"Sequential"):
        state_to_torch(torch.nn.Sequential())
    with pytest.raises(TypeError, match=r"state must be a model state dict .*got MLP"):
        state_to_torch(fastbp.MLP([3, 4, 2], seed=0))  # the model itself, not its state dict
    model = fastbp.MLP([3, 4, 2], seed=0)
    model.biases[0][2] = np.inf
    with pytest.raises(ValueError, match=r"model.biases\[0\] contains NaN or inf"):
        model.to_torch()
    with pytest.raises(ValueError, match=r"state\['biases'\]\[0\] contains NaN or inf"):
        state_to_torch(model.state_dict())
    with pytest.raises(ValueError, match=r"state\['activations'\]\[0\] must be one of .*got 'gelu'"):
        state_to_torch(changed("activations", ["gelu"]))
