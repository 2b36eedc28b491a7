"""A long-running process's memory: the CPU backend keeps a bounded set of workspaces whatever row counts
arrive (issue 27, part 3), and the results do not depend on which workspace a call got."""
import numpy as np
import pytest

import fastbp
from fastbp.backends import cpu

from . import naive


def _live(trainer) -> list:
    """(capacity, n_outputs) of the workspaces the trainer's backend keeps, least recently used first."""
    return list(trainer._backend._workspaces)


@pytest.mark.parametrize("capacity_rows", [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (4095, 4096), (4096, 4096),
                                           (4097, 4096), (100000, 4096), (0, 1)])
def test_eval_capacity_is_the_next_power_of_two_up_to_the_chunk(capacity_rows):
    n_rows, expected = capacity_rows
    assert cpu.eval_capacity(n_rows) == expected


def test_workspaces_stay_bounded_over_many_row_counts_and_results_stay_exact(rng):
    # A server's sequence: predict, evaluate and loss_and_grads over 60 distinct row counts, 1 to 5000 (above
    # EVAL_CAPACITY too), each checked against the float64 reference, with the live workspaces counted after
    # every call. Before the bound, each distinct count kept its own workspace (60 here).
    model = fastbp.MLP([7, 13, 3], "tanh", seed=0, dtype=np.float64)
    trainer = fastbp.Trainer(model, loss="softmax_cross_entropy")
    sizes = rng.permutation(np.unique(np.concatenate([np.arange(1, 40), rng.integers(40, 5000, 30), [4096, 4097]])))
    X_all = rng.normal(size=(int(sizes.max()), 7))
    labels_all = rng.integers(0, 3, int(sizes.max()))
    seen = set()
    for i, n in enumerate(sizes):
        X, labels = X_all[:n], labels_all[:n]
        Y = naive.one_hot(labels, 3)
        call = ("predict", "evaluate", "loss_and_grads")[i % 3]
        if call == "predict":
            np.testing.assert_allclose(trainer.predict(X), naive.output_transform(
                "softmax_cross_entropy", naive.forward(model.weights, model.biases, model.activations, X)[0][-1]),
                rtol=1e-10, atol=1e-12)
        elif call == "evaluate":
            want, _, _ = naive.loss_and_grads(model.weights, model.biases, model.activations,
                                              "softmax_cross_entropy", X, Y)
            assert trainer.evaluate(X, labels)["loss"] == pytest.approx(want, rel=1e-10)
        else:
            loss, dweights, dbiases = trainer.loss_and_grads(X, labels)
            want, want_dw, want_db = naive.loss_and_grads(model.weights, model.biases, model.activations,
                                                          "softmax_cross_entropy", X, Y)
            assert loss == pytest.approx(want, rel=1e-10)
            for got, expected in zip(dweights + dbiases, want_dw + want_db):
                np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
        live = _live(trainer)
        assert len(live) <= cpu.MAX_WORKSPACES, (n, live)
        assert all(capacity & (capacity - 1) == 0 and capacity <= cpu.EVAL_CAPACITY for capacity, _ in live)
        seen.update(live)
    # The sequence did need more capacities than are kept: the bound, not the sizes, limited the count.
    assert len(seen) > cpu.MAX_WORKSPACES


def test_least_recently_used_workspace_is_dropped_and_a_fit_keeps_working(rng):
    # A fit's batch workspace survives predicts of three other sizes only while it is among the last used;
    # dropped, it is rebuilt by the next fit, which trains exactly as an uninterrupted twin does.
    X = rng.normal(size=(300, 5)).astype(np.float32)
    y = rng.integers(0, 2, 300)
    twins = [fastbp.Trainer(fastbp.MLP([5, 40, 2], seed=1), loss="softmax_cross_entropy", batch_size=50, seed=3)
             for _ in range(2)]
    for trainer in twins:
        trainer.fit(X, y, epochs=1)
    busy = twins[0]
    batch_key = (50, 2)
    assert batch_key in _live(busy)
    for n in (1, 3, 9, 17, 33):  # capacities 1, 4, 16, 32, 64: five new ones, one more than are kept
        busy.predict(X[:n])
    assert batch_key not in _live(busy) and len(_live(busy)) == cpu.MAX_WORKSPACES
    assert _live(busy)[-1] == (64, 2)  # the most recent last
    for trainer in twins:
        trainer.fit(X, y, epochs=2)
    np.testing.assert_array_equal(twins[0].model.flat_parameters(), twins[1].model.flat_parameters())
    assert _live(busy)[-1] == batch_key
