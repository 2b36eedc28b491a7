"""CUDABackend through the backend interface (fastbp.backends.base.Backend), against the CPU kernels
(fastbp.kernels.cpu: train_epochs, dataset_grads, forward_pass, optimizer_step, called as
fastbp/backends/cpu.py calls them) and the float64 numpy reference (tests/naive.py); on a GPU or in the
simulator. Both training paths are covered: the step launches (kernels.cuda_step: products with split-K,
the tail kernel, the epoch kernels) and the fused whole-fit kernel (kernels.cuda_fused).

Tolerances: float32 rtol 1e-5 for gradients and SGD runs (the CPU's products sum in vectorised partial
sums, the CUDA ones in k order: rounding only), Adam 2e-4 (m / sqrt(v) turns an ulp in a near-zero gradient
into a visible difference, see test_trainer_cuda.py), float64 1e-10. On a GPU, fastmath allows 1e-4.
"""
import numpy as np
import pytest

from fastbp.kernels.pointwise import (
    ACTIVATIONS,
    H_BETA1,
    H_BETA2,
    H_DAMPENING,
    H_EPS,
    H_MOMENTUM,
    H_NESTEROV,
    H_WEIGHT_DECAY,
    IDENTITY,
    LOSSES,
    N_HYPER,
    OPTIMIZERS,
    loss_divisor,
)
from fastbp.layout import Layout

from .. import naive
from .conftest import SIMULATOR, SKIP_REASON, cuda_reason

pytestmark = pytest.mark.skipif(cuda_reason() is not None, reason=SKIP_REASON)

PARITY = {np.float32: dict(rtol=1e-5, atol=1e-6) if SIMULATOR else dict(rtol=1e-4, atol=1e-5),
          np.float64: dict(rtol=1e-10, atol=1e-12)}
ADAM_PARITY = {np.float32: dict(rtol=2e-4, atol=1e-5), np.float64: PARITY[np.float64]}


# --- set-up ------------------------------------------------------------------------------------------------
class Net:
    """One network's description, initial parameters and data, in the form both targets take."""

    def __init__(self, sizes, act, loss, optimizer, dtype, n, seed=0, **hyper):
        rng = np.random.default_rng(seed)
        self.layout = Layout.from_sizes(sizes)
        L = self.layout.n_layers
        self.act_codes = np.array([ACTIVATIONS[act]] * (L - 1) + [IDENTITY], dtype=np.int64)
        self.loss = LOSSES[loss]
        self.optimizer = OPTIMIZERS[optimizer]
        self.hyper = np.zeros(N_HYPER)
        self.hyper[[H_BETA1, H_BETA2, H_EPS]] = (0.9, 0.999, 1e-8)
        names = dict(momentum=H_MOMENTUM, dampening=H_DAMPENING, weight_decay=H_WEIGHT_DECAY, nesterov=H_NESTEROV)
        for name, value in hyper.items():
            self.hyper[names[name]] = float(value)
        self.dtype = np.dtype(dtype)
        self.params = (rng.normal(size=self.layout.n_params) / np.sqrt(max(sizes))).astype(dtype)
        k = sizes[-1]
        self.X = rng.normal(size=(n, sizes[0])).astype(dtype)
        if loss == "mse":
            self.Y = rng.normal(size=(n, k)).astype(dtype)
        elif loss == "binary_cross_entropy":
            self.Y = rng.uniform(size=(n, k)).astype(dtype)
        elif loss == "poisson":
            self.Y = rng.poisson(2.0, size=(n, k)).astype(dtype)
        else:
            self.Y = naive.one_hot(rng.integers(0, k, size=n), k).astype(dtype)

    def backend(self, fused: bool):
        from fastbp.backends.cuda import CUDABackend

        backend = CUDABackend(self.layout, self.act_codes, self.loss, self.optimizer, self.hyper, self.dtype)
        backend.use_fused = fused
        backend.use_parameters(self.params.copy())
        return backend

    def orders(self, epochs, shuffle, seed=5):
        n = self.X.shape[0]
        rng = np.random.default_rng(seed)
        return (np.stack([rng.permutation(n) for _ in range(epochs)]) if shuffle
                else np.empty((epochs, 0), dtype=np.int64))


def cpu_train(net, batch_size, orders, lrs, target, params=None, opt_state=None, steps_done=0):
    """kernels.cpu.train_epochs as CPUBackend.train_epochs calls it; returns (losses, completed, steps, params,
    opt_state)."""
    from fastbp.kernels import cpu

    params = (net.params if params is None else params).copy()
    opt_state = np.zeros((2, net.layout.n_params), net.dtype) if opt_state is None else opt_state.copy()
    steps = np.array([steps_done], dtype=np.int64)
    losses = np.empty(len(lrs))
    work = cpu.make_workspace(net.layout, batch_size, net.Y.shape[1], net.dtype)
    completed = cpu.train_epochs(
        params, opt_state, steps, losses, net.X, net.Y, np.empty(0, net.dtype), orders, np.asarray(lrs, np.float64),
        tuple(cpu.network(net.layout, net.act_codes, net.loss)), tuple(work),
        (net.optimizer, net.hyper, batch_size, target))
    # The epochs that ran: the completed ones, plus the non-finite one that ended the call (a target stop is
    # a completed epoch; CPUBackend's min(completed + 1, E) would add an unwritten entry after one).
    target_stop = 0 < completed < len(lrs) and losses[completed - 1] <= target
    ran = completed if completed == len(lrs) or target_stop else completed + 1
    return losses[:ran], int(completed), int(steps[0]), params, opt_state


def cpu_grads(net, X, Y, divisor, params=None):
    from fastbp.kernels import cpu

    grads = np.empty(net.layout.n_params, net.dtype)
    work = cpu.make_workspace(net.layout, max(1, X.shape[0]), Y.shape[1], net.dtype)
    value = cpu.dataset_grads(grads, X, Y, np.empty(0, net.dtype), net.params if params is None else params,
                              tuple(cpu.network(net.layout, net.act_codes, net.loss)), tuple(work), float(divisor))
    return float(value), grads


def device_data(backend, net):
    return backend.as_input(net.X), backend.as_input(net.Y)


def published(backend, net):
    params = np.empty_like(net.params)
    backend.publish_parameters(params)
    return params


# --- training: both paths against the CPU step for step ------------------------------------------------------
CASES = {
    # sizes, activation, loss, optimizer, hyper, n, batch, shuffle
    "L3-ce-sgd-nesterov": ([5, 7, 6, 3], "tanh", "softmax_cross_entropy", "sgd",
                           dict(momentum=0.9, nesterov=True, weight_decay=0.01), 11, 4, True),
    "L2-bce-adam": ([4, 9, 2], "relu", "binary_cross_entropy", "adam", dict(weight_decay=0.01), 10, 4, True),
    "L2-ce-adamw": ([4, 9, 3], "tanh", "softmax_cross_entropy", "adamw", dict(weight_decay=0.05), 10, 4, True),
    "L1-mse-full-batch": ([3, 2], "identity", "mse", "sgd", dict(momentum=0.5, dampening=0.1), 7, 7, False),
    "L3-mse-in-order": ([3, 6, 5, 2], "leaky_relu", "mse", "sgd", dict(), 9, 4, False),
    "L2-wide-r8": ([9, 17, 10], "sigmoid", "softmax_cross_entropy", "sgd", dict(momentum=0.9), 13, 12, True),
}


@pytest.mark.parametrize("fused", [False, True], ids=["steps", "fused"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_train_epochs_matches_cpu(small_launches, case, fused, dtype):
    sizes, act, loss, optimizer, hyper, n, batch, shuffle = CASES[case]
    net = Net(sizes, act, loss, optimizer, dtype, n, **hyper)
    backend = net.backend(fused)
    X, Y = device_data(backend, net)
    orders = net.orders(2, shuffle)
    lrs = np.array([0.1, 0.05])
    losses, completed, steps = backend.train_epochs(X, Y, batch, orders, lrs, -np.inf, 3)
    ref_losses, ref_completed, ref_steps, ref_params, ref_state = cpu_train(net, batch, orders, lrs, -np.inf,
                                                                           steps_done=3)
    tol = (ADAM_PARITY if optimizer.startswith("adam") else PARITY)[dtype]
    assert (completed, steps) == (ref_completed, ref_steps) == (2, 3 + 2 * -(-n // batch))
    np.testing.assert_allclose(losses, ref_losses, **tol)
    np.testing.assert_allclose(published(backend, net), ref_params, **tol)
    np.testing.assert_allclose(backend.optimizer_state(), ref_state, **tol)
    # A second call continues from there (steps_done and the optimizer state carried over).
    more, _, steps = backend.train_epochs(X, Y, batch, net.orders(1, shuffle, seed=9), lrs[:1], -np.inf, steps)
    ref_more, _, ref_steps, ref_params, _ = cpu_train(net, batch, net.orders(1, shuffle, seed=9), lrs[:1], -np.inf,
                                                      ref_params, ref_state, ref_steps)
    assert steps == ref_steps
    np.testing.assert_allclose(more, ref_more, **tol)
    np.testing.assert_allclose(published(backend, net), ref_params, **tol)


def test_step_plans_cover_every_product_variant(small_launches):
    """The cases above launch 64-style ("r8") and 32-style ("r4s") tiles and split-K jobs (so those paths are
    what the parity test checks), and short last batches (tiles past the batch's rows)."""
    from fastbp.kernels import cuda_step

    configs, splits = set(), set()
    for case in CASES.values():
        sizes, act, loss, optimizer, hyper, n, batch, _ = case
        net = Net(sizes, act, loss, optimizer, np.float32, n, **hyper)
        backend = net.backend(False)
        plan, _ = backend._plan(batch, rows_from_step=True)
        configs |= {launch[1] for launch in plan.launches if launch[0] == "product"}
        splits |= {int(row[cuda_step.J_SPLITS]) for row in plan.jobs}
    assert {"r8", "r4s"} <= configs
    assert max(splits) > 1


@pytest.mark.parametrize("fused", [False, True], ids=["steps", "fused"])
def test_fused_chunks_and_unstaged_parameters(small_launches, monkeypatch, fused):
    """A batch larger than the fused kernel's shared-memory chunk accumulates its gradient over chunks, with
    the parameters in global memory (W2's case); same results as the CPU."""
    from fastbp.kernels import cuda_fused

    net = Net([4, 6, 3], "relu", "softmax_cross_entropy", "sgd", np.float32, 10, momentum=0.9)
    item = 4
    per_row = item * (2 * int(net.layout.unit_offsets[-1]) + 1)
    monkeypatch.setattr(cuda_fused, "SHARED_BYTES", 3 * per_row)  # chunks of 3 rows, no room for the state
    chunk, staged, _ = cuda_fused.fused_plan(net.layout, 8, np.float32)
    assert (chunk, staged) == (3, False)
    backend = net.backend(fused)
    X, Y = device_data(backend, net)
    orders = net.orders(2, True)
    losses, completed, _ = backend.train_epochs(X, Y, 8, orders, np.array([0.2, 0.2]), -np.inf, 0)
    ref = cpu_train(net, 8, orders, [0.2, 0.2], -np.inf)
    np.testing.assert_allclose(losses, ref[0], **PARITY[np.float32])
    np.testing.assert_allclose(published(backend, net), ref[3], **PARITY[np.float32])


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
@pytest.mark.parametrize("fused", [False, True], ids=["steps", "fused"])
def test_nonfinite_epoch_is_undone_and_target_loss_stops(small_launches, fused):
    net = Net([2, 4, 1], "relu", "mse", "sgd", np.float32, 8, momentum=0.9)
    net.X *= 10
    net.Y *= 100
    backend = net.backend(fused)
    X, Y = device_data(backend, net)
    orders = net.orders(30, False)
    lrs = np.full(30, 10.0)
    losses, completed, steps = backend.train_epochs(X, Y, 3, orders, lrs, -np.inf, 0)
    ref_losses, ref_completed, ref_steps, ref_params, ref_state = cpu_train(net, 3, orders, lrs, -np.inf)
    assert completed == ref_completed < len(losses) == ref_completed + 1 < 30
    assert not np.isfinite(losses[-1]) and np.isfinite(losses[:-1]).all()
    assert steps == ref_steps == 3 * completed
    np.testing.assert_allclose(losses[:-1], ref_losses[:-1], rtol=1e-4)
    params = published(backend, net)
    assert np.isfinite(params).all()
    np.testing.assert_allclose(params, ref_params, rtol=1e-4, atol=1e-3)
    # The target rule: stop after the first epoch at or below the target (that epoch kept).
    net = Net([1, 4, 1], "tanh", "mse", "sgd", np.float64, 16)
    net.Y = (0.5 * net.X).astype(np.float64)
    backend = net.backend(fused)
    X, Y = device_data(backend, net)
    orders = net.orders(60, False)
    lrs = np.full(60, 0.3)
    ref = cpu_train(net, 16, orders, lrs, 0.05)
    losses, completed, steps = backend.train_epochs(X, Y, 16, orders, lrs, 0.05, 0)
    assert completed == ref[1] == len(losses) < 60 and losses[-1] <= 0.05 < losses[-2]
    np.testing.assert_allclose(losses, ref[0], **PARITY[np.float64])


# --- launches: counted where every launch goes (kernels.cuda.launch) --------------------------------------------
@pytest.mark.parametrize("sizes,expected", [([3, 4], 2), ([3, 5, 2], 3), ([3, 5, 4, 2], 5)], ids=["L1", "L2", "L3"])
def test_a_step_is_at_most_L_plus_2_launches(small_launches, sizes, expected):
    kernels = small_launches
    net = Net(sizes, "relu", "softmax_cross_entropy", "sgd", np.float32, 7)
    backend = net.backend(False)
    backend.use_graphs = False  # count the direct launches (what a graph would replay)
    X, Y = device_data(backend, net)
    E, batch = 2, 3
    with kernels.recording() as names:
        backend.train_epochs(X, Y, batch, net.orders(E, True), np.full(E, 0.1), -np.inf, 0)
    per_epoch = 3  # ceil(7 / 3)
    epoch_kernels = {"_epoch_begin_kernel", "_epoch_end_kernel"}
    per_step = sum(name not in epoch_kernels for name in names) / (E * per_epoch)
    L = len(sizes) - 1
    assert per_step == expected <= L + 2
    assert len(names) == E * (2 + per_epoch * expected) + 1  # + the final restore check


@pytest.mark.parametrize("sizes,epochs", [([1, 16, 1], 150), ([2, 64, 64, 1], 3)], ids=["W1-like", "64-wide"])
def test_a_narrow_full_batch_fit_is_one_launch_whatever_its_epochs(small_launches, sizes, epochs):
    kernels = small_launches
    n = 5 if sizes[1] < 64 else 3
    net = Net(sizes, "sigmoid", "mse", "sgd", np.float32, n)
    backend = net.backend(True)
    X, Y = device_data(backend, net)
    orders, lrs = net.orders(epochs, False), np.full(epochs, 0.01)
    with kernels.recording() as names:
        losses, completed, _ = backend.train_epochs(X, Y, n, orders, lrs, -np.inf, 0)
    assert completed == epochs and len(names) <= 10
    assert names == ["_fused_fit_kernel"]
    ref = cpu_train(net, n, orders, lrs, -np.inf)
    np.testing.assert_allclose(losses, ref[0], **PARITY[np.float32])


@pytest.mark.skipif(SIMULATOR, reason="the simulator has no CUDA graphs (checked on a GPU)")
def test_graph_replay_equals_direct_launches(small_launches):
    """On a GPU an epoch's launches are captured once and replayed: bit-identical to launching them."""
    kernels = small_launches
    if kernels.graphs_unavailable_reason() is not None:
        pytest.skip(kernels.graphs_unavailable_reason())
    net = Net([5, 7, 6, 3], "tanh", "softmax_cross_entropy", "sgd", np.float32, 11, momentum=0.9)
    results = []
    for graphs in (False, True):
        backend = net.backend(False)
        backend.use_graphs = graphs
        X, Y = device_data(backend, net)
        with kernels.recording() as names:
            losses, _, _ = backend.train_epochs(X, Y, 4, net.orders(3, True), np.full(3, 0.1), -np.inf, 0)
        assert ("graph" in names) == graphs
        results.append((losses, published(backend, net), backend.optimizer_state()))
    for direct, replayed in zip(*results):
        np.testing.assert_array_equal(replayed, direct)


# --- one step at a time ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 9], ids=["one-row", "three-chunks"])
def test_rows_grads_matches_cpu_and_reference(small_launches, monkeypatch, dtype, n):
    from fastbp.backends import cuda as backend_module

    monkeypatch.setattr(backend_module, "EVAL_CAPACITY", 4)  # 9 rows: chunks of 4, 4, 1 (accumulated)
    net = Net([4, 6, 5, 3], "sigmoid", "softmax_cross_entropy", "sgd", dtype, n)
    backend = net.backend(False)
    X, Y = device_data(backend, net)
    divisor = 2.0 * n
    grads = np.full(net.layout.n_params, np.nan, dtype)
    value = backend.rows_grads(X, Y, divisor, grads)
    ref_value, ref_grads = cpu_grads(net, net.X, net.Y, divisor)
    assert value == pytest.approx(ref_value, rel=PARITY[dtype]["rtol"])
    np.testing.assert_allclose(grads, ref_grads, **PARITY[dtype])
    weights = [net.layout.views(net.params, l)[0] for l in range(3)]
    biases = [net.layout.views(net.params, l)[1] for l in range(3)]
    ref_value, ref_dw, ref_db = naive.loss_and_grads(weights, biases, ["sigmoid"] * 2, "softmax_cross_entropy",
                                                      net.X, net.Y)
    scale = loss_divisor(net.loss, n, 3) / divisor  # the reference is a mean over these rows
    tol = dict(rtol=2e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    for l in range(3):
        dw, db = net.layout.views(grads, l)
        np.testing.assert_allclose(dw, ref_dw[l] * scale, **tol)
        np.testing.assert_allclose(db, ref_db[l] * scale, **tol)
    # loss_and_grads (the interface's default) goes through rows_grads.
    mean, flat = backend.loss_and_grads(X, Y, loss_divisor(net.loss, n, 3))
    assert mean == pytest.approx(ref_value, rel=1e-5 if dtype == np.float32 else 1e-10)


def test_rows_grads_of_zero_rows_writes_zeros(small_launches):
    """A shard with no rows (a rank's share of a short last batch) must contribute zeros to the Allreduce,
    not the previous call's gradient (which the backend wrote nothing over before)."""
    net = Net([3, 4, 2], "relu", "mse", "sgd", np.float32, 5)
    backend = net.backend(False)
    X, Y = device_data(backend, net)
    grads = np.empty(net.layout.n_params, np.float32)
    backend.rows_grads(X, Y, 10.0, grads)
    assert np.abs(grads).sum() > 0
    empty = backend.as_input(np.zeros((0, 3), np.float32)), backend.as_input(np.zeros((0, 2), np.float32))
    grads[:] = np.nan
    assert backend.rows_grads(*empty, 10.0, grads) == 0.0
    np.testing.assert_array_equal(grads, 0)


@pytest.mark.parametrize("optimizer,hyper", [("sgd", dict(momentum=0.9, nesterov=True, weight_decay=0.1)),
                                             ("adam", dict(weight_decay=0.01)),
                                             ("adamw", dict(weight_decay=0.05))])
def test_apply_update_matches_cpu_optimizer_step(small_launches, optimizer, hyper, dtype):
    from fastbp.kernels import cpu

    net = Net([3, 5, 2], "tanh", "mse", optimizer, dtype, 4, **hyper)
    backend = net.backend(False)
    params, state = net.params.copy(), np.zeros((2, net.layout.n_params), dtype)
    rng = np.random.default_rng(1)
    for step_number in (1, 2, 3):
        grads = rng.normal(size=net.layout.n_params).astype(dtype)
        backend.apply_update(grads, 0.05, step_number)
        cpu.optimizer_step(params, state, grads, 0.05, net.optimizer, net.hyper, step_number)
    tol = (ADAM_PARITY if optimizer.startswith("adam") else PARITY)[dtype]
    np.testing.assert_allclose(published(backend, net), params, **tol)
    np.testing.assert_allclose(backend.optimizer_state(), state, **tol)


# --- inference ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_predict_and_loss_value_match_cpu(small_launches, monkeypatch, loss, dtype):
    from fastbp.backends import cuda as backend_module
    from fastbp.kernels import cpu

    monkeypatch.setattr(backend_module, "EVAL_CAPACITY", 4)
    net = Net([3, 5, 4], "relu", loss, "sgd", dtype, 10)
    backend = net.backend(False)
    X, Y = device_data(backend, net)
    out = np.empty((10, 4), dtype)
    work = cpu.make_workspace(net.layout, 10, 4, dtype)
    network, work = tuple(cpu.network(net.layout, net.act_codes, net.loss)), tuple(work)
    ref = cpu.forward_pass(out, net.X, net.Y, np.empty(0, dtype), net.params, network, work)
    np.testing.assert_allclose(backend.predict(X, 4), out, **PARITY[dtype])
    assert backend.loss_value(X, Y) == pytest.approx(float(ref), rel=PARITY[dtype]["rtol"])


# --- state --------------------------------------------------------------------------------------------------------
def test_parameters_state_snapshot_and_rows(small_launches):
    kernels = small_launches
    net = Net([3, 4, 2], "relu", "mse", "sgd", np.float32, 6, momentum=0.9)
    backend = net.backend(False)
    X, Y = device_data(backend, net)
    assert backend.optimizer_state().shape == (2, net.layout.n_params)
    assert not backend.optimizer_state().any()  # starts at zero
    np.testing.assert_array_equal(published(backend, net), net.params)
    snap = backend.snapshot()
    backend.train_epochs(X, Y, 3, net.orders(1, False), np.array([0.1]), -np.inf, 0)
    trained, state = published(backend, net), backend.optimizer_state()
    assert not np.array_equal(trained, net.params) and state.any()
    backend.restore(snap)
    np.testing.assert_array_equal(published(backend, net), net.params)
    assert not backend.optimizer_state().any()
    backend.set_optimizer_state(state)
    np.testing.assert_array_equal(backend.optimizer_state(), state)
    # use_parameters uploads new values, and re-uploads after training even if the vector is unchanged.
    backend.use_parameters(trained)
    np.testing.assert_array_equal(published(backend, net), trained)
    backend.train_epochs(X, Y, 3, net.orders(1, False), np.array([0.1]), -np.inf, 1)
    backend.use_parameters(trained)
    np.testing.assert_array_equal(published(backend, net), trained)
    rows = np.array([4, 0, 4, 2])
    taken = backend.take_rows(X, rows)
    assert kernels.is_device_array(taken)
    np.testing.assert_array_equal(backend.to_host(taken), net.X[rows])
    np.testing.assert_array_equal(backend.take_rows(net.X, rows), net.X[rows])


def test_device_input_is_checked_by_a_grid_wide_reduction(small_launches, dtype):
    kernels = small_launches
    net = Net([5, 2], "relu", "mse", "sgd", dtype, 10)
    backend = net.backend(False)
    values = np.random.default_rng(3).normal(size=(10, 5)).astype(dtype)  # 50 values: 3 blocks of 8 threads
    stats = kernels.device_empty(3, dtype)
    kernels.array_stats(stats, kernels.to_device(values.reshape(-1)))
    np.testing.assert_array_equal(stats.copy_to_host(), [0, values.min(), values.max()])
    for cells in ([(0, 0)], [(9, 4), (5, 1)]):  # the first and the last block, and the middle
        bad = values.copy()
        for cell in cells:
            bad[cell] = np.nan
        bad[-1, -1] = np.inf if len(cells) == 1 else bad[-1, -1]
        with pytest.raises(ValueError, match="finite"):
            backend.as_device_input("X", kernels.to_device(bad), 5)
    with pytest.raises(ValueError, match=r"lie in \[-1.0, 1.0\]"):
        backend.as_device_input("X", kernels.to_device(values), 5, bounds=(-1.0, 1.0))
    assert backend.as_device_input("X", kernels.to_device(np.clip(values, -1, 1)), 5, bounds=(-1.0, 1.0)) is not None


def test_numpy_2_5_is_refused_with_the_fix(small_launches, monkeypatch):
    kernels = small_launches
    monkeypatch.setattr(np, "__version__", "2.5.0")
    assert "pip install 'numpy<2.5'" in kernels.numpy_problem()
    monkeypatch.setattr(np, "__version__", "2.4.6")
    assert kernels.numpy_problem() is None
