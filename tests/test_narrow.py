"""The fused narrow-network kernel (fastbp.kernels.narrow) against a float64 numpy reference (tests/naive.py),
against the serial reference train_epochs_naive, and against the general path fastbp.kernels.cpu.train_epochs;
and the accuracy of its vectorised math (exp from exponent bits, expm1, sigmoid, tanh, log, log1p)."""
import numba
import numpy as np
import pytest
from numba import njit

from fastbp._jit import read_only
from fastbp.kernels import cpu, narrow
from fastbp.kernels.pointwise import (
    ACTIVATIONS,
    ADAM,
    H_BETA1,
    H_BETA2,
    H_DAMPENING,
    H_EPS,
    H_MOMENTUM,
    H_NESTEROV,
    H_WEIGHT_DECAY,
    LOSSES,
    N_HYPER,
    SGD,
    loss_divisor,
)
from fastbp.layout import Layout

from . import naive

EPS = {np.float32: float(np.finfo(np.float32).eps), np.float64: float(np.finfo(np.float64).eps)}


# --- the vectorised math -------------------------------------------------------------------------------------
FUNCTIONS = ("exp_bits", "exp_nonpositive", "expm1_nonpositive", "sigmoid_bits", "tanh_bits", "log_bits",
             "log1p_unit")


@njit(fastmath=narrow.FAST["fastmath"], error_model="numpy")
def _apply_lanes(out, x, which):
    # out = f(x) one lane vector at a time (len(x) a multiple of the lanes), as the fused kernel uses them.
    lanes = narrow.lane_count(x)
    for at in range(0, x.shape[0], lanes):
        v = narrow.vload(x, at)
        if which == 0:
            r = narrow.exp_bits(v)
        elif which == 1:
            r = narrow.exp_nonpositive(v)
        elif which == 2:
            r = narrow.expm1_nonpositive(v)
        elif which == 3:
            r = narrow.sigmoid_bits(v)
        elif which == 4:
            r = narrow.tanh_bits(v)
        elif which == 5:
            r = narrow.log_bits(v)
        else:
            r = narrow.log1p_unit(v)
        narrow.vstore(out, at, r)


@njit(fastmath=narrow.FAST["fastmath"], error_model="numpy")
def _apply_scalar_exp(out, x):
    for i in range(x.shape[0]):
        out[i] = narrow.exp_bits(x[i])


def lanes_apply(name, x):
    lanes = narrow.LANES[x.dtype]
    padded = np.concatenate([x, np.full(-len(x) % lanes, x[0], x.dtype)])
    out = np.full_like(padded, np.nan)
    _apply_lanes(out, padded, FUNCTIONS.index(name))
    return out[:len(x)]


def max_relative_error(got, exact, dtype):
    got = got.astype(np.float64)
    scale = np.maximum(np.abs(exact), np.finfo(dtype).tiny)
    return float(np.max(np.abs(got - exact) / scale))


def exp_grid(dtype):
    lo, hi = ((narrow.EXP_LO_32, narrow.EXP_HI_32) if dtype == np.float32 else (narrow.EXP_LO_64, narrow.EXP_HI_64))
    x = np.linspace(lo, hi, 1 << 20).astype(dtype)
    return x[(x >= lo) & (x <= hi)]


@pytest.mark.parametrize("form", ["lanes", "scalar"])
def test_exp_bits_accuracy(form, dtype):
    x = exp_grid(dtype)
    if form == "lanes":
        got = lanes_apply("exp_bits", x)
    else:
        got = np.empty_like(x)
        _apply_scalar_exp(got, x)
    # Measured here: 0.71 eps (float32), 1.00 eps (float64); pointwise.exp_fast compiled with cpu.FAST: 2.5 eps
    # and 108 eps away from its range's ends (and inf for x in [88.38, 88.72], [709.44, 709.78]).
    bound = 1.0 if dtype == np.float32 else 1.2
    assert max_relative_error(got, np.exp(x.astype(np.float64)), dtype) <= bound * EPS[dtype]


def test_exp_bits_ends(dtype):
    finfo = np.finfo(dtype)
    lo, hi = ((narrow.EXP_LO_32, narrow.EXP_HI_32) if dtype == np.float32 else (narrow.EXP_LO_64, narrow.EXP_HI_64))
    below = np.array([-np.inf, -1e4, np.nextafter(dtype(lo), dtype(-np.inf)), lo - 1], dtype)
    above = np.array([np.inf, 1e4, np.nextafter(dtype(hi), dtype(np.inf)), hi + 1], dtype)
    assert np.all(lanes_apply("exp_bits", below) == 0)
    assert np.all(lanes_apply("exp_bits", above) == np.inf)
    assert np.isnan(lanes_apply("exp_bits", np.array([np.nan, 1.0], dtype))[0])
    # The ends of the range are finite and normal, and still accurate.
    ends = np.array([lo, hi], dtype)
    got = lanes_apply("exp_bits", ends)
    assert np.all(np.isfinite(got)) and np.all(got >= finfo.tiny)
    assert max_relative_error(got, np.exp(ends.astype(np.float64)), dtype) <= 2 * EPS[dtype]


# (name, grid, exact, max error in eps): the bounds are what was measured here, rounded up.
def _math_cases(dtype):
    lo = narrow.EXP_LO_32 if dtype == np.float32 else narrow.EXP_LO_64
    n = 1 << 18
    small = np.geomspace(1e-30, 1, n // 4)
    return [
        ("exp_nonpositive", np.linspace(lo, 0, n), np.exp, 1.2),
        ("expm1_nonpositive", np.concatenate([np.linspace(lo, 0, n), -small]), np.expm1, 1.5),
        ("tanh_bits", np.concatenate([np.linspace(-30, 30, n), small, -small]), np.tanh, 2.0),
        # sigmoid: where the result is at least the smallest normal number (below it, 0).
        ("sigmoid_bits", np.linspace(lo + 0.01, 100, n), lambda z: 1 / (1 + np.exp(-z)), 2.5),
        ("log_bits", np.concatenate([np.geomspace(np.finfo(dtype).tiny, np.finfo(dtype).max / 4, n),
                                     np.linspace(1, 20, n)]), np.log, 2.5),
        ("log1p_unit", np.concatenate([np.linspace(0, 1, n), small]), np.log1p, 2.5),
    ]


@pytest.mark.parametrize("case", range(6), ids=[c[0] for c in _math_cases(np.float32)])
def test_vector_math_accuracy(case, dtype):
    name, grid, exact, bound = _math_cases(dtype)[case]
    x = grid.astype(dtype)
    got = lanes_apply(name, x)
    assert max_relative_error(got, exact(x.astype(np.float64)), dtype) <= bound * EPS[dtype]


def test_vector_math_special_values(dtype):
    assert np.all(np.isnan(lanes_apply("sigmoid_bits", np.array([np.nan], dtype))))
    assert np.all(np.isnan(lanes_apply("tanh_bits", np.array([np.nan], dtype))))
    assert list(lanes_apply("sigmoid_bits", np.array([-np.inf, -1e4, 0, 1e4, np.inf], dtype))) == [0, 0, 0.5, 1, 1]
    assert list(lanes_apply("tanh_bits", np.array([-np.inf, -50, -0.0, 50, np.inf], dtype))) == [-1, -1, 0, 1, 1]
    assert list(lanes_apply("expm1_nonpositive", np.array([-np.inf, -1e4, 0], dtype))) == [-1, -1, 0]
    assert list(lanes_apply("log_bits", np.array([1, np.inf], dtype))) == [0, np.inf]
    assert np.isnan(lanes_apply("log_bits", np.array([np.nan], dtype))[0])
    ends = lanes_apply("log1p_unit", np.array([0, 1], dtype))
    assert ends[0] == 0 and abs(ends[1] - np.log(2)) <= 2 * EPS[dtype]


# --- training: the reference ---------------------------------------------------------------------------------
def reference_fit(sizes, activations, loss, weights, biases, X, Y, orders, lrs, batch_size, optimizer, hyper):
    """Float64 textbook training with tests/naive.py: (weights, biases, epoch losses)."""
    W = [np.asarray(w, np.float64) for w in weights]
    B = [np.asarray(b, np.float64) for b in biases]
    X = np.asarray(X, np.float64)
    Y = np.asarray(Y, np.float64)
    n, k, n_layers = X.shape[0], Y.shape[1], len(W)
    state, losses = {}, []
    for epoch, lr in enumerate(lrs):
        order = orders[epoch] if orders.shape[1] else np.arange(n)
        total = 0.0
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            value, dW, dB = naive.loss_and_grads(W, B, activations, loss, X[rows], Y[rows])
            total += value * loss_divisor(LOSSES[loss], len(rows), k)
            if optimizer == "adam":
                new = naive.adam_step(W + B, dW + dB, state, lr, (hyper[H_BETA1], hyper[H_BETA2]), hyper[H_EPS],
                                      hyper[H_WEIGHT_DECAY])
            else:
                new = naive.sgd_step(W + B, dW + dB, state, lr, hyper[H_MOMENTUM], hyper[H_DAMPENING],
                                     hyper[H_WEIGHT_DECAY], bool(hyper[H_NESTEROV]))
            W, B = new[:n_layers], new[n_layers:]
        losses.append(total / loss_divisor(LOSSES[loss], n, k))
    return W, B, np.array(losses)


def make_hyper(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, betas=(0.9, 0.999), eps=1e-8):
    hyper = np.zeros(N_HYPER)
    hyper[H_MOMENTUM], hyper[H_DAMPENING], hyper[H_WEIGHT_DECAY] = momentum, dampening, weight_decay
    hyper[H_NESTEROV], hyper[H_BETA1], hyper[H_BETA2], hyper[H_EPS] = float(nesterov), betas[0], betas[1], eps
    return hyper


class Problem:
    """One training set-up: data, initial weights, hyper-parameters, and the argument lists of each kernel."""

    def __init__(self, sizes, activations, loss, optimizer, hyper, n, batch_size, epochs, lr, dtype, seed=0,
                 shuffle=True):
        rng = np.random.default_rng(seed)
        self.sizes, self.activations, self.loss, self.optimizer = sizes, activations, loss, optimizer
        self.hyper, self.batch_size, self.dtype = hyper, batch_size, dtype
        self.layout = Layout.from_sizes(sizes)
        self.X = rng.normal(size=(n, sizes[0])).astype(dtype)
        k = sizes[-1]
        if loss == "mse":
            self.Y = rng.normal(size=(n, k)).astype(dtype)
        elif loss == "binary_cross_entropy":
            self.Y = rng.uniform(size=(n, k)).round(1).astype(dtype)
        elif loss == "poisson":
            self.Y = rng.poisson(2.0, size=(n, k)).astype(dtype)
        else:  # one-hot rows, and a few rows of class probabilities
            self.Y = naive.one_hot(rng.integers(0, k, size=n), k).astype(dtype)
            self.Y[:3] = rng.dirichlet(np.ones(k), size=3)
        # read-only, as the CPU backend hands data to the kernels: every path below runs the kernels the trainer's
        # tests compiled (see fastbp._jit.read_only)
        self.X.flags.writeable = self.Y.flags.writeable = False
        self.weights, self.biases = [], []
        for a, b in zip(sizes[:-1], sizes[1:]):
            bound = 1 / np.sqrt(a)
            self.weights.append(rng.uniform(-bound, bound, size=(a, b)).astype(dtype))
            self.biases.append(rng.uniform(-bound, bound, size=b).astype(dtype))
        self.params0 = np.empty(self.layout.n_params, dtype)
        self.layout.pack(self.weights, self.biases, self.params0)
        self.act_codes = np.array([ACTIVATIONS[a] for a in activations] + [ACTIVATIONS["identity"]], np.int64)
        self.orders = (np.stack([rng.permutation(n) for _ in range(epochs)]) if shuffle
                       else np.empty((epochs, 0), np.int64))
        self.lrs = np.full(epochs, lr)
        self.opt_code = ADAM if optimizer == "adam" else SGD

    def state(self):
        P = self.layout.n_params
        return self.params0.copy(), np.zeros((2, P), self.dtype), np.zeros(1, np.int64)

    def run_narrow(self, kernel=None, orders=None, lrs=None, target_loss=-np.inf, state=None, work=None):
        """(completed, losses, params, opt_state, steps_done, work) after train_epochs_narrow (or kernel)."""
        params, opt_state, steps = self.state() if state is None else state
        orders = self.orders if orders is None else orders
        lrs = self.lrs if lrs is None else lrs
        P = self.layout.n_params
        if work is None:
            work = narrow.make_workspace(self.sizes, self.dtype, self.X.shape[0])
        losses = np.full(len(lrs), np.nan)
        lay = self.layout
        completed = (kernel or narrow.train_epochs_narrow)(
            params, opt_state, steps, np.empty(P, self.dtype), np.empty((3, P), self.dtype), work, self.X,
            self.Y, orders, lrs, losses, lay.sizes, lay.param_offsets, lay.unit_offsets, self.act_codes,
            LOSSES[self.loss], self.opt_code, self.hyper, self.batch_size, target_loss)
        return completed, losses, params, opt_state, steps, work

    def run_naive(self):
        params, opt_state, steps = self.state()
        P = self.layout.n_params
        work = np.empty(narrow.naive_workspace_length(self.sizes), self.dtype)
        losses = np.full(len(self.lrs), np.nan)
        lay = self.layout
        completed = narrow.train_epochs_naive(
            params, opt_state, steps, np.empty(P, self.dtype), np.empty((3, P), self.dtype), work, self.X, self.Y,
            self.orders, self.lrs, losses, lay.sizes, lay.param_offsets, lay.unit_offsets, self.act_codes,
            LOSSES[self.loss], self.opt_code, self.hyper, self.batch_size, -np.inf)
        return completed, losses, params, opt_state, steps

    def run_cpu(self, lrs=None, target_loss=-np.inf):
        params, opt_state, steps = self.state()
        lrs = self.lrs if lrs is None else lrs
        losses = np.full(len(lrs), np.nan)
        work = cpu.make_workspace(self.layout, self.batch_size, self.Y.shape[1], self.dtype)
        completed = cpu.train_epochs(
            params, opt_state, steps, losses, self.X, self.Y, read_only(np.empty(0, self.dtype)),
            self.orders[:len(lrs)], lrs, tuple(cpu.network(self.layout, self.act_codes, LOSSES[self.loss])),
            tuple(work), (self.opt_code, self.hyper, self.batch_size, target_loss))
        return completed, losses, params, opt_state, steps

    def reference(self):
        W, B, losses = reference_fit(self.sizes, self.activations, self.loss, self.weights, self.biases, self.X,
                                     self.Y, self.orders, self.lrs, self.batch_size, self.optimizer, self.hyper)
        flat = np.empty(self.layout.n_params)
        self.layout.pack(W, B, flat)
        return losses, flat


# Every activation, loss and optimizer variant at least once; shapes with 1, primes, 32- and 128-wide layers; batches
# with a partial last batch (30 = 4 x 7 + 2, 45 = 2 x 20 + 5, 10 = 3 x 3 + 1), partial last lane blocks, and
# full batches in order.
PROBLEMS = {
    "W1-sigmoid-mse-sgd-fullbatch": dict(sizes=[1, 16, 1], activations=["sigmoid"], loss="mse", optimizer="sgd",
                                         hyper=make_hyper(), n=100, batch_size=100, epochs=40, lr=0.05,
                                         shuffle=False),
    "3-5-4-2-tanh-relu-bce-nesterov-wd": dict(sizes=[3, 5, 4, 2], activations=["tanh", "relu"],
                                              loss="binary_cross_entropy", optimizer="sgd",
                                              hyper=make_hyper(momentum=0.9, nesterov=True, weight_decay=0.01),
                                              n=30, batch_size=7, epochs=6, lr=0.1),
    "1-1-mse-adam": dict(sizes=[1, 1], activations=[], loss="mse", optimizer="adam",
                         hyper=make_hyper(weight_decay=0.001), n=10, batch_size=3, epochs=6, lr=0.05),
    "7-32-3-leaky-ce-momentum-dampening": dict(sizes=[7, 32, 3], activations=["leaky_relu"],
                                               loss="softmax_cross_entropy", optimizer="sgd",
                                               hyper=make_hyper(momentum=0.5, dampening=0.1), n=45, batch_size=20,
                                               epochs=5, lr=0.1),
    "4-9-6-5-3-mixed-ce-adam-fullbatch": dict(sizes=[4, 9, 6, 5, 3], activations=["sigmoid", "identity", "tanh"],
                                              loss="softmax_cross_entropy", optimizer="adam",
                                              hyper=make_hyper(weight_decay=0.01, betas=(0.8, 0.99)), n=37,
                                              batch_size=37, epochs=6, lr=0.01, shuffle=False),
    "12-128-4-relu-ce-fullbatch-of-131": dict(sizes=[12, 128, 4], activations=["relu"],
                                              loss="softmax_cross_entropy", optimizer="sgd",
                                              hyper=make_hyper(momentum=0.9), n=131, batch_size=256, epochs=4,
                                              lr=0.05),
    "2-3-1-relu-bce-plain-sgd": dict(sizes=[2, 3, 1], activations=["relu"], loss="binary_cross_entropy",
                                     optimizer="sgd", hyper=make_hyper(), n=17, batch_size=16, epochs=5, lr=0.2),
    "5-20-3-tanh-poisson-momentum": dict(sizes=[5, 20, 3], activations=["tanh"], loss="poisson", optimizer="sgd",
                                         hyper=make_hyper(momentum=0.9), n=41, batch_size=16, epochs=5, lr=0.02),
}
# float32 runs against the float64 reference: a few hundred float32 roundings per step, compounded.
TRAIN_TOLERANCES = {np.float32: dict(rtol=2e-4, atol=2e-5), np.float64: dict(rtol=1e-9, atol=1e-11)}


@pytest.fixture(params=sorted(PROBLEMS), scope="module")
def problem_spec(request):
    return request.param


@pytest.mark.parametrize("kernel", ["narrow", "naive"])
def test_training_matches_float64_reference(problem_spec, kernel, dtype):
    problem = Problem(dtype=dtype, **PROBLEMS[problem_spec])
    ref_losses, ref_params = problem.reference()
    if kernel == "narrow":
        completed, losses, params, opt_state, steps, work = problem.run_narrow()
        n_params = problem.layout.n_params
        # The per-lane gradient rows are left zero for the next call (the workspace contract).
        assert not np.any(work[:n_params * narrow.LANES[np.dtype(dtype)]])
    else:
        completed, losses, params, opt_state, steps = problem.run_naive()
    epochs = len(problem.lrs)
    assert completed == epochs
    n_batches = -(-problem.X.shape[0] // problem.batch_size)
    assert steps[0] == epochs * n_batches
    np.testing.assert_allclose(losses, ref_losses, **TRAIN_TOLERANCES[dtype])
    np.testing.assert_allclose(params, ref_params, **TRAIN_TOLERANCES[dtype])
    assert losses[-1] < losses[0]  # it trained


def test_matches_general_path(problem_spec, dtype):
    """Same inputs, same results to rounding as fastbp.kernels.cpu.train_epochs (params, optimizer state,
    losses, step count)."""
    problem = Problem(dtype=dtype, **PROBLEMS[problem_spec])
    completed, losses, params, opt_state, steps, _ = problem.run_narrow()
    c_completed, c_losses, c_params, c_opt_state, c_steps = problem.run_cpu()
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    assert completed == c_completed and steps[0] == c_steps[0]
    np.testing.assert_allclose(losses, c_losses, **tol)
    np.testing.assert_allclose(params, c_params, **tol)
    np.testing.assert_allclose(opt_state, c_opt_state, **tol)


def test_w1_long_run_float32():
    """W1's 1000-epoch fit in float32 stays within 1e-6 (relative) of the float64 reference's loss curve."""
    spec = dict(PROBLEMS["W1-sigmoid-mse-sgd-fullbatch"], epochs=1000, lr=0.01)
    problem = Problem(dtype=np.float32, **spec)
    ref_losses, _ = problem.reference()
    _, losses, *_ = problem.run_narrow()
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)


def test_chunked_calls_equal_one_call(dtype):
    """Epochs split over several calls (as Trainer.fit grows its chunks) give the results of one call."""
    problem = Problem(dtype=dtype, **PROBLEMS["3-5-4-2-tanh-relu-bce-nesterov-wd"])
    _, losses, params, opt_state, steps, _ = problem.run_narrow()
    state = problem.state()
    work = narrow.make_workspace(problem.sizes, dtype)
    pieces = []
    for lo, hi in ((0, 1), (1, 4), (4, 6)):
        c, part, *_ = problem.run_narrow(orders=problem.orders[lo:hi], lrs=problem.lrs[lo:hi], state=state,
                                         work=work)
        assert c == hi - lo
        pieces.append(part)
    np.testing.assert_array_equal(np.concatenate(pieces), losses)
    np.testing.assert_array_equal(state[0], params)
    np.testing.assert_array_equal(state[1], opt_state)
    assert state[2][0] == steps[0]


def test_workspace_without_room_for_the_data_gathers_the_same(dtype):
    """A full-batch in-order call transposes the data once when work has room (make_workspace(.., n)); without
    it every block is gathered: the results are identical."""
    problem = Problem(dtype=dtype, **PROBLEMS["W1-sigmoid-mse-sgd-fullbatch"])
    with_room = problem.run_narrow()
    without = problem.run_narrow(work=narrow.make_workspace(problem.sizes, dtype))
    np.testing.assert_array_equal(with_room[1], without[1])
    np.testing.assert_array_equal(with_room[2], without[2])


def test_nonfinite_epoch_restores_its_start(dtype):
    """An epoch whose loss is not finite is not counted, and params, optimizer state and the step count are
    those of its start; as cpu.train_epochs."""
    spec = dict(PROBLEMS["W1-sigmoid-mse-sgd-fullbatch"], hyper=make_hyper(momentum=0.9), epochs=5)
    problem = Problem(dtype=dtype, **spec)
    huge = 1e30 if dtype == np.float32 else 1e200
    # Full batch: epoch 1's loss is taken before its one step, which blows the weights up; epoch 2 overflows.
    lrs = np.array([0.01, huge, 0.01, 0.01, 0.01])
    completed, losses, params, opt_state, steps, work = problem.run_narrow(lrs=lrs)
    assert completed == 2
    assert np.all(np.isfinite(losses[:2])) and not np.isfinite(losses[2])
    _, _, start_params, start_state, start_steps, _ = problem.run_narrow(lrs=lrs[:2])  # the state at epoch 2's start
    np.testing.assert_array_equal(params, start_params)
    np.testing.assert_array_equal(opt_state, start_state)
    assert steps[0] == start_steps[0]
    assert not np.any(work[:problem.layout.n_params * narrow.LANES[np.dtype(dtype)]])
    c_completed, c_losses, c_params, *_ = problem.run_cpu(lrs=lrs)
    assert c_completed == completed
    tol = dict(rtol=1e-5) if dtype == np.float32 else dict(rtol=1e-12)
    np.testing.assert_allclose(params, c_params, **tol)


def test_nan_in_the_data_stops_at_once(dtype):
    # A sigmoid network: relu maps NaN to 0 (pointwise.activate's semantics, on both paths), so there a NaN
    # input never reaches the loss.
    problem = Problem(dtype=dtype, **dict(PROBLEMS["W1-sigmoid-mse-sgd-fullbatch"], n=37, batch_size=10,
                                          shuffle=True, epochs=3))
    problem.X = problem.X.copy()
    problem.X[5, 0] = np.nan
    completed, losses, params, opt_state, steps, _ = problem.run_narrow()
    assert completed == 0 and np.isnan(losses[0])
    np.testing.assert_array_equal(params, problem.params0)
    assert steps[0] == 0 and not np.any(opt_state)


def test_target_loss_stops(dtype):
    problem = Problem(dtype=dtype, **PROBLEMS["W1-sigmoid-mse-sgd-fullbatch"])
    _, all_losses, *_ = problem.run_narrow()
    target = float(all_losses[3])
    completed, losses, params, _, steps, _ = problem.run_narrow(target_loss=target)
    assert completed == 4 and steps[0] == 4
    np.testing.assert_array_equal(losses[:4], all_losses[:4])
    assert np.all(np.isnan(losses[4:]))  # nothing written after the stop
    # the general path stops the same way on its own losses (they differ from the fused kernel's by rounding)
    cpu_losses = problem.run_cpu()[1]
    assert problem.run_cpu(target_loss=float(cpu_losses[3]))[0] == 4


def test_results_do_not_depend_on_threads(dtype):
    problem = Problem(dtype=dtype, **PROBLEMS["7-32-3-leaky-ce-momentum-dampening"])
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = problem.run_narrow()
    finally:
        numba.set_num_threads(before)
    other = problem.run_narrow()
    np.testing.assert_array_equal(one[1], other[1])
    np.testing.assert_array_equal(one[2], other[2])


def test_one_kernel_per_configuration():
    # One kernel per set of activations and loss; the optimizer is a run-time argument.
    codes = np.array([ACTIVATIONS["relu"], ACTIVATIONS["identity"]])
    assert narrow.kernel_for(codes, 0) is narrow.kernel_for(codes[::-1].copy(), 0)
    assert narrow.kernel_for(codes, 0) is not narrow.kernel_for(codes, 1)
    assert narrow.kernel_for(codes, 0) is not narrow.kernel_for(np.array([ACTIVATIONS["tanh"], 0]), 0)
    # without sigmoid or tanh: one kernel per loss for every mix of relu, leaky_relu and identity
    leaky = np.array([ACTIVATIONS["leaky_relu"], ACTIVATIONS["identity"]])
    assert narrow.kernel_for(codes, 0) is narrow.kernel_for(leaky, 0)
    assert narrow.kernel_for(np.array([ACTIVATIONS["sigmoid"]]), 0) is not narrow.kernel_for(
        np.array([ACTIVATIONS["sigmoid"], ACTIVATIONS["relu"]]), 0)
    with pytest.raises(ValueError):
        narrow.kernel_for(codes, 7)


def test_supports():
    assert narrow.supports([1, 16, 1])
    assert narrow.supports([7, 32, 3])
    assert narrow.supports([32, 32, 10])
    assert not narrow.supports([64, 128, 10])  # W2: the product engine is about 2x faster (see supports)
    assert not narrow.supports([16, 256, 256, 10])
    assert not narrow.supports([784, 32, 10])
    assert not narrow.supports([5])


def test_workspace_layout():
    for dtype in (np.float32, np.float64):
        lanes = narrow.LANES[np.dtype(dtype)]
        P = 3 * 5 + 5 + 5 * 2 + 2
        assert narrow.workspace_length([3, 5, 2], dtype) == lanes * (P + 2 * 10 + 2 + 1)
        assert narrow.workspace_length([3, 5, 2], dtype, 17) == lanes * (P + 2 * 10 + 2 + 1 + (3 + 2) * -(-17 // lanes))
        work = narrow.make_workspace([3, 5, 2], dtype, 17)
        assert work.ctypes.data % 64 == 0 and work.dtype == dtype and not work.any()


def test_the_cpu_backend_trains_narrow_networks_with_the_fused_kernel(monkeypatch):
    """Trainer.fit on the CPU takes this path exactly when supports() says so, and the result is the general
    path's to rounding (a Trainer forced onto the general path as the reference)."""
    import fastbp

    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(90, 5)), rng.integers(0, 3, 90)

    def fit(force_general):
        trainer = fastbp.Trainer(fastbp.MLP([5, 12, 3], "tanh", seed=0), loss="softmax_cross_entropy",
                                 optimizer="adam", lr=0.01, batch_size=16, seed=1)
        if force_general:
            trainer._backend._narrow_kernel = None
        trainer.fit(X, y, epochs=7)
        return trainer

    fused, general = fit(False), fit(True)
    assert fused._backend._narrow_kernel is not None
    # float32 (the MLP's default): the two paths sum in different orders, a few ulps per step.
    np.testing.assert_allclose(fused.model.flat_parameters(), general.model.flat_parameters(), rtol=2e-5,
                               atol=1e-6)
    np.testing.assert_allclose(fused.history.loss, general.history.loss, rtol=1e-5)
    assert fastbp.Trainer(fastbp.MLP([5, narrow.NARROW_MAX_WIDTH + 1, 3]), loss="mse")._backend._narrow_kernel is None
