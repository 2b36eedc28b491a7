"""Bad input gets a clear error and changes nothing.

One table, ``CASES``: every public entry point with every kind of bad argument. Each case names the
exception it must raise and a pattern its message must match (the pattern names the argument; most also
name what was expected). Before each call the test takes a snapshot of everything a trainer holds (weights,
biases, optimizer state, step and epoch counters, shuffling RNG, history, learning rate) and checks that
the rejected call left all of it exactly as it was.
"""
import os

import numpy as np
import pytest

import fastbp

N, K = 10, 3


def data(rng=None):
    rng = rng or np.random.default_rng(0)
    return rng.normal(size=(N, 4)).astype(np.float32), rng.integers(0, K, size=N)


def trained_trainer(loss="softmax_cross_entropy"):
    """A trainer with history, optimizer state and an advanced RNG, so that any change would show."""
    # sigmoid: its fused narrow kernels for these three losses are compiled for other tests too
    model = fastbp.MLP([4, 5, K], "sigmoid", seed=0)
    trainer = fastbp.Trainer(model, loss=loss, optimizer="adam", lr=0.01, batch_size=4, seed=0)
    X, y = data()
    if loss == "binary_cross_entropy":
        y = np.random.default_rng(1).uniform(size=(N, K))
    elif loss == "mse":
        y = np.random.default_rng(1).normal(size=(N, K))
    trainer.fit(X, y, epochs=2)
    return trainer


def snapshot(trainer):
    model = trainer.model
    return dict(
        weights=[np.array(w, copy=True) for w in model.weights],
        weight_ids=[id(w) for w in model.weights],
        biases=[np.array(b, copy=True) for b in model.biases],
        bias_ids=[id(b) for b in model.biases],
        opt_state=trainer.opt_state.copy(),
        steps=trainer.steps_done,
        epochs=trainer.epochs_done,
        rng=repr(trainer._rng.bit_generator.state),
        history=repr(trainer.history.as_dict()),
        lr=trainer.lr,
        settings=(trainer.loss, trainer.optimizer, trainer.batch_size, trainer.device, trainer.seed),
        model_settings=(list(model.sizes), list(model.activations), model.dtype, model.seed),
    )


def assert_unchanged(before, after):
    for key in before:
        if key in ("weights", "biases"):
            for a, b in zip(before[key], after[key]):
                assert a.dtype == b.dtype and a.shape == b.shape
                np.testing.assert_array_equal(a, b)
        elif key == "opt_state":
            np.testing.assert_array_equal(before[key], after[key])
        else:
            assert before[key] == after[key], key


X0, Y0 = data()
NAN, INF = float("nan"), float("inf")


def with_value(X, index, value):
    X = np.array(X, dtype=np.float64)
    X[index] = value
    return X


def mlp(**kwargs):
    args = dict(sizes=[4, 5, K], activation="tanh", seed=0) | kwargs
    return lambda t: fastbp.MLP(args.pop("sizes"), **args)


def trainer_with(**kwargs):
    return lambda t: fastbp.Trainer(fastbp.MLP([4, 5, K], seed=0), **({"loss": "mse"} | kwargs))


def fit(X=X0, y=Y0, **kwargs):
    return lambda t: t.fit(X, y, **({"epochs": 1} | kwargs))


def replace_param(kind, layer, value):
    def prepare(t):
        getattr(t.model, kind)[layer] = value(t)
    return prepare


def read_only_weight(t):
    w = t.model.weights[0].copy()
    w.flags.writeable = False
    t.model.weights[0] = w


def aliased_bias(t):
    t.model.biases[1] = t.model.weights[1][0]  # a (3,) row view of weights[1]: shares its memory


# (id, prepare (runs before the snapshot) or None, the call, exception, message pattern, trainer loss)
CASES = [
    # -- MLP ----------------------------------------------------------------------------------------------
    ("mlp-one-layer", None, mlp(sizes=[4]), ValueError, r"sizes needs at least two layers", None),
    ("mlp-no-layers", None, mlp(sizes=[]), ValueError, r"sizes needs at least two layers", None),
    ("mlp-zero-width", None, mlp(sizes=[4, 0, 3]), ValueError, r"sizes\[1\] must be >= 1; got 0", None),
    ("mlp-negative-width", None, mlp(sizes=[4, -2]), ValueError, r"sizes\[1\] must be >= 1; got -2", None),
    ("mlp-float-width", None, mlp(sizes=[4, 2.5]), TypeError, r"sizes\[1\] must be an integer; got float", None),
    ("mlp-bool-width", None, mlp(sizes=[4, True]), TypeError, r"sizes\[1\] must be an integer; got bool", None),
    ("mlp-sizes-string", None, mlp(sizes="4,3"), TypeError, r"sizes must be a sequence", None),
    ("mlp-sizes-int", None, mlp(sizes=5), TypeError, r"sizes must be a sequence", None),
    ("mlp-activation-typo", None, mlp(activation="tahn"), ValueError,
     r"activation must be one of \[.*'tanh'.*\]; got 'tahn'. Did you mean 'tanh'\?", None),
    ("mlp-activation-case", None, mlp(activation="ReLU"), ValueError, r"Did you mean 'relu'\?", None),
    ("mlp-activation-unknown", None, mlp(activation="swish"), ValueError,
     r"activation must be one of \['identity', 'leaky_relu', 'relu', 'sigmoid', 'tanh'\]; got 'swish'", None),
    ("mlp-activation-count", None, mlp(activation=["relu", "tanh"]), ValueError,
     r"activation must be one name or a list with one name per hidden layer \(1\); got 2", None),
    ("mlp-activation-type", None, mlp(activation=3), TypeError, r"activation must be a name", None),
    ("mlp-activation-list-item", None, mlp(activation=[None]), TypeError, r"activation\[0\] must be a string", None),
    ("mlp-dtype-float16", None, mlp(dtype=np.float16), ValueError,
     r"dtype must be numpy.float32 or numpy.float64; got float16", None),
    ("mlp-dtype-int", None, mlp(dtype=np.int32), ValueError, r"dtype must be .*; got int32", None),
    ("mlp-dtype-nonsense", None, mlp(dtype="banana"), TypeError, r"dtype must be .*; got 'banana'", None),
    ("mlp-seed-negative", None, mlp(seed=-1), ValueError, r"seed must be >= 0; got -1", None),
    ("mlp-seed-float", None, mlp(seed=1.5), TypeError, r"seed must be an integer; got float", None),
    # -- Trainer ------------------------------------------------------------------------------------------
    ("trainer-model-type", None, lambda t: fastbp.Trainer("model", loss="mse"), TypeError,
     r"model must be a fastbp.MLP; got str", None),
    ("trainer-loss-typo", None, trainer_with(loss="softmax_crossentropy"), ValueError,
     r"loss must be one of \[.*\]; got 'softmax_crossentropy'. Did you mean 'softmax_cross_entropy'\?", None),
    ("trainer-loss-case", None, trainer_with(loss="MSE"), ValueError, r"Did you mean 'mse'\?", None),
    ("trainer-loss-none", None, trainer_with(loss=None), TypeError, r"loss must be a string", None),
    ("trainer-optimizer-typo", None, trainer_with(optimizer="adamm"), ValueError,
     r"optimizer must be one of \['adam', 'adamw', 'sgd'\]; got 'adamm'. Did you mean 'adam'\?", None),
    ("trainer-optimizer-unknown", None, trainer_with(optimizer="rmsprop"), ValueError,
     r"optimizer must be one of \['adam', 'adamw', 'sgd'\]; got 'rmsprop'", None),
    ("trainer-clip-zero", None, trainer_with(clip_grad_norm=0.0), ValueError, r"clip_grad_norm must be > 0", None),
    ("trainer-device-unknown", None, trainer_with(device="gpu"), ValueError,
     r"device must be one of \['auto', 'cpu', 'cuda'\]; got 'gpu'", None),
    ("trainer-lr-zero", None, trainer_with(lr=0), ValueError, r"lr must be > 0.0; got 0.0", None),
    ("trainer-lr-negative", None, trainer_with(lr=-0.1), ValueError, r"lr must be > 0.0; got -0.1", None),
    ("trainer-lr-nan", None, trainer_with(lr=NAN), ValueError, r"lr must be finite; got nan", None),
    ("trainer-lr-inf", None, trainer_with(lr=INF), ValueError, r"lr must be finite; got inf", None),
    ("trainer-lr-string", None, trainer_with(lr="0.1"), TypeError, r"lr must be a real number; got str", None),
    ("trainer-lr-bool", None, trainer_with(lr=True), TypeError, r"lr must be a real number; got bool", None),
    ("trainer-batch-zero", None, trainer_with(batch_size=0), ValueError, r"batch_size must be >= 1; got 0", None),
    ("trainer-batch-negative", None, trainer_with(batch_size=-5), ValueError, r"batch_size must be >= 1", None),
    ("trainer-batch-float", None, trainer_with(batch_size=2.0), TypeError, r"batch_size must be an integer", None),
    ("trainer-momentum-negative", None, trainer_with(momentum=-0.1), ValueError, r"momentum must be >= 0", None),
    ("trainer-momentum-nan", None, trainer_with(momentum=NAN), ValueError, r"momentum must be finite", None),
    ("trainer-dampening-range", None, trainer_with(dampening=1.5), ValueError, r"dampening must be <= 1", None),
    ("trainer-nesterov-type", None, trainer_with(nesterov="yes"), TypeError, r"nesterov must be True or False", None),
    ("trainer-nesterov-no-momentum", None, trainer_with(nesterov=True), ValueError,
     r"nesterov=True requires momentum > 0", None),
    ("trainer-betas-length", None, trainer_with(optimizer="adam", betas=(0.9,)), TypeError,
     r"betas must be a pair", None),
    ("trainer-beta1-one", None, trainer_with(optimizer="adam", betas=(1.0, 0.999)), ValueError,
     r"betas\[0\] must be < 1", None),
    ("trainer-eps-zero", None, trainer_with(optimizer="adam", eps=0.0), ValueError, r"eps must be > 0", None),
    ("trainer-weight-decay", None, trainer_with(weight_decay=-1.0), ValueError, r"weight_decay must be >= 0", None),
    ("trainer-seed-negative", None, trainer_with(seed=-3), ValueError, r"seed must be >= 0; got -3", None),
    # Options the chosen optimizer (or device) does not read are refused, naming the option (torch.optim.Adam has
    # no momentum argument; before, these trained exactly as if they had been left out).
    ("trainer-momentum-with-adam", None, trainer_with(optimizer="adam", momentum=0.9), ValueError,
     r"momentum=0.9 has no effect with optimizer='adam' \(Adam's momentum is betas\[0\]\); momentum applies to "
     r"optimizer='sgd'", None),
    ("trainer-momentum-with-adamw", None, trainer_with(optimizer="adamw", momentum=0.5), ValueError,
     r"momentum=0.5 has no effect with optimizer='adamw'", None),
    ("trainer-nesterov-with-adam", None, trainer_with(optimizer="adam", nesterov=True), ValueError,
     r"nesterov=True has no effect with optimizer='adam'", None),
    ("trainer-dampening-with-adam", None, trainer_with(optimizer="adam", dampening=0.1), ValueError,
     r"dampening=0.1 has no effect with optimizer='adam'", None),
    ("trainer-betas-with-sgd", None, trainer_with(optimizer="sgd", betas=(0.8, 0.99)), ValueError,
     r"betas=\(0.8, 0.99\) has no effect with optimizer='sgd' \(SGD's momentum is momentum=\); betas applies to "
     r"optimizer='adam' or 'adamw'", None),
    ("trainer-eps-with-sgd", None, trainer_with(eps=1e-6), ValueError,
     r"eps=1e-06 has no effect with optimizer='sgd'", None),
    ("trainer-dampening-without-momentum", None, trainer_with(dampening=0.5), ValueError,
     r"dampening=0.5 has no effect without momentum", None),
    ("trainer-n-threads-with-cuda", None, trainer_with(device="cuda", n_threads=1), ValueError,
     r"n_threads=1 has no effect with device='cuda'", None),
    ("trainer-loss-cross-entropy", None, trainer_with(loss="cross_entropy"), ValueError,
     r"got 'cross_entropy'. For class labels \(PyTorch's nn.CrossEntropyLoss\) use 'softmax_cross_entropy'.*"
     r"For independent yes/no targets \(nn.BCEWithLogitsLoss\) use 'binary_cross_entropy'", None),
    ("trainer-device-gpu", None, trainer_with(device="gpu"), ValueError, r"got 'gpu'. Did you mean 'cuda'", None),
    ("mlp-activation-without-hidden-layer", None, mlp(sizes=[4, K], activation="tanh"), ValueError,
     r"activation='tanh' has no effect: MLP\(\[4, 3\]\) has no hidden layer", None),
    ("mlp-activation-gelu", None, mlp(activation="gelu"), ValueError, r"got 'gelu'. fastbp has no gelu", None),
    ("mlp-activation-softmax", None, mlp(activation="softmax"), ValueError,
     r"softmax is an output transform, set by the Trainer's loss", None),
    ("progress-every-with-bar", None, lambda t: fastbp.ProgressBar(5, mode="bar", every=2), ValueError,
     r"every=2 has no effect with mode='bar'", None),
    ("progress-total-epochs-type", None, lambda t: fastbp.ProgressBar("5"), TypeError,
     r"total_epochs must be an integer; got str", None),
    # -- fit: arguments -------------------------------------------------------------------------------------
    ("fit-epochs-negative", None, fit(epochs=-1), ValueError, r"epochs must be >= 0; got -1", None),
    ("fit-epochs-float", None, fit(epochs=2.5), TypeError, r"epochs must be an integer; got float", None),
    ("fit-epochs-none", None, fit(epochs=None), TypeError, r"epochs must be an integer; got NoneType", None),
    ("fit-validation-not-pair", None, fit(validation_data=(X0,)), TypeError,
     r"validation_data must be a pair \(X_val, y_val\); got a tuple of length 1", None),
    ("fit-validation-array", None, fit(validation_data=X0), TypeError,
     r"validation_data must be a pair \(X_val, y_val\); got ndarray", None),
    ("fit-validation-features", None, fit(validation_data=(X0[:, :3], Y0)), ValueError,
     r"validation_data X must have 4 columns .*; got shape \(10, 3\)", None),
    ("fit-validation-labels", None, fit(validation_data=(X0, Y0 + 5)), ValueError,
     r"validation_data y must hold class ids in \[0, 3\)", None),
    ("fit-patience-zero", None, fit(patience=0, validation_data=(X0, Y0)), ValueError,
     r"patience must be >= 1; got 0", None),
    ("fit-patience-without-validation", None, fit(patience=3), ValueError,
     r"patience \(early stopping\) needs validation_data", None),
    ("fit-target-loss-string", None, fit(target_loss="low"), TypeError, r"target_loss must be a real number", None),
    ("fit-target-loss-nan", None, fit(target_loss=NAN), ValueError, r"target_loss must be finite", None),
    ("fit-callbacks-single", None, fit(callbacks=lambda t, h: None), TypeError,
     r"callbacks must be a list of callables .*wrap a single callback in a list", None),
    ("fit-callbacks-item", None, fit(callbacks=[1]), TypeError, r"callbacks\[0\] must be callable; got int", None),
    ("fit-on-nonfinite", None, fit(on_nonfinite="ignore"), ValueError,
     r"on_nonfinite must be one of \['raise', 'warn'\]; got 'ignore'", None),
    ("fit-restore-best-type", None, fit(restore_best="yes"), TypeError, r"restore_best must be True or False", None),
    ("fit-restore-best-without-patience", None, fit(restore_best=False), ValueError,
     r"restore_best=False has no effect without early stopping", None),
    # -- fit: X -----------------------------------------------------------------------------------------------
    ("X-1d", None, fit(X=X0[:, 0]), ValueError,
     r"X must be a 2-D array of shape \(n_samples, n_features\); got shape \(10,\) \(use .reshape", None),
    ("X-3d", None, fit(X=X0[:, :, None]), ValueError, r"X must be a 2-D array .*; got shape \(10, 4, 1\)", None),
    ("X-scalar", None, fit(X=1.0), ValueError, r"X must be a 2-D array .*; got shape \(\)", None),
    ("X-features", None, fit(X=np.ones((N, 5))), ValueError,
     r"X must have 4 columns \(the network's input size\); got shape \(10, 5\)", None),
    ("X-empty", None, fit(X=np.ones((0, 4)), y=np.zeros(0, int)), ValueError,
     r"X is empty: it has 0 samples \(shape \(0, 4\)\)", None),
    ("X-nan", None, fit(X=with_value(X0, (3, 2), NAN)), ValueError,
     r"X must be finite \(no NaN or inf\); found nan at index \(3, 2\)", None),
    ("X-inf", None, fit(X=with_value(X0, (0, 1), -INF)), ValueError, r"X must be finite .*found -inf", None),
    ("X-overflows-float32", None, fit(X=with_value(X0, (5, 0), 1e300)), ValueError,
     r"X has a value too large for float32: 1e\+300 at index \(5, 0\)", None),
    ("X-object", None, fit(X=X0.astype(object)), TypeError,
     r"X must hold real numbers \(float or int\); got object dtype", None),
    ("X-string", None, fit(X=X0.astype(str)), TypeError, r"X must hold real numbers .*; got string dtype", None),
    ("X-complex", None, fit(X=X0.astype(complex)), TypeError, r"X must hold real numbers .*; got complex dtype", None),
    ("X-bool", None, fit(X=X0 > 0), TypeError, r"X must hold real numbers .*; got boolean dtype", None),
    ("X-datetime", None, fit(X=np.zeros((N, 4), "datetime64[s]")), TypeError, r"X must hold real numbers", None),
    ("X-ragged", None, fit(X=[[1.0, 2.0, 3.0, 4.0], [1.0]]), ValueError,
     r"X must be a 2-D array of numbers; numpy cannot convert it", None),
    ("X-none", None, fit(X=None), TypeError, r"X must hold real numbers .*; got object dtype", None),
    # -- fit: y -----------------------------------------------------------------------------------------------
    ("y-samples", None, fit(y=Y0[:9]), ValueError, r"y has 9 samples but X has 10", None),
    ("y-label-negative", None, fit(y=np.where(np.arange(N) == 4, -1, Y0)), ValueError,
     r"y must hold class ids in \[0, 3\) \(the output size\); got values from -1 to", None),
    ("y-label-too-large", None, fit(y=np.where(np.arange(N) == 4, 3, Y0)), ValueError,
     r"y must hold class ids in \[0, 3\) \(the output size\); got values from .* to 3", None),
    ("y-label-non-integer", None, fit(y=Y0 + 0.5), ValueError,
     r"y must hold integer class ids in \[0, 3\); got non-integer values such as", None),
    ("y-label-nan", None, fit(y=with_value(Y0, 2, NAN)), ValueError,
     r"y must hold integer class ids in \[0, 3\); got NaN or inf", None),
    ("y-label-string", None, fit(y=Y0.astype(str)), TypeError, r"y must hold integer class ids .*; got dtype <U", None),
    ("y-label-bool", None, fit(y=Y0 > 0), TypeError, r"y must hold integer class ids .*; got dtype bool", None),
    ("y-label-complex", None, fit(y=Y0.astype(complex)), TypeError, r"y must hold integer class ids", None),
    ("y-label-object", None, fit(y=np.array([1, None] * 5, dtype=object)), TypeError,
     r"y must hold integer class ids .*; got dtype object", None),
    ("y-onehot-columns", None, fit(y=np.eye(2)[Y0 % 2]), ValueError,
     r"y must have 3 columns \(one-hot or class-probability rows for 3 classes; class ids go in a 1-D array\)", None),
    ("y-probabilities-negative", None, fit(y=np.eye(K)[Y0] - 0.5), ValueError,
     r"y rows must be class probabilities \(>= 0\)", None),
    ("y-3d", None, fit(y=np.eye(K)[Y0][:, :, None]), ValueError, r"y must be a 2-D array .*got shape \(10, 3, 1\)",
     None),
    ("y-bce-above-one", None, fit(y=np.full((N, K), 1.5)), ValueError,
     r"y must lie in \[0, 1\] for binary_cross_entropy; got values from 1.5 to 1.5", "binary_cross_entropy"),
    ("y-bce-negative", None, fit(y=np.full((N, K), -0.1)), ValueError, r"y must lie in \[0, 1\]",
     "binary_cross_entropy"),
    ("y-bce-nan", None, fit(y=with_value(np.full((N, K), 0.5), (1, 1), NAN)), ValueError,
     r"y must be finite", "binary_cross_entropy"),
    ("y-mse-nan", None, fit(y=with_value(np.zeros((N, K)), (0, 0), NAN)), ValueError,
     r"y must be finite .*found nan at index \(0, 0\)", "mse"),
    ("y-mse-inf", None, fit(y=with_value(np.zeros((N, K)), (9, 2), INF)), ValueError, r"y must be finite", "mse"),
    ("y-mse-columns", None, fit(y=np.zeros(N)), ValueError,
     r"y must have 3 columns \(the network's output size\); got shape \(10,\)", "mse"),
    ("y-mse-bool", None, fit(y=np.zeros((N, K), bool)), TypeError, r"y must hold real numbers", "mse"),
    # -- fit: learning-rate schedule that returns a bad value at the first epoch -----------------------------
    ("schedule-nan", lambda t: t.set_lr(lambda epoch: NAN), fit(), ValueError,
     r"lr schedule at epoch 2 must be finite; got nan", None),
    ("schedule-negative", lambda t: t.set_lr(lambda epoch: -1.0), fit(), ValueError,
     r"lr schedule at epoch 2 must be >= 0.0; got -1.0", None),
    ("schedule-string", lambda t: t.set_lr(lambda epoch: "fast"), fit(), TypeError,
     r"the lr schedule must return a number; at epoch 2 it returned 'fast'", None),
    # -- user-replaced parameters ------------------------------------------------------------------------------
    ("param-dtype", replace_param("weights", 0, lambda t: t.model.weights[0].astype(np.float64)), fit(), TypeError,
     r"model.weights\[0\] must have the model's dtype float32; got float64", None),
    ("param-int-dtype", replace_param("biases", 0, lambda t: np.zeros(5, np.int64)), fit(), TypeError,
     r"model.biases\[0\] must have the model's dtype float32; got int64", None),
    ("param-shape", replace_param("weights", 1, lambda t: np.zeros((5, 4), np.float32)), fit(), ValueError,
     r"model.weights\[1\] must be an array of shape \(5, 3\); got \(5, 4\)", None),
    ("param-list", replace_param("weights", 1, lambda t: t.model.weights[1].tolist()), fit(), ValueError,
     r"model.weights\[1\] must be an array of shape \(5, 3\); got list", None),
    ("param-nan", replace_param("biases", 1, lambda t: np.array([0, NAN, 0], np.float32)), fit(), ValueError,
     r"model.biases\[1\] contains NaN or inf", None),
    ("param-read-only", read_only_weight, fit(), ValueError, r"model.weights\[0\] is read-only", None),
    ("param-aliased", aliased_bias, fit(), ValueError,
     r"model.biases\[1\] shares memory with model.weights\[1\]", None),
    ("param-missing-layer", lambda t: t.model.weights.pop(), fit(), ValueError,
     r"model.weights must be a list of 2 arrays; got 1 arrays", None),
    ("param-predict-dtype", replace_param("weights", 0, lambda t: t.model.weights[0].astype(np.float64)),
     lambda t: t.predict(X0), TypeError, r"model.weights\[0\] must have the model's dtype", None),
    # -- predict, evaluate, loss_and_grads ---------------------------------------------------------------------
    ("predict-features", None, lambda t: t.predict(np.ones((3, 2))), ValueError, r"X must have 4 columns", None),
    ("predict-nan", None, lambda t: t.predict(with_value(X0, (0, 0), NAN)), ValueError, r"X must be finite", None),
    ("predict-strings", None, lambda t: t.predict([["a", "b", "c", "d"]]), TypeError, r"X must hold real numbers",
     None),
    ("predict-empty", None, lambda t: t.predict(np.ones((0, 4))), ValueError, r"X is empty", None),
    ("evaluate-samples", None, lambda t: t.evaluate(X0, Y0[:3]), ValueError, r"y has 3 samples but X has 10", None),
    ("evaluate-label", None, lambda t: t.evaluate(X0, Y0 + 3), ValueError, r"y must hold class ids in \[0, 3\)",
     None),
    ("grads-inf", None, lambda t: t.loss_and_grads(with_value(X0, (1, 1), INF), Y0), ValueError,
     r"X must be finite", None),
    ("grads-samples", None, lambda t: t.loss_and_grads(X0, np.append(Y0, 0)), ValueError,
     r"y has 11 samples but X has 10", None),
    ("grads-bce-range", None, lambda t: t.loss_and_grads(X0, np.full((N, K), 2.0)), ValueError,
     r"y must lie in \[0, 1\]", "binary_cross_entropy"),
    # -- choose_learning_rate ----------------------------------------------------------------------------------
    ("search-no-candidates", None, lambda t: t.choose_learning_rate(X0, Y0, candidates=()), ValueError,
     r"candidates must name at least one learning rate", None),
    ("search-negative-candidate", None, lambda t: t.choose_learning_rate(X0, Y0, candidates=(0.1, -1)), ValueError,
     r"candidates\[1\] must be > 0.0; got -1.0", None),
    ("search-nan-candidate", None, lambda t: t.choose_learning_rate(X0, Y0, candidates=(NAN,)), ValueError,
     r"candidates\[0\] must be finite", None),
    ("search-scalar-candidates", None, lambda t: t.choose_learning_rate(X0, Y0, candidates=0.1), TypeError,
     r"candidates must be a sequence of learning rates", None),
    ("search-epochs-zero", None, lambda t: t.choose_learning_rate(X0, Y0, epochs=0), ValueError,
     r"epochs must be >= 1; got 0", None),
    ("search-fraction-one", None, lambda t: t.choose_learning_rate(X0, Y0, validation_fraction=1.0), ValueError,
     r"validation_fraction must be < 1", None),
    ("search-fraction-with-validation-data", None,
     lambda t: t.choose_learning_rate(X0, Y0, validation_data=(X0, Y0), validation_fraction=0.5), ValueError,
     r"validation_fraction=0.5 has no effect with validation_data", None),
    ("search-fraction-tiny", None, lambda t: t.choose_learning_rate(X0, Y0, validation_fraction=0.01), ValueError,
     r"validation_fraction=0.01 of 10 samples leaves no training or no validation samples", None),
    ("search-y-short", None, lambda t: t.choose_learning_rate(X0, Y0[:4]), ValueError,
     r"y has 4 samples but X has 10", None),
    ("search-validation-bad", None,
     lambda t: t.choose_learning_rate(X0, Y0, validation_data=(X0[:, :2], Y0)), ValueError,
     r"validation_data X must have 4 columns", None),
    ("search-param-dtype", replace_param("weights", 0, lambda t: t.model.weights[0].astype(np.float64)),
     lambda t: t.choose_learning_rate(X0, Y0), TypeError, r"model.weights\[0\] must have the model's dtype", None),
    ("set-lr-zero", None, lambda t: t.set_lr(0.0), ValueError, r"lr must be > 0.0; got 0.0", None),
    ("set-lr-string", None, lambda t: t.set_lr("0.1"), TypeError, r"lr must be a real number", None),
    # -- save / load -------------------------------------------------------------------------------------------
    ("model-save-path-type", None, lambda t: t.model.save(123), TypeError,
     r"path must be a file name \(str or os.PathLike\); got int 123", None),
    ("trainer-save-path-empty", None, lambda t: t.save(""), ValueError, r"path must be a file name", None),
    ("trainer-save-no-folder", None, lambda t: t.save("/nonexistent-folder/x.npz"), FileNotFoundError,
     r"cannot save to '/nonexistent-folder/x.npz': the folder '/nonexistent-folder' does not exist", None),
    ("model-save-bad-param", replace_param("weights", 0, lambda t: t.model.weights[0].astype(np.float64)),
     lambda t: t.model.save("/tmp/never-written.npz"), TypeError, r"model.weights\[0\] must have the model's dtype",
     None),
    ("model-load-missing", None, lambda t: fastbp.MLP.load("/nonexistent-folder/x.npz"), FileNotFoundError,
     r"no checkpoint at '/nonexistent-folder/x.npz'", None),
    ("model-load-path-type", None, lambda t: fastbp.MLP.load(3.5), TypeError, r"path must be a file name", None),
    ("trainer-load-device", None, lambda t: fastbp.Trainer.load("/nonexistent-folder/x.npz", device="tpu"),
     ValueError, r"device must be one of \['auto', 'cpu', 'cuda'\]; got 'tpu'", None),
    ("trainer-load-lr", None, lambda t: fastbp.Trainer.load("/nonexistent-folder/x.npz", lr=-1.0), ValueError,
     r"lr must be > 0.0; got -1.0", None),
]


def test_case_ids_are_unique():
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_rejected_and_changes_nothing(case):
    _, prepare, call, error, pattern, loss = case
    trainer = trained_trainer(loss or "softmax_cross_entropy")
    if prepare is not None:
        prepare(trainer)
    before = snapshot(trainer)
    with pytest.raises(error, match=pattern) as info:
        call(trainer)
    # Never a numba typing error or an error from deep inside numpy: the message, the error's class (a
    # builtin or one of fastbp's) and the line that raised it are ours.
    assert "numba" not in str(info.value).lower()
    module = type(info.value).__module__
    assert module == "builtins" or module.split(".")[0] == "fastbp", module
    raised_in = str(info.traceback[-1].path)
    assert f"{os.sep}fastbp{os.sep}" in raised_in and f"{os.sep}tests{os.sep}" not in raised_in, raised_in
    assert_unchanged(before, snapshot(trainer))


# -- accepted inputs that need a copy ---------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["fortran", "strided", "int", "float64-into-float32", "list", "read-only"])
def test_awkward_but_valid_arrays_are_accepted_by_copying(layout):
    X = np.random.default_rng(3).normal(size=(N, 4)).astype(np.float32)
    variants = {
        "fortran": np.asfortranarray(X),
        "strided": np.repeat(X, 2, axis=1)[:, ::2],
        "int": np.round(X * 10).astype(np.int32),
        "float64-into-float32": X.astype(np.float64),
        "list": X.tolist(),
        "read-only": np.require(X, requirements="C").copy(),
    }
    Xv = variants[layout]
    if layout == "read-only":
        Xv.flags.writeable = False
    assert not (isinstance(Xv, np.ndarray) and layout in ("fortran", "strided") and Xv.flags.c_contiguous)
    expected_X = np.ascontiguousarray(np.asarray(Xv), dtype=np.float32)
    results = []
    for inputs in (Xv, expected_X):
        trainer = fastbp.Trainer(fastbp.MLP([4, 5, K], "tanh", seed=0), loss="softmax_cross_entropy",
                                 optimizer="adam", lr=0.01, batch_size=4, seed=0)
        history = trainer.fit(inputs, Y0, epochs=2)
        results.append((trainer.model.weights[0].copy(), history.loss, trainer.predict(inputs)))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]
    np.testing.assert_array_equal(results[0][2], results[1][2])


@pytest.mark.parametrize("hidden", [5, 80], ids=["narrow", "wide"])
def test_the_training_code_sees_the_data_read_only(hidden, monkeypatch):
    """Whether an array is writable is part of its numba type: read-only data (a memory map, a pandas frame's
    values under copy-on-write) compiled the fused kernel or the general path's drivers again, once more for a
    read-only Y (3-5 s each, cold). They are given every data array read-only now, whatever the caller's."""
    from fastbp.backends import cpu as backend_module

    rng = np.random.default_rng(4)
    X = rng.normal(size=(N, 4)).astype(np.float32)
    Y = rng.normal(size=(N, 2)).astype(np.float32)
    w = rng.random(N).astype(np.float32)
    trainer = fastbp.Trainer(fastbp.MLP([4, hidden, 2], "tanh", seed=0), loss="mse", batch_size=4, seed=0)
    writable = []  # per driver call: whether any data array it got (X, Y, weights: N rows) was writable

    def recording(driver, skip=None):
        def call(*args):
            writable.append(any(a.flags.writeable for i, a in enumerate(args) if i != skip and isinstance(
                a, np.ndarray) and a.dtype == np.float32 and a.shape[:1] == (N,)))
            return driver(*args)
        return call

    monkeypatch.setattr(backend_module, "_train_epochs", recording(backend_module._train_epochs))
    # evaluate's forward pass takes X as the caller holds it (as predict does), Y and the weights read-only
    monkeypatch.setattr(backend_module, "_loss", recording(backend_module._loss, skip=1))
    if trainer._backend._narrow_kernel is not None:
        trainer._backend._narrow_kernel = recording(trainer._backend._narrow_kernel)
    frozen = [a.copy() for a in (X, Y, w)]
    for a in frozen:
        a.flags.writeable = False
    for X_fit, Y_fit, w_fit in ((X, Y, w), frozen, (frozen[0], Y, w), (X, frozen[1], frozen[2])):
        trainer.fit(X_fit, Y_fit, epochs=1)
        trainer.fit(X_fit, Y_fit, epochs=1, sample_weight=w_fit)
        trainer.evaluate(X_fit, Y_fit)
    assert len(writable) == 12 and not any(writable), writable


def test_ints_as_float_labels_and_probability_rows_are_accepted():
    trainer = trained_trainer()
    scores_int = trainer.evaluate(X0, Y0)
    assert trainer.evaluate(X0, Y0.astype(np.float64)) == scores_int
    assert trainer.evaluate(X0, np.eye(K)[Y0]) == scores_int
    assert trainer.evaluate(X0, Y0.astype(np.uint8)) == scores_int


def test_epochs_zero_is_a_no_op():
    trainer = trained_trainer()
    before = snapshot(trainer)
    history = trainer.fit(X0, Y0, epochs=0)
    assert history.loss == []
    assert_unchanged(before, snapshot(trainer))


def test_loss_is_required():
    """No default loss: Trainer(model) used to train with MSE whatever the targets were."""
    with pytest.raises(TypeError, match=r"missing 1 required positional argument: 'loss'"):
        fastbp.Trainer(fastbp.MLP([4, 5, K], seed=0))


def test_sample_weight_message_shows_plain_numbers():
    """numpy 2 reprs scalars as np.float64(-1.0); messages show the number as the user wrote it."""
    trainer = fastbp.Trainer(fastbp.MLP([4, 5, K], seed=0), loss="softmax_cross_entropy")
    with pytest.raises(ValueError, match=r"sample_weight must be >= 0; got a minimum of -1.0$"):
        trainer.fit(X0, Y0, sample_weight=np.r_[-1.0, np.ones(N - 1)])
    with pytest.raises(TypeError, match=r"seed must be an integer; got float64 1.5$"):
        fastbp.MLP([4, K], seed=np.float64(1.5))


def test_settings_an_optimizer_does_not_read_are_accepted_at_their_defaults():
    """Leaving an unused setting at its default (or passing the default explicitly) is not an error, and an old
    checkpoint that stored momentum with adam (which it ignored) still loads, without it."""
    model = fastbp.MLP([4, 5, K], seed=0)
    fastbp.Trainer(model, loss="mse", optimizer="adam", momentum=0.0, dampening=0.0, nesterov=False)
    fastbp.Trainer(model, loss="mse", optimizer="sgd", betas=(0.9, 0.999), eps=1e-8)
    state = fastbp.Trainer(model, loss="mse", optimizer="adam").state_dict()
    state["trainer"] |= {"momentum": 0.9, "dampening": 0.5}
    restored = fastbp.Trainer.from_state_dict(state)
    assert (restored.optimizer, restored.momentum, restored.dampening) == ("adam", 0.0, 0.0)
