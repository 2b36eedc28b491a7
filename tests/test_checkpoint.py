"""Checkpoints: bit-exact round trips, resuming equals never stopping, atomic writes, and clear errors for
truncated, corrupt, foreign and future-version files."""
import json
import os
import pathlib
import zipfile

import numpy as np
import pytest

import fastbp
from fastbp import checkpoint
from fastbp.checkpoint import CheckpointError


def problem(seed=0, n=37):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)), rng.integers(0, 3, size=n)


def make_trainer(dtype=np.float32, optimizer="adam", lr=None, **kwargs):
    # two activations (a per-layer list round-trips), of the relu family: the fused narrow kernel most tests share
    model = fastbp.MLP([5, 9, 7, 3], ["relu", "leaky_relu"], dtype=dtype, seed=3)
    lr = fastbp.StepDecay(0.05, step_size=2, gamma=0.5) if lr is None else lr
    extra = dict(momentum=0.9, nesterov=True) if optimizer == "sgd" else dict(betas=(0.8, 0.99))
    return fastbp.Trainer(model, loss="softmax_cross_entropy", optimizer=optimizer, lr=lr, batch_size=8, seed=4,
                          **(extra | kwargs))


def full_state(trainer, with_times=True):
    """Everything a trainer holds; epoch wall-clock times only where the same run is compared."""
    history = trainer.history.as_dict()
    if not with_times:
        history.pop("time")
    return (trainer.model.flat_parameters().tobytes(), trainer.opt_state.tobytes(), trainer.steps_done,
            trainer.epochs_done, repr(trainer._rng.bit_generator.state), repr(history))


@pytest.mark.parametrize("act", ["relu", "sigmoid", "tanh", "identity", "leaky_relu"])
def test_model_round_trip_is_bit_exact(tmp_path, dtype, act):
    model = fastbp.MLP([4, 6, 2], act, dtype=dtype, seed=7)
    model.weights[0][0, 0] = np.nextafter(model.weights[0][0, 0], dtype(1))  # not representable in decimal
    path = tmp_path / "model.npz"
    model.save(path)
    loaded = fastbp.MLP.load(path)
    assert (loaded.sizes, loaded.activations, loaded.dtype, loaded.seed) == (model.sizes, model.activations,
                                                                             model.dtype, model.seed)
    for a, b in zip(model.weights + model.biases, loaded.weights + loaded.biases):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("lr", [0.03, fastbp.Constant(0.02), fastbp.ExponentialDecay(0.05, 0.9),
                                fastbp.StepDecay(0.05, 2, 0.5)], ids=["number", "Constant", "Exponential", "Step"])
def test_trainer_round_trip_is_bit_exact(tmp_path, lr):
    X, y = problem()
    trainer = make_trainer(lr=lr)
    trainer.fit(X, y, epochs=3, validation_data=(X, y))
    path = str(tmp_path / "trainer.npz")
    trainer.save(path)
    loaded = fastbp.Trainer.load(path)
    assert full_state(loaded) == full_state(trainer)
    assert loaded.lr == lr and type(loaded.lr) is type(lr)
    for name in ("loss", "optimizer", "momentum", "dampening", "nesterov", "weight_decay", "betas", "eps",
                 "batch_size", "device", "seed"):
        assert getattr(loaded, name) == getattr(trainer, name), name


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_equals_uninterrupted(tmp_path, dtype, optimizer):
    """N epochs, save, load, M more == N + M epochs in one go (shuffling, schedule and optimizer state)."""
    X, y = problem()
    first = make_trainer(dtype, optimizer)
    first.fit(X, y, epochs=3)
    first.save(tmp_path / "t.npz")
    resumed = fastbp.Trainer.load(tmp_path / "t.npz")
    resumed.fit(X, y, epochs=4)
    straight = make_trainer(dtype, optimizer)
    straight.fit(X, y, epochs=7)
    assert full_state(resumed, with_times=False) == full_state(straight, with_times=False)


def test_custom_schedule_needs_lr_on_load(tmp_path):
    X, y = problem()
    trainer = make_trainer(lr=lambda epoch: 0.05 / (1 + epoch))
    trainer.fit(X, y, epochs=2)
    trainer.save(tmp_path / "t.npz")
    with pytest.raises(CheckpointError, match=r"custom learning-rate callable .*Trainer.load\(path, lr="):
        fastbp.Trainer.load(tmp_path / "t.npz")
    loaded = fastbp.Trainer.load(tmp_path / "t.npz", lr=lambda epoch: 0.05 / (1 + epoch))
    loaded.fit(X, y, epochs=2)
    trainer.fit(X, y, epochs=2)
    assert full_state(loaded, with_times=False) == full_state(trainer, with_times=False)


def test_trainer_file_is_plain_npz_without_pickle(tmp_path):
    trainer = make_trainer()
    trainer.save(tmp_path / "t.npz")
    with np.load(tmp_path / "t.npz", allow_pickle=False) as data:
        names = set(data.files)
        assert all(data[name].dtype != object for name in names)
        meta = json.loads(data["meta"].tobytes())
    assert meta["format"] == "fastbp-checkpoint" and meta["format_version"] == checkpoint.FORMAT_VERSION
    assert meta["kind"] == "trainer"
    assert {"weight_0", "bias_0", "weight_2", "bias_2", "opt_state", "history_loss"} <= names
    assert fastbp.MLP.load(tmp_path / "t.npz").sizes == [5, 9, 7, 3]  # the model part of a trainer file


def test_device_override_and_path_types(tmp_path):
    trainer = make_trainer()
    trainer.save(str(tmp_path / "a.npz"))
    trainer.save(pathlib.Path(tmp_path / "b.npz"))
    trainer.save(os.fsencode(tmp_path / "c.npz"))
    for name in ("a.npz", "b.npz", "c.npz"):
        assert fastbp.Trainer.load(tmp_path / name, device="cpu").device == "cpu"
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "b.npz", "c.npz"]  # no temporary files left


# -- atomic writes ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("failure", ["during-write", "at-rename", "interrupt"])
def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch, failure):
    path = tmp_path / "t.npz"
    trainer = make_trainer()
    trainer.save(path)
    good = path.read_bytes()
    X, y = problem()
    trainer.fit(X, y, epochs=1)
    error = KeyboardInterrupt if failure == "interrupt" else OSError

    if failure == "at-rename":
        def broken_replace(src, dst):
            raise OSError("disk full")
        monkeypatch.setattr(checkpoint.os, "replace", broken_replace)
    else:
        real_savez = np.savez

        def broken_savez(file, **arrays):
            real_savez(file, **{k: v for k, v in list(arrays.items())[:2]})  # a partial file on disk...
            raise error("crash mid-write")  # ...then the crash
        monkeypatch.setattr(checkpoint.np, "savez", broken_savez)
    with pytest.raises(error):
        trainer.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["t.npz"]  # the temporary file was removed
    assert fastbp.Trainer.load(path).epochs_done == 0


# -- bad files -------------------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "good.npz"
    trainer = make_trainer()
    trainer.fit(*problem(), epochs=1)
    trainer.save(path)
    return path


def rewrite(path, mutate_meta=None, mutate_arrays=None):
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    meta = json.loads(arrays.pop("meta").tobytes())
    if mutate_meta:
        mutate_meta(meta)
    if mutate_arrays:
        mutate_arrays(arrays)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(path, **arrays)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_file(saved, fraction):
    data = saved.read_bytes()
    saved.write_bytes(data[:int(len(data) * fraction)])
    for load in (fastbp.Trainer.load, fastbp.MLP.load):
        with pytest.raises(CheckpointError, match=r"truncated or corrupt|not a fastbp checkpoint|not a readable"):
            load(saved)


def test_corrupt_bytes(saved):
    data = bytearray(saved.read_bytes())
    with zipfile.ZipFile(saved) as archive:
        info = archive.getinfo("weight_0.npy")
    middle = info.header_offset + 30 + len(info.filename) + 200  # inside weight_0's stored data
    data[middle:middle + 16] = bytes(16)
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"truncated or corrupt.*(CRC|Bad)"):
        fastbp.Trainer.load(saved)


@pytest.mark.parametrize("kind", ["text", "empty", "npy", "foreign-npz", "pickled-npz", "meta-not-json",
                                  "meta-wrong-format"])
def test_foreign_files(tmp_path, kind):
    path = tmp_path / "x.npz"
    if kind == "text":
        path.write_text("hello, I am not a checkpoint\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.arange(3))
    elif kind == "foreign-npz":
        np.savez(path, a=np.arange(3))
    elif kind == "pickled-npz":
        np.savez(path, meta=np.array([{"format": "fastbp-checkpoint"}], dtype=object))
    elif kind == "meta-not-json":
        np.savez(path, meta=np.frombuffer(b"\xff\xfenot json", np.uint8))
    else:
        np.savez(path, meta=np.frombuffer(json.dumps({"format": "something-else"}).encode(), np.uint8))
    with pytest.raises(CheckpointError, match=r"not a fastbp checkpoint|truncated or corrupt|pickled|corrupt"):
        fastbp.Trainer.load(path)
    with pytest.raises(ValueError):  # CheckpointError is a ValueError
        fastbp.MLP.load(path)


def test_future_version(saved):
    rewrite(saved, lambda meta: meta.update(format_version=checkpoint.FORMAT_VERSION + 1, fastbp_version="9.0"))
    with pytest.raises(CheckpointError, match=r"written by a newer fastbp \(checkpoint format version 2, fastbp 9.0\)"
                                              r".*Upgrade fastbp"):
        fastbp.Trainer.load(saved)


@pytest.mark.parametrize("damage, pattern", [
    (dict(meta=lambda m: m.update(format_version="1")), r"invalid checkpoint format version '1'"),
    (dict(meta=lambda m: m.update(kind="optimizer")), r"unknown checkpoint kind 'optimizer'"),
    (dict(meta=lambda m: m["model"].update(sizes=[5, 0, 3])), r"checkpoint model: sizes\[1\] must be >= 1"),
    (dict(meta=lambda m: m["model"].update(activations=["relu", "swish"])), r"checkpoint model: activation\[1\]"),
    (dict(meta=lambda m: m["model"].update(dtype="float16")), r"checkpoint model: dtype must be one of"),
    (dict(meta=lambda m: m["model"].pop("sizes")), r"checkpoint model: .*lacks the field 'sizes'"),
    (dict(meta=lambda m: m["trainer"].update(loss="hinge")), r"checkpoint trainer: loss must be one of"),
    (dict(meta=lambda m: m["trainer"].update(steps_done=-1)), r"checkpoint trainer: steps_done must be >= 0"),
    (dict(meta=lambda m: m["trainer"].update(batch_size=0)), r"checkpoint trainer: batch_size must be >= 1"),
    (dict(meta=lambda m: m["trainer"].update(rng_state={"bit_generator": "MT19937"})), r"rng_state must be a PCG64"),
    (dict(meta=lambda m: m["trainer"]["rng_state"].update(state="x")), r"invalid rng_state"),
    (dict(meta=lambda m: m["trainer"].update(lr={"type": "Cosine"})), r"unknown learning-rate schedule 'Cosine'"),
    (dict(meta=lambda m: m["trainer"]["lr"].update(step_size=0)), r"step_size must be >= 1"),
    (dict(arrays=lambda a: a.update(weight_1=a["weight_1"][:, :3])),
     r"checkpoint model: weights\[1\] must have shape \(9, 7\)"),
    (dict(arrays=lambda a: a.update(bias_0=a["bias_0"].astype(np.float64))), r"biases\[0\] must have .*dtype float32"),
    (dict(arrays=lambda a: a.pop("bias_2")), r"lacks the array 'bias_2'"),
    (dict(arrays=lambda a: a["weight_0"].__setitem__((0, 0), np.nan)), r"checkpoint model: weights\[0\] contains NaN"),
    (dict(arrays=lambda a: a.update(opt_state=a["opt_state"][:1])),
     r"checkpoint trainer: opt_state must have shape \(2, "),
    (dict(arrays=lambda a: a["opt_state"].__setitem__((1, 0), np.inf)), r"opt_state contains NaN or inf"),
    (dict(arrays=lambda a: a.update(history_loss=a["history_loss"][:0])), r"history loss has 0 entries"),
    (dict(arrays=lambda a: a.pop("history_epoch")), r"history lacks the field 'epoch'"),
])
def test_damaged_fields(saved, damage, pattern):
    rewrite(saved, damage.get("meta"), damage.get("arrays"))
    with pytest.raises(CheckpointError, match=pattern):
        fastbp.Trainer.load(saved)


def test_model_file_is_not_a_trainer(tmp_path):
    fastbp.MLP([2, 3]).save(tmp_path / "m.npz")
    with pytest.raises(CheckpointError, match=r"holds a model, not a trainer; read it with fastbp.MLP.load"):
        fastbp.Trainer.load(tmp_path / "m.npz")


def test_directory_and_missing_paths(tmp_path):
    with pytest.raises(IsADirectoryError):
        fastbp.MLP.load(tmp_path)
    with pytest.raises(IsADirectoryError):
        fastbp.MLP([2, 3]).save(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        fastbp.Trainer.load(tmp_path / "missing.npz")


def test_checkpoint_saved_from_a_callback_resumes_exactly(tmp_path):
    """Callbacks see the current epoch's model and optimizer state, so a per-epoch checkpoint is consistent."""
    X, y = problem()

    def save_each_epoch(trainer, history):
        trainer.save(tmp_path / f"epoch{trainer.epochs_done}.npz")

    trainer = make_trainer()
    trainer.fit(X, y, epochs=5, callbacks=[save_each_epoch])
    resumed = fastbp.Trainer.load(tmp_path / "epoch3.npz")
    assert resumed.epochs_done == 3 and len(resumed.history.loss) == 3
    resumed.fit(X, y, epochs=2)
    assert full_state(resumed, with_times=False) == full_state(trainer, with_times=False)
