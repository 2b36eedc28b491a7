"""The Trainer owns its state: state_dict lists all of it, from_state_dict / load_state_dict bring it back, and
public calls copy nothing they need not (the CPU trains the model's own memory; predict never touches the
optimizer state). Also the shape of the host side: one backend interface, no import cycle."""
import ast
import pathlib

import numpy as np
import pytest

import fastbp
from fastbp.backends.base import Backend
from fastbp.backends.cpu import CPUBackend

PACKAGE = pathlib.Path(fastbp.__file__).parent


def problem(seed=0, n=45):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)), rng.integers(0, 3, size=n)


def make_trainer(optimizer="adam", lr=None, seed=4):
    model = fastbp.MLP([5, 9, 3], "tanh", seed=3)
    lr = fastbp.ExponentialDecay(0.05, 0.9) if lr is None else lr
    return fastbp.Trainer(model, loss="softmax_cross_entropy", optimizer=optimizer, lr=lr, batch_size=8, seed=seed)


def full_state(trainer):
    history = trainer.history.as_dict()
    history.pop("time")
    return (trainer.model.flat_parameters().tobytes(), trainer.opt_state.tobytes(), trainer.steps_done,
            trainer.epochs_done, repr(trainer._rng.bit_generator.state), repr(history))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_from_state_dict_continues_exactly(optimizer):
    X, y = problem()
    trainer = make_trainer(optimizer)
    trainer.fit(X, y, epochs=3, validation_data=(X, y))
    state = trainer.state_dict()
    assert set(state) == {"model", "trainer", "opt_state", "history"}
    copy = fastbp.Trainer.from_state_dict(state)
    assert full_state(copy) == full_state(trainer)
    copy.fit(X, y, epochs=2)
    trainer.fit(X, y, epochs=2)
    assert full_state(copy) == full_state(trainer)


def test_state_dict_is_a_snapshot_not_a_view():
    X, y = problem()
    trainer = make_trainer()
    trainer.fit(X, y, epochs=1)
    state = trainer.state_dict()
    before = state["model"]["weights"][0].copy(), state["opt_state"].copy()
    trainer.fit(X, y, epochs=1)
    np.testing.assert_array_equal(state["model"]["weights"][0], before[0])
    np.testing.assert_array_equal(state["opt_state"], before[1])


def test_load_state_dict_into_another_trainer_then_both_train_alike():
    X, y = problem()
    trainer = make_trainer()
    trainer.fit(X, y, epochs=2)
    other = make_trainer(seed=99)  # another RNG seed: the state's RNG replaces it
    other.load_state_dict(trainer.state_dict())
    assert full_state(other) == full_state(trainer)
    other.fit(X, y, epochs=2)
    trainer.fit(X, y, epochs=2)
    assert full_state(other) == full_state(trainer)


@pytest.mark.parametrize("damage, error, pattern", [
    (lambda s: s["trainer"].update(optimizer="sgd"), ValueError, r"optimizer 'sgd' is not this trainer's 'adam'"),
    (lambda s: s.update(opt_state=s["opt_state"][:1]), ValueError, r"opt_state must have shape \(2, "),
    (lambda s: s["model"]["weights"][1].__setitem__((0, 0), np.inf), ValueError, r"weights\[1\] contains NaN"),
    (lambda s: s["model"].update(sizes=[5, 8, 3]), ValueError, r"sizes"),
    (lambda s: s["trainer"].update(rng_state={"bit_generator": "MT19937"}), ValueError, r"PCG64"),
    (lambda s: s["history"].update(loss=s["history"]["loss"][:1]), ValueError, r"history loss has 1 entries"),
    (lambda s: s.pop("history"), ValueError, r"lacks the field 'history'"),
])
def test_rejected_state_changes_nothing(damage, error, pattern):
    X, y = problem()
    source = make_trainer()
    source.fit(X, y, epochs=3)
    state = source.state_dict()
    damage(state)
    target = make_trainer()
    target.fit(X, y, epochs=1)
    before = full_state(target)
    with pytest.raises(error, match=pattern):
        target.load_state_dict(state)
    assert full_state(target) == before


def test_custom_schedule_keeps_the_trainers_own_lr():
    X, y = problem()
    schedule = lambda epoch: 0.05  # noqa: E731
    source = make_trainer(lr=schedule)
    source.fit(X, y, epochs=1)
    target = make_trainer(lr=0.01)
    target.load_state_dict(source.state_dict())
    assert target.lr == 0.01
    with pytest.raises(ValueError, match="custom learning-rate callable"):
        fastbp.Trainer.from_state_dict(source.state_dict())
    assert fastbp.Trainer.from_state_dict(source.state_dict(), lr=schedule).lr is schedule


def test_model_state_dict_round_trip():
    model = fastbp.MLP([4, 6, 2], ["relu"], dtype=np.float64, seed=5)
    clone = fastbp.MLP.from_state_dict(model.state_dict())
    assert (clone.sizes, clone.activations, clone.dtype, clone.seed) == (model.sizes, model.activations,
                                                                         model.dtype, model.seed)
    assert clone.flat_parameters().tobytes() == model.flat_parameters().tobytes()
    other = fastbp.MLP([4, 6, 2], ["relu"], dtype=np.float64, seed=6)
    other.load_state_dict(model.state_dict())
    assert other.flat_parameters().tobytes() == model.flat_parameters().tobytes()
    with pytest.raises(ValueError, match="activations"):
        fastbp.MLP([4, 6, 2], ["tanh"], dtype=np.float64).load_state_dict(model.state_dict())


# -- no needless copies ----------------------------------------------------------------------------------------------
def test_cpu_trains_the_models_own_memory():
    X, y = problem()
    trainer = make_trainer()
    weights = trainer.model.weights[0]
    trainer.fit(X, y, epochs=1)
    assert trainer._backend.params is trainer.model._flat
    assert np.shares_memory(weights, trainer.model._flat) and trainer.model.weights[0] is weights


def test_in_place_edits_and_replaced_arrays_are_seen_and_get_results():
    X, y = problem()
    trainer, reference = make_trainer(), make_trainer()
    trainer.fit(X, y, epochs=1)
    reference.fit(X, y, epochs=1)
    # In place, between calls: the next call starts from the edited values.
    trainer.model.weights[0][...] = 0.25
    reference.model.weights[0][...] = 0.25
    np.testing.assert_array_equal(trainer.predict(X), reference.predict(X))
    # A replaced array is read at the next call and receives its result.
    mine = np.full_like(trainer.model.biases[1], 0.5)
    trainer.model.biases[1] = mine
    reference.model.biases[1][...] = 0.5
    trainer.fit(X, y, epochs=2)
    reference.fit(X, y, epochs=2)
    assert trainer.model.biases[1] is mine
    np.testing.assert_array_equal(mine, reference.model.biases[1])
    assert trainer.model.flat_parameters().tobytes() == reference.model.flat_parameters().tobytes()


def test_predict_and_evaluate_never_touch_the_optimizer_state(monkeypatch):
    X, y = problem()
    trainer = make_trainer()
    trainer.fit(X, y, epochs=1)
    state = trainer.opt_state.copy()

    def forbidden(*args):
        raise AssertionError("predict touched the optimizer state")

    for name in ("optimizer_state", "set_optimizer_state", "snapshot", "restore", "publish_parameters"):
        monkeypatch.setattr(trainer._backend, name, forbidden)
    trainer.predict(X[:1])
    trainer.evaluate(X, y)
    monkeypatch.undo()
    np.testing.assert_array_equal(trainer.opt_state, state)


# -- the shape of the host side ----------------------------------------------------------------------------------------
def test_backends_implement_the_one_interface():
    assert issubclass(CPUBackend, Backend)
    assert not CPUBackend.__abstractmethods__
    source = (PACKAGE / "backends" / "cuda.py").read_text()
    assert "class CUDABackend(Backend)" in source


@pytest.mark.parametrize("module", ["trainer.py", "distributed.py"])
def test_the_training_loop_never_branches_on_the_device(module):
    tree = ast.parse((PACKAGE / module).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            constants = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant)]
            assert not {"cpu", "cuda"} & set(constants), ast.unparse(node)


def _import_graph():
    """{module: modules it imports}, from every import statement in fastbp (functions' too)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = ".".join(parts[:-1])
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:  # "from . import checkpoint" imports a module
                    name = f"{target}.{alias.name}"
                    where = PACKAGE.parent / pathlib.Path(*name.split("."))
                    is_module = where.with_suffix(".py").exists() or (where / "__init__.py").exists()
                    deps.add(name if is_module else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == "fastbp")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "fastbp":
                deps.add(node.module)
        graph[module] = deps - {module}
    return graph


def test_no_import_cycle_among_fastbps_modules():
    graph = _import_graph()
    assert "fastbp.checkpoint" in graph and "fastbp.trainer" in graph["fastbp"]
    state = {}

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != "open", " -> ".join(path + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
