"""Online learning inside your own numba code: fastbp's kernels called from a user's @njit simulation loop.

A damped pendulum (theta'' = -(g/L) sin(theta) - c theta') is simulated step by step, with semi-implicit
Euler steps of 10 ms, and struck to a new random state every half second. Along the way a 2-32-1 tanh
network learns, online, to predict the angular acceleration from the angle and the angular velocity: every
simulation step is one training step on that one sample (forward, the fused loss-gradient, backward and an
SGD update), done with fastbp's public kernels (fastbp/kernels/API.md) from this file's own @njit function.
No Python runs inside the loop.

Prints the error on held-out states of another trajectory before and after training (the program fails if it
did not fall below 0.8 of its start), the training loss along the way, and the time per step against two other ways
of running the same loop: (a) driven from Python, calling the same kernels once per step, and (b) calling
fastbp.Trainer.fit on one row per step. All three compute the same numbers, and the program checks that
they end with the same parameters. CPU only: these are the CPU kernels. Takes a few seconds once the kernels
are compiled; the first run on a machine also compiles them (once; numba caches them on disk), and the
timings exclude that. --steps must be at least 2000: online learning from one trajectory needs a few
thousand steps before the held-out error falls reliably.

    python examples/online_learning_njit.py [--steps 200000] [--trainer-steps 2000] [--lr 0.02] [--seed 0]
"""
import argparse
import math
import platform
import time

import numba
import numpy as np
from numba import njit

import fastbp
from fastbp.kernels import (IDENTITY, MSE, TANH, bias_view, dense_backward_input, dense_backward_params,
                            dense_forward, loss_grad, sgd_update, weight_view)

SIZES = [2, 32, 1]
DT = 0.01  # seconds per simulation step
G_OVER_L = 9.81  # g / L, 1 / s^2
DAMPING = 0.5  # c, 1 / s
KICK_EVERY = 50  # steps between kicks (0.5 s): consecutive samples are alike, so the states must vary
THETA_SCALE = math.pi  # the network sees theta / pi, omega / 8 and predicts acceleration / 10: all about [-1, 1]
OMEGA_SCALE = 8.0
ACC_SCALE = 10.0
# Online learning from one trajectory is noisy: the held-out error falls reliably only after a few thousand
# steps (to 0.6-0.9 of its start after 1000-3000 steps over five seeds, to 0.015 after 200000).
MIN_STEPS = 2000
MAX_ERROR_RATIO = 0.8

# Cached like fastbp's own kernels (numba >= 0.63, which fastbp requires, caches a serial caller of parallel
# kernels safely: numba #8578; see fastbp/kernels/API.md).
JIT = dict(cache=True)


def acceleration(theta, omega):
    return -G_OVER_L * math.sin(theta) - DAMPING * omega


def advance(theta, omega, acc):
    """One semi-implicit Euler step; theta wrapped into [-pi, pi)."""
    omega = omega + DT * acc
    theta = (theta + DT * omega + math.pi) % (2.0 * math.pi) - math.pi
    return theta, omega


# The same two functions compiled, for the @njit loop (the Python loop below calls the plain ones).
acceleration_jit = njit(acceleration)
advance_jit = njit(advance)


@njit(**JIT)
def learn_online(errors, params, grads, velocity, kicks, kick_every, sizes, param_offsets, lr):
    """Simulate errors.shape[0] steps, training the network on each one; returns nothing.

    errors (n_steps,) float64: each step's squared error (before its update), overwritten. params (P,): the
    flat parameter vector (fastbp.layout.Layout), trained in place; grads, velocity (P,): work vectors.
    kicks (n_kicks, 2) float64: the (theta, omega) the pendulum is set to every kick_every steps, in turn.
    sizes, param_offsets: the model's Layout. lr: the learning rate, in params' dtype.
    """
    dtype = params.dtype.type
    zero = dtype(0.0)
    # The step's buffers, allocated once per call (the kernels themselves never allocate).
    inp = np.empty((1, sizes[0]), params.dtype)
    hidden = np.empty((1, sizes[1]), params.dtype)
    out = np.empty((1, sizes[2]), params.dtype)
    target = np.empty((1, sizes[2]), params.dtype)
    dout = np.empty((1, sizes[2]), params.dtype)
    dhidden = np.empty((1, sizes[1]), params.dtype)
    row_losses = np.empty(1, params.dtype)
    # Views of each layer's weight and bias, and of their gradients, in the flat vectors.
    w0 = weight_view(params, sizes, param_offsets, 0)
    b0 = bias_view(params, sizes, param_offsets, 0)
    w1 = weight_view(params, sizes, param_offsets, 1)
    b1 = bias_view(params, sizes, param_offsets, 1)
    dw0 = weight_view(grads, sizes, param_offsets, 0)
    db0 = bias_view(grads, sizes, param_offsets, 0)
    dw1 = weight_view(grads, sizes, param_offsets, 1)
    db1 = bias_view(grads, sizes, param_offsets, 1)
    inv_divisor = dtype(1.0)  # 1 / loss_divisor(MSE, 1 row, 1 output)
    theta = 0.0
    omega = 0.0
    for step in range(errors.shape[0]):
        if step % kick_every == 0:
            kick = (step // kick_every) % kicks.shape[0]
            theta = kicks[kick, 0]
            omega = kicks[kick, 1]
        acc = acceleration_jit(theta, omega)
        inp[0, 0] = theta / THETA_SCALE
        inp[0, 1] = omega / OMEGA_SCALE
        target[0, 0] = acc / ACC_SCALE
        dense_forward(hidden, inp, w0, b0, TANH)
        dense_forward(out, hidden, w1, b1, IDENTITY)
        loss_grad(dout, row_losses, out, target, MSE, inv_divisor)
        errors[step] = row_losses[0]
        dense_backward_params(dw1, db1, dout, hidden)
        dense_backward_input(dhidden, dout, w1, hidden, TANH)
        dense_backward_params(dw0, db0, dhidden, inp)
        sgd_update(params, velocity, grads, lr, zero, zero, zero, False, step == 0)
        theta, omega = advance_jit(theta, omega, acc)


def learn_online_python(errors, params, grads, velocity, kicks, kick_every, layout, lr):
    """learn_online driven from Python: the same loop and kernel calls, one dispatch per kernel per step."""
    dtype = params.dtype.type
    zero = dtype(0.0)
    inp = np.empty((1, SIZES[0]), params.dtype)
    hidden = np.empty((1, SIZES[1]), params.dtype)
    out = np.empty((1, SIZES[2]), params.dtype)
    target = np.empty((1, SIZES[2]), params.dtype)
    dout = np.empty((1, SIZES[2]), params.dtype)
    dhidden = np.empty((1, SIZES[1]), params.dtype)
    row_losses = np.empty(1, params.dtype)
    (w0, b0), (w1, b1) = layout.views(params, 0), layout.views(params, 1)
    (dw0, db0), (dw1, db1) = layout.views(grads, 0), layout.views(grads, 1)
    inv_divisor = dtype(1.0)
    theta = omega = 0.0
    for step in range(errors.shape[0]):
        if step % kick_every == 0:
            theta, omega = kicks[(step // kick_every) % kicks.shape[0]]
        acc = acceleration(theta, omega)
        inp[0, 0] = theta / THETA_SCALE
        inp[0, 1] = omega / OMEGA_SCALE
        target[0, 0] = acc / ACC_SCALE
        dense_forward(hidden, inp, w0, b0, TANH)
        dense_forward(out, hidden, w1, b1, IDENTITY)
        loss_grad(dout, row_losses, out, target, MSE, inv_divisor)
        errors[step] = row_losses[0]
        dense_backward_params(dw1, db1, dout, hidden)
        dense_backward_input(dhidden, dout, w1, hidden, TANH)
        dense_backward_params(dw0, db0, dhidden, inp)
        sgd_update(params, velocity, grads, lr, zero, zero, zero, False, step == 0)
        theta, omega = advance(theta, omega, acc)


def learn_online_trainer(trainer, n_steps, kicks, kick_every):
    """The same loop with fastbp.Trainer.fit on one row per step (one epoch of one full batch of one row)."""
    x = np.empty((1, SIZES[0]), trainer.model.dtype)
    y = np.empty((1, SIZES[2]), trainer.model.dtype)
    theta = omega = 0.0
    for step in range(n_steps):
        if step % kick_every == 0:
            theta, omega = kicks[(step // kick_every) % kicks.shape[0]]
        acc = acceleration(theta, omega)
        x[0, 0] = theta / THETA_SCALE
        x[0, 1] = omega / OMEGA_SCALE
        y[0, 0] = acc / ACC_SCALE
        trainer.fit(x, y, epochs=1)
        theta, omega = advance(theta, omega, acc)


def random_kicks(rng, n):
    return np.column_stack([rng.uniform(-2.5, 2.5, n), rng.uniform(-4.0, 4.0, n)])


def held_out_states(kicks, kick_every, n_steps, every=7):
    """(X, Y) network inputs and targets along another trajectory, every ``every``-th step."""
    rows = []
    theta = omega = 0.0
    for step in range(n_steps):
        if step % kick_every == 0:
            theta, omega = kicks[(step // kick_every) % len(kicks)]
        acc = acceleration(theta, omega)
        if step % every == 0:
            rows.append((theta / THETA_SCALE, omega / OMEGA_SCALE, acc / ACC_SCALE))
        theta, omega = advance(theta, omega, acc)
    data = np.array(rows, dtype=np.float32)
    return data[:, :2], data[:, 2:]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200_000,
                        help=f"simulation (and training) steps, at least {MIN_STEPS} (default: 200000)")
    parser.add_argument("--trainer-steps", type=int, default=2000,
                        help="steps timed with Trainer.fit per row, at least 1 (default: 2000)")
    parser.add_argument("--lr", type=float, default=0.02, help="SGD learning rate (default: 0.02)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the kicks (default: 0)")
    args = parser.parse_args(argv)
    if args.steps < MIN_STEPS or args.trainer_steps < 1:
        parser.error(f"--steps must be at least {MIN_STEPS} (the held-out error needs a few thousand steps to "
                     f"fall reliably) and --trainer-steps at least 1; got --steps {args.steps} and --trainer-steps "
                     f"{args.trainer_steps}")

    rng = np.random.default_rng(args.seed)
    kicks = random_kicks(rng, 64)
    X_test, Y_test = held_out_states(random_kicks(rng, 16), KICK_EVERY, 16 * KICK_EVERY)
    model = fastbp.MLP(SIZES, "tanh", dtype=np.float32, seed=args.seed)
    layout = model.layout
    lr = model.dtype.type(args.lr)
    start = model.flat_parameters()  # a copy of the flat vector (W0, b0, W1, b1)
    scorer = fastbp.Trainer(model, loss="mse")
    error_before = scorer.evaluate(X_test, Y_test)["loss"]

    def fresh():
        params = start.copy()
        return params, np.zeros_like(params), np.zeros_like(params)

    # Compile (or load from numba's cache) everything once, outside the timings.
    started = time.perf_counter()
    params, grads, velocity = fresh()
    learn_online(np.empty(10), params, grads, velocity, kicks, KICK_EVERY, layout.sizes, layout.param_offsets, lr)
    learn_online_python(np.empty(10), params, grads, velocity, kicks, KICK_EVERY, layout, lr)
    warm_up = time.perf_counter() - started

    # 1. The whole loop inside one @njit call.
    errors = np.empty(args.steps)
    params, grads, velocity = fresh()
    started = time.perf_counter()
    learn_online(errors, params, grads, velocity, kicks, KICK_EVERY, layout.sizes, layout.param_offsets, lr)
    njit_us = (time.perf_counter() - started) / args.steps * 1e6
    model.set_flat_parameters(params)  # the trained vector back into model.weights / model.biases
    error_after = scorer.evaluate(X_test, Y_test)["loss"]

    # 2. (a) The same loop from Python, same kernels: must end with the same parameters.
    errors_py = np.empty(args.steps)
    params_py, grads, velocity = fresh()
    started = time.perf_counter()
    learn_online_python(errors_py, params_py, grads, velocity, kicks, KICK_EVERY, layout, lr)
    python_us = (time.perf_counter() - started) / args.steps * 1e6

    # 3. (b) Trainer.fit on one row per step, for --trainer-steps steps, against the @njit loop's as many.
    trainer_model = fastbp.MLP(SIZES, "tanh", dtype=np.float32, seed=args.seed)
    trainer = fastbp.Trainer(trainer_model, loss="mse", optimizer="sgd", lr=args.lr, batch_size=None)
    learn_online_trainer(trainer, 1, kicks, KICK_EVERY)  # compile / load the Trainer's kernels
    trainer_model.set_flat_parameters(start)
    trainer = fastbp.Trainer(trainer_model, loss="mse", optimizer="sgd", lr=args.lr, batch_size=None)
    started = time.perf_counter()
    learn_online_trainer(trainer, args.trainer_steps, kicks, KICK_EVERY)
    trainer_us = (time.perf_counter() - started) / args.trainer_steps * 1e6
    params_short, grads, velocity = fresh()
    learn_online(np.empty(args.trainer_steps), params_short, grads, velocity, kicks, KICK_EVERY, layout.sizes,
                 layout.param_offsets, lr)

    window = max(args.steps // 10, 1)
    print(f"online training of a {'-'.join(map(str, SIZES))} tanh network on a damped pendulum, {args.steps} "
          f"steps of {DT * 1e3:.0f} ms, lr {args.lr}")
    for first in range(0, args.steps - window + 1, window):
        mean = errors[first:first + window].mean()
        print(f"  steps {first:7d}-{first + window - 1:7d}: mean training loss {mean:.5f}")
    print(f"held-out mse (acceleration / {ACC_SCALE:.0f}): {error_before:.5f} before, {error_after:.5f} after; "
          f"rms error {math.sqrt(error_after) * ACC_SCALE:.3f} rad/s^2")
    print(f"\nCPU: {cpu_name()}, numba {numba.__version__}, first compile or cache load {warm_up:.1f} s "
          "(not in the timings below)")
    print(f"  @njit loop calling fastbp kernels    {njit_us:8.2f} us/step")
    others = (("(a) Python loop, same kernels", python_us), ("(b) Trainer.fit on one row per step", trainer_us))
    for label, us in others:
        print(f"  {label:<36} {us:8.2f} us/step  {us / njit_us:6.1f}x the @njit loop")
    print(f"  ((b) over {args.trainer_steps} steps)")

    failures = []
    if not np.allclose(params_py, params, rtol=1e-5, atol=1e-6):
        failures.append(f"the Python loop ended with other parameters (max difference "
                        f"{np.abs(params_py - params).max():.2e})")
    trained = trainer_model.flat_parameters()
    if not np.allclose(trained, params_short, rtol=1e-4, atol=1e-5):
        failures.append(f"Trainer.fit per row ended with other parameters (max difference "
                        f"{np.abs(trained - params_short).max():.2e})")
    if not error_after < MAX_ERROR_RATIO * error_before:
        failures.append(f"the held-out error did not fall below {MAX_ERROR_RATIO} of its start "
                        f"({error_before:.5f} -> {error_after:.5f})")
    for failure in failures:
        print("FAILED:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
