"""The kernels as a public API (fastbp/kernels/API.md): the names exist and are documented with their true
signatures, the codes match fastbp's names, and a user's own @njit training step built from the public
kernels agrees with fastbp.Trainer and with a plain numpy reference."""
import ast
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
from numba import njit

import fastbp
import fastbp.kernels as K
from fastbp import losses, trainer
from fastbp.kernels import cpu, pointwise

ROOT = pathlib.Path(__file__).resolve().parents[1]
API_MD = (ROOT / "fastbp" / "kernels" / "API.md").read_text()
# "#### `name(arg, arg, ...)`": one heading per documented function.
HEADINGS = dict(re.findall(r"^#### `(\w+)\(([^)]*)\)`", API_MD, flags=re.M))
# "| `NAME` | value | `"name"` |": the codes table.
CODE_ROWS = re.findall(r'^\| `(\w+)` \| (\d+) \| `"(\w+)"` \|', API_MD, flags=re.M)


def test_every_public_name_exists_and_is_documented():
    assert list(K._CPU_NAMES) == cpu.__all__
    assert K.__all__ == [*cpu.__all__, *pointwise.__all__, "Layout"]
    assert len(set(K.__all__)) == len(K.__all__)
    for module in (cpu, pointwise, K):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"
    for name in K.__all__:
        assert getattr(K, name) is getattr(cpu if name in cpu.__all__ else pointwise, name, K.Layout)
        assert re.search(rf"`{name}[`(]", API_MD), f"{name} is not documented in fastbp/kernels/API.md"


def test_cpu_and_cuda_share_the_vocabulary():
    """The kernels both targets have: same names, same parameters in the same order (outputs first). cuda.py is
    read, not imported (importing it would load numba.cuda into this process)."""
    tree = ast.parse((ROOT / "fastbp" / "kernels" / "cuda.py").read_text())
    cuda_functions = {node.name: [a.arg for a in node.args.args] for node in tree.body
                      if isinstance(node, ast.FunctionDef)}
    assert list(cpu.VOCABULARY) == cpu.__all__[:len(cpu.VOCABULARY)]
    for name in cpu.VOCABULARY:
        assert name in cuda_functions, f"fastbp.kernels.cuda has no {name}"
        assert list(inspect.signature(getattr(cpu, name).py_func).parameters) == cuda_functions[name], name


def test_documented_signatures_are_the_real_ones():
    functions = [name for name in K.__all__ if callable(getattr(K, name)) and name != "Layout"]
    assert sorted(HEADINGS) == sorted(functions)
    for name, documented in HEADINGS.items():
        real = list(inspect.signature(getattr(K, name).py_func).parameters)
        assert [a.strip() for a in documented.split(",")] == real, name


def test_codes_match_fastbp_names():
    tables = {**pointwise.ACTIVATIONS, **pointwise.LOSSES, **pointwise.OPTIMIZERS}
    assert len(CODE_ROWS) == len(tables)
    for constant, value, name in CODE_ROWS:
        assert getattr(K, constant) == int(value) == tables[name], constant
    assert pointwise.ACTIVATION_NAMES == {code: name for name, code in pointwise.ACTIVATIONS.items()}
    assert pointwise.LOSS_NAMES == {code: name for name, code in pointwise.LOSSES.items()}
    # The names the public classes take are exactly the tables' names, with the same codes.
    assert {name: spec.code for name, spec in losses.LOSSES.items()} == pointwise.LOSSES
    assert set(trainer.OPTIMIZERS) == set(pointwise.OPTIMIZERS)
    for name, code in pointwise.ACTIVATIONS.items():
        assert fastbp.MLP([2, 3, 1], name).activation_codes()[0] == code


def test_importing_the_api_imports_no_cuda():
    code = ("import sys; from fastbp.kernels import dense_forward, TANH, Layout; "
            "print(any(m == 'numba.cuda' or m.startswith('numba.cuda.') or m.startswith('numba_cuda') "
            "for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "False"


# --- one training step in the user's own numba code --------------------------------------------------------------
SIZES = [3, 5, 4, 2]
# tanh: the products call its slot, filled on request, from the user's function; identity: a second code per
# layer. Trainer.fit trains this network with a fused narrow kernel other tests compile too (tanh only).
ACTIVATIONS = ["tanh", "identity"]
LR = 0.1


@njit
def user_sgd_step(params, grads, acts, deltas, row_losses, X, Y, sizes, param_offsets, unit_offsets, act_codes,
                  lr):
    """One full-batch SGD step on the mse of X (B, n_in), Y (B, k), written only with public kernels."""
    n = X.shape[0]
    n_layers = sizes.shape[0] - 1
    dtype = params.dtype.type
    inputs = K.activation_view(acts, sizes, unit_offsets, n, 0, n)
    for i in range(n):
        for j in range(X.shape[1]):
            inputs[i, j] = X[i, j]
    for layer in range(n_layers):
        K.dense_forward(K.activation_view(acts, sizes, unit_offsets, n, layer + 1, n),
                        K.activation_view(acts, sizes, unit_offsets, n, layer, n),
                        K.weight_view(params, sizes, param_offsets, layer),
                        K.bias_view(params, sizes, param_offsets, layer), act_codes[layer])
    logits = K.activation_view(acts, sizes, unit_offsets, n, n_layers, n)
    K.loss_grad(K.activation_view(deltas, sizes, unit_offsets, n, n_layers, n), row_losses, logits, Y, K.MSE,
                dtype(1.0 / K.loss_divisor(K.MSE, n, Y.shape[1])))
    for layer in range(n_layers - 1, -1, -1):
        dout = K.activation_view(deltas, sizes, unit_offsets, n, layer + 1, n)
        inp = K.activation_view(acts, sizes, unit_offsets, n, layer, n)
        K.dense_backward_params(K.weight_view(grads, sizes, param_offsets, layer),
                                K.bias_view(grads, sizes, param_offsets, layer), dout, inp)
        if layer > 0:
            K.dense_backward_input(K.activation_view(deltas, sizes, unit_offsets, n, layer, n), dout,
                                   K.weight_view(params, sizes, param_offsets, layer), inp, act_codes[layer - 1])
    zero = dtype(0.0)
    K.sgd_update(params, grads, grads, lr, zero, zero, zero, False, True)  # no momentum: velocity unused
    return row_losses.sum() / K.loss_divisor(K.MSE, n, Y.shape[1])


def numpy_sgd_step(weights, biases, X, Y, lr):
    """The same step from the definitions, in float64: forward, mse gradient, backward, SGD."""
    act = {"tanh": np.tanh, "identity": lambda z: z}
    dact = {"tanh": lambda z: 1.0 - np.tanh(z) ** 2, "identity": np.ones_like}
    A, Z = [X], []
    for layer, (w, b) in enumerate(zip(weights, biases)):
        Z.append(A[-1] @ w + b)
        A.append(act[ACTIVATIONS[layer]](Z[-1]) if layer < len(ACTIVATIONS) else Z[-1])
    loss = np.mean((A[-1] - Y) ** 2)
    delta = 2.0 * (A[-1] - Y) / Y.size
    new_w, new_b = [None] * len(weights), [None] * len(weights)
    for layer in range(len(weights) - 1, -1, -1):
        new_w[layer] = weights[layer] - lr * (A[layer].T @ delta)
        new_b[layer] = biases[layer] - lr * delta.sum(axis=0)
        if layer > 0:
            delta = (delta @ weights[layer].T) * dact[ACTIVATIONS[layer - 1]](Z[layer - 1])
    return loss, new_w, new_b


def test_user_njit_step_matches_trainer_and_numpy():
    rng = np.random.default_rng(7)
    X = rng.normal(size=(7, SIZES[0])).astype(np.float32)
    Y = rng.normal(size=(7, SIZES[-1])).astype(np.float32)
    model = fastbp.MLP(SIZES, ACTIVATIONS, dtype=np.float32, seed=3)
    start = [w.astype(np.float64) for w in model.weights], [b.astype(np.float64) for b in model.biases]
    layout = model.layout

    params = model.flat_parameters()
    grads = np.zeros_like(params)
    acts = np.zeros(layout.workspace_size(len(X)), np.float32)
    deltas = np.zeros_like(acts)
    row_losses = np.zeros(len(X), np.float32)
    user_loss = user_sgd_step(params, grads, acts, deltas, row_losses, X, Y, layout.sizes, layout.param_offsets,
                              layout.unit_offsets, model.activation_codes(), np.float32(LR))

    fit = fastbp.Trainer(model, loss="mse", optimizer="sgd", lr=LR, batch_size=None, seed=0)
    history = fit.fit(X, Y, epochs=1)
    trainer_params = model.flat_parameters()

    ref_loss, ref_w, ref_b = numpy_sgd_step(*start, X.astype(np.float64), Y.astype(np.float64), LR)
    reference = np.zeros(layout.n_params)
    layout.pack(ref_w, ref_b, reference)

    tol = dict(rtol=2e-5, atol=2e-6)
    assert params.dtype == np.float32
    np.testing.assert_allclose(params, trainer_params, **tol)
    np.testing.assert_allclose(params, reference, **tol)
    np.testing.assert_allclose(user_loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(history.loss[0], ref_loss, rtol=1e-5)
    assert np.abs(params - layout.pack(*start, np.zeros(layout.n_params))).max() > 1e-3  # the step did move


# --- the example --------------------------------------------------------------------------------------------------
def test_online_learning_example_runs():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "examples/online_learning_njit.py", "--steps", "3000",
                             "--trainer-steps", "5"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "held-out mse" in result.stdout and "us/step" in result.stdout


USERS_CACHED_MODULE = '''
import json
import numpy as np
from numba import njit
from fastbp.kernels import cpu, pointwise


@njit(cache=True)
def layer(out, dinp, dweight, dbias, inp, weight, bias, dout):
    cpu.dense_forward(out, inp, weight, bias, pointwise.RELU)
    cpu.dense_backward(dinp, dweight, dbias, dout, inp, weight, pointwise.TANH)


def run():
    rng = np.random.default_rng(0)
    inp = np.tanh(rng.standard_normal((64, 100))).astype(np.float32)  # a tanh layer's output
    weight = rng.standard_normal((100, 128)).astype(np.float32)
    bias, dout = rng.standard_normal(128).astype(np.float32), rng.standard_normal((64, 128)).astype(np.float32)
    out, dinp = np.full((64, 128), np.nan, np.float32), np.full((64, 100), np.nan, np.float32)
    dweight, dbias = np.full_like(weight, np.nan), np.full_like(bias, np.nan)
    layer(out, dinp, dweight, dbias, inp, weight, bias, dout)
    i, w, d = inp.astype(np.float64), weight.astype(np.float64), dout.astype(np.float64)
    errors = [np.abs(out - np.maximum(i @ w + bias, 0)).max(), np.abs(dweight - i.T @ d).max(),
              np.abs(dbias - d.sum(0)).max(), np.abs(dinp - (d @ w.T) * (1 - i ** 2)).max()]
    print(json.dumps({"loaded": sum(layer.stats.cache_hits.values()), "error": float(max(errors))}))
'''


def test_a_users_cached_function_calling_the_vocabulary_runs_in_a_new_process(tmp_path):
    """A user's ``@njit(cache=True)`` function that calls the vocabulary, loaded from numba's cache by a new process:
    the vocabulary calls the product engine by symbol, and numba runs what fastbp put into the function's library
    (its reload_init: fastbp._jit._FillOnLoad) before loading it, so the engine's slots are filled before its code
    runs. Without that, the call raised "_product_by_symbol (float32) was called before it was compiled". The
    numbers are checked against numpy in both processes (the one that compiles, the one that loads)."""
    (tmp_path / "users_module.py").write_text(USERS_CACHED_MODULE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    for loaded in (0, 1):
        result = subprocess.run([sys.executable, "-c", "import users_module; users_module.run()"], env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["loaded"] == loaded and report["error"] < 1e-3, report
