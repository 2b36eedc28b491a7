"""fastbp.plotting draws what it says (Agg backend, no files) and the picture examples write their PNGs."""
import importlib.util
import os

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import fastbp  # noqa: E402
from fastbp.plotting import plot_confusion_matrix, plot_fit_1d, plot_history, plot_timings  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def test_plot_history_from_a_fit():
    X = np.linspace(-1, 1, 32, dtype=np.float32).reshape(-1, 1)
    trainer = fastbp.Trainer(fastbp.MLP([1, 8, 1], "tanh", seed=0), loss="mse", lr=0.1, batch_size=None)
    history = trainer.fit(X, 2 * X, epochs=5, validation_data=(X, 2 * X))
    ax = plot_history(history)
    train, val = ax.get_lines()
    np.testing.assert_allclose(train.get_ydata(), history.loss)
    np.testing.assert_allclose(val.get_ydata(), history.val_loss)
    assert list(train.get_xdata()) == [1, 2, 3, 4, 5]


def test_plot_history_from_an_estimator_and_other_plots():
    class Fitted:
        loss_curve_ = [1.0, 0.5]
        validation_scores_ = [0.5, 0.8]

    ax = plot_history(Fitted())
    assert ax.get_lines()[0].get_label() == "train loss"
    ax = plot_confusion_matrix(["a", "b", "b"], ["a", "b", "a"], normalize=True)
    np.testing.assert_allclose(ax.images[0].get_array(), [[1, 0], [0.5, 0.5]])
    assert len(plot_fit_1d(lambda g: g, [0, 1], [0, 1]).get_lines()) == 2
    assert len(plot_timings([8, 16], {"cpu": [2.0, 1.0], "cuda": [3.0, 0.5]}).get_lines()) == 2
    with pytest.raises(TypeError):
        plot_history(42)


def _example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_picture_examples_write_pngs(tmp_path):
    paths = _example("plot_seed_regression").main(["--epochs", "20", "--out", str(tmp_path)])
    _example("plot_crossover").main(["--samples", "64", "--epochs", "1", "--hidden", "8", "--batch-sizes", "16",
                                     "64", "--out", str(tmp_path)])
    for path in [*paths, tmp_path / "crossover.png"]:
        with open(path, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
