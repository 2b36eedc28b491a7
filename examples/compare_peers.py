"""fastbp against PyTorch (eager) and JAX (whole epoch / whole training in one jitted loop) on W1-W4; on a
machine with an NVIDIA GPU also fastbp CUDA and PyTorch CUDA (eager).

Every implementation starts from the same initial weights (PyTorch's nn.Linear initialisation, drawn once
and copied into each), uses the same hyper-parameters and float32, and runs in this one process; the
implementations are timed alternately, round after round, and the table reports medians and the ratio of
each peer's time to fastbp's (a ratio > 1 means fastbp is faster). A peer that is not installed is skipped.
See fastbp/bench.py (or python -m fastbp bench --help) for the workload definitions. W1's unit is the whole
1000-epoch training, the others' one epoch. With the full sizes this takes a few minutes (W3, W4 dominate);
--samples shrinks W2-W4. Compilation is done before any timing. On a machine running other work, set
OMP_WAIT_POLICY=PASSIVE and --threads (see docs/performance.md): spinning threads distort every ratio.
The GPU peers (``fastbp-cuda``: fastbp.Trainer(device="cuda") with the data uploaded once; ``pytorch-cuda``:
the PyTorch loop with the model and data on the GPU) end each timed unit with a synchronisation and are
skipped, with the reason, where no GPU is usable.

    python examples/compare_peers.py [--workloads W1,W2,W3,W4] [--rounds 3] [--samples N] [--threads 2]
                                     [--peers pytorch,jax,numpy,fastbp-cuda,pytorch-cuda]
"""
import argparse
import os
import time

import numpy as np

import fastbp
from fastbp.bench import WORKLOADS, NumpyMLP, linear_init, make_data, one_hot


# Each round runs an implementation's unit back to back for at least this long and records the mean time per
# unit. A single short unit (a W2 epoch is 2-5 ms) measured right after another library's run is dominated by
# transients: that library's worker threads still spinning on the 2 cores, cores waking from idle (measured
# here: fastbp's W2 epoch 2.5 ms back to back, 3.9 ms as one unit right after numpy's; sleeping 0.3 s before
# each unit made every implementation slower still). The same rule applies to every implementation.
MIN_ROUND_SECONDS = 0.5


def time_unit(run):
    """Mean seconds per call of run(), calling it back to back for at least MIN_ROUND_SECONDS."""
    calls = 0
    started = time.perf_counter()
    while True:
        run()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= MIN_ROUND_SECONDS:
            return elapsed / calls


# --- implementations: each returns a callable that runs one timed unit ---------------------------------------
def fastbp_runner(name, X, y, weights, biases, device="cpu"):
    spec = WORKLOADS[name]
    model = fastbp.MLP(spec["sizes"], spec["activation"], seed=0)
    for layer in range(len(weights)):
        model.weights[layer][...] = weights[layer]
        model.biases[layer][...] = biases[layer]
    trainer = fastbp.Trainer(model, loss=spec["loss"], lr=spec["lr"], batch_size=spec["batch_size"], device=device,
                             seed=0)
    if device == "cuda":  # resident data, as a GPU user keeps it: uploaded once, used in place by every fit
        from fastbp.kernels import cuda as kernels

        X = kernels.to_device(X)
    # fit returns with the parameters copied back to the model: a CUDA unit includes all its device work.
    return lambda: trainer.fit(X, y, epochs=spec["epochs"])


def fastbp_cuda_runner(name, X, y, weights, biases):
    return fastbp_runner(name, X, y, weights, biases, device="cuda")


def numpy_runner(name, X, y, weights, biases):
    spec = WORKLOADS[name]
    net = NumpyMLP(spec["sizes"], spec["activation"], spec["loss"], weights, biases)
    Y = y if spec["loss"] == "mse" else one_hot(y, spec["sizes"][-1])
    rng = np.random.default_rng(0)
    return lambda: net.train(X, Y, spec["batch_size"], spec["lr"], spec["epochs"], rng)


def torch_runner(name, X, y, weights, biases, device="cpu"):
    import torch

    spec = WORKLOADS[name]
    layers = []
    for layer, (w, b) in enumerate(zip(weights, biases)):
        lin = torch.nn.Linear(*w.shape)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w.T.copy()))
            lin.bias.copy_(torch.from_numpy(b))
        layers.append(lin)
        if layer < len(weights) - 1:
            layers.append(torch.nn.ReLU() if spec["activation"] == "relu" else torch.nn.Sigmoid())
    net = torch.nn.Sequential(*layers).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=spec["lr"])
    loss_fn = torch.nn.MSELoss() if spec["loss"] == "mse" else torch.nn.CrossEntropyLoss()
    Xt = torch.from_numpy(X).to(device)
    yt = torch.from_numpy(y).to(device)
    n, batch = X.shape[0], spec["batch_size"] or X.shape[0]
    gen = torch.Generator(device=device).manual_seed(0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)  # a unit ends when the GPU is done

    def run():
        for _ in range(spec["epochs"]):
            order = torch.randperm(n, generator=gen, device=device) if batch < n else None
            for start in range(0, n, batch):
                if order is None:
                    xb, yb = Xt, yt
                else:
                    idx = order[start:start + batch]
                    xb, yb = Xt[idx], yt[idx]
                opt.zero_grad()
                loss_fn(net(xb), yb).backward()
                opt.step()
        sync()
    run.net = net  # for tests
    return run


def torch_cuda_runner(name, X, y, weights, biases):
    return torch_runner(name, X, y, weights, biases, device="cuda")


def jax_runner(name, X, y, weights, biases):
    import jax
    import jax.numpy as jnp

    spec = WORKLOADS[name]
    relu = spec["activation"] == "relu"
    params = [(jnp.asarray(w), jnp.asarray(b)) for w, b in zip(weights, biases)]
    lr = spec["lr"]
    k = spec["sizes"][-1]

    def forward(params, xb):
        h = xb
        for layer, (w, b) in enumerate(params):
            h = h @ w + b
            if layer < len(params) - 1:
                h = jax.nn.relu(h) if relu else jax.nn.sigmoid(h)
        return h

    def loss(params, xb, yb):
        out = forward(params, xb)
        if spec["loss"] == "mse":
            return jnp.mean((out - yb) ** 2)
        return -jnp.mean(jnp.sum(jax.nn.log_softmax(out) * jax.nn.one_hot(yb, k), axis=1))

    def step(params, xb, yb):
        grads = jax.grad(loss)(params, xb, yb)
        return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)

    Xj, yj = jnp.asarray(X), jnp.asarray(y)
    state = {"params": params, "key": jax.random.PRNGKey(0)}
    if name == "W1":  # all 1000 epochs in one jitted lax.fori_loop
        train = jax.jit(lambda p: jax.lax.fori_loop(0, spec["epochs"], lambda i, q: step(q, Xj, yj), p))

        def run():
            state["params"] = jax.block_until_ready(train(state["params"]))
        return run

    n, batch = X.shape[0], spec["batch_size"]
    n_full = n // batch

    @jax.jit
    def epoch(params, key):  # the whole epoch in one jitted lax.scan (plus the last partial batch)
        order = jax.random.permutation(key, n)
        full = order[:n_full * batch].reshape(n_full, batch)
        params, _ = jax.lax.scan(lambda p, idx: (step(p, Xj[idx], yj[idx]), None), params, full)
        if n % batch:
            rest = order[n_full * batch:]
            params = step(params, Xj[rest], yj[rest])
        return params

    def run():
        state["key"], sub = jax.random.split(state["key"])
        state["params"] = jax.block_until_ready(epoch(state["params"], sub))
    return run


RUNNERS = {"fastbp": fastbp_runner, "pytorch": torch_runner, "jax": jax_runner, "numpy": numpy_runner,
           "fastbp-cuda": fastbp_cuda_runner, "pytorch-cuda": torch_cuda_runner}


def gpu_unavailable(peer):
    """None when GPU peer ``peer`` can run here, else why not."""
    if peer == "fastbp-cuda":
        from fastbp.backends import cuda_unavailable_reason

        reason = cuda_unavailable_reason()
        if reason is None:
            from fastbp.kernels import cuda as kernels

            reason = "numba's CUDA simulator is active (no timings)" if kernels.SIMULATOR else None
        return reason
    import torch

    return None if torch.cuda.is_available() else f"torch {torch.__version__} sees no CUDA device"


def available(peers):
    out = ["fastbp"]
    for peer in peers:
        module = {"pytorch": "torch", "jax": "jax", "numpy": "numpy", "fastbp-cuda": "fastbp",
                  "pytorch-cuda": "torch"}[peer]
        try:
            __import__(module)
        except ImportError:
            print(f"{peer}: not installed, skipped")
            continue
        reason = gpu_unavailable(peer) if peer.endswith("-cuda") else None
        if reason is None:
            out.append(peer)
        else:
            print(f"{peer}: skipped ({reason})")
    return out


def compare(workloads, rounds, samples, peers):
    """{workload: {implementation: [seconds per round]}} measured alternately in this process."""
    impls = available(peers)
    results = {}
    for name in workloads:
        X, y = make_data(name, None if name == "W1" else samples)
        weights, biases = linear_init(WORKLOADS[name]["sizes"])
        runners = {impl: RUNNERS[impl](name, X, y, weights, biases) for impl in impls}
        for run in runners.values():
            run()  # warm-up: compilation (numba, XLA, torch's first-call setup)
        times = {impl: [] for impl in impls}
        for r in range(rounds):
            order = impls if r % 2 == 0 else impls[::-1]  # alternate: slow drifts of a shared machine cancel
            for impl in order:
                times[impl].append(time_unit(runners[impl]))
        results[name] = times
        print_workload(name, times, X.shape[0])
    return results


def print_workload(name, times, n):
    unit = WORKLOADS[name]["unit"]
    med = {impl: float(np.median(t)) for impl, t in times.items()}
    # per-round ratios (peer / fastbp in the same round), then their median
    ratios = {impl: float(np.median(np.array(t) / np.array(times["fastbp"]))) for impl, t in times.items()}
    print(f"\n{name} ({n} samples, time per {unit}, median of {len(times['fastbp'])} rounds)")
    for impl in times:
        print(f"  {impl:<12} {med[impl] * 1e3:10.3f} ms   peer/fastbp {ratios[impl]:7.2f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="W1,W2,W3,W4", help="comma-separated subset (default: all four)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported (default 3)")
    parser.add_argument("--samples", type=int, default=None, help="shrink W2-W4 to this many samples")
    parser.add_argument("--peers", default="pytorch,jax,numpy,fastbp-cuda,pytorch-cuda",
                        help="comma-separated; the -cuda peers are skipped where no GPU is usable")
    parser.add_argument("--threads", type=int, default=None, help="threads for every implementation")
    args = parser.parse_args(argv)
    if args.threads:
        import numba

        numba.set_num_threads(args.threads)
        try:
            import torch

            torch.set_num_threads(args.threads)
        except ImportError:
            pass
    print(f"machine: {os.cpu_count()} logical CPUs; fastbp {fastbp.__version__}")
    return compare([w.strip().upper() for w in args.workloads.split(",")], args.rounds, args.samples,
                   [p.strip() for p in args.peers.split(",") if p.strip()])


if __name__ == "__main__":
    main()
