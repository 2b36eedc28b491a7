"""Everything a GPU session measures, in one call: JSON and a markdown table under one folder.

    python -m dev.gpu_session [--out DIR] [--budget SECONDS] [--parts versions,launch,...] [--quick]

Parts, in this order (each in its own process, killed at its timeout or when the budget runs out, so one
hung part cannot stop the others; a part that cannot run here says why and is skipped):
    versions   Python, numpy, numba, numba-cuda, cuda-core, torch, the GPU and driver (nvidia-smi)
    launch     host microseconds per launch of an empty kernel with 0/1/4/8 array arguments, through
               kernel[grid, block] and through kernel.overloads[sig].launch; per replay of a 12-launch CUDA
               graph; a 4-byte copy to the host; one launch of fastbp's step product kernel
    workloads  W1-W4 (fastbp.bench): time per unit (W1: the 1000-epoch fit; W2-W4: one epoch) for fastbp
               CUDA through the backend interface (graphs on and off; fused and step paths for W1/W2), fastbp
               CUDA through fastbp.Trainer(device="cuda") (after the Trainer's rewrite), PyTorch CUDA eager
               from the same initial weights, and fastbp CPU; launches per step counted on the host; CUDA
               kernels per step and device-busy time from torch.profiler
    products   every product kernel (3 tile configurations x 3 forms) at the W3 and W4 shapes, CUDA-event
               timed, against torch.mm / torch.addmm on the same shapes; each launch of one W3 and W4 step
    tests      tests/cuda on the GPU (FASTBP_REQUIRE_CUDA=1, no simulator)
Writes DIR/session.json (everything), DIR/session.md (the tables) and DIR/part-NAME.json per part.
``.ci/gpu.sh`` installs what it needs and calls this with the time left of its 8 minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

PARTS = ("versions", "launch", "workloads", "products", "tests")
# Seconds each part may take at most (the budget may cut them shorter).
TIMEOUTS = {"versions": 60, "launch": 90, "workloads": 240, "products": 120, "tests": 300}
MIN_PART_SECONDS = 10  # a part with less time than this left in the budget is skipped, not started

# The repository's root: the tools in dev/ run from a clone (python -m dev.gpu_session), never installed.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- helpers ------------------------------------------------------------------------------------------------------
class Skip(Exception):
    """A part that cannot run here (no GPU, no torch...): the message says why."""


def _gpu():
    from fastbp.kernels import cuda as kernels

    reason = kernels.unavailable_reason()
    if reason is not None or kernels.SIMULATOR:
        raise Skip(reason or "numba's simulator is active: no timings")
    return kernels


def _torch_cuda():
    try:
        import torch
    except ImportError as error:
        raise Skip(f"torch is not installed ({error})") from error
    if not torch.cuda.is_available():
        raise Skip(f"torch {torch.__version__} has no usable CUDA device (a CPU build?)")
    return torch


def _median(run, repeats: int) -> float:
    run()  # warm-up: compilation, workspaces
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return float(statistics.median(times))


def _version(module: str):
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed, or no metadata
        return None


# --- parts ----------------------------------------------------------------------------------------------------
def part_versions(quick: bool) -> dict:
    info = {name: _version(name) for name in ("numpy", "numba", "numba-cuda", "cuda-core", "cuda-bindings", "torch",
                                             "llvmlite")}
    info.update(python=sys.version.split()[0], platform=platform.platform(), cpus=os.cpu_count())
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        info["gpu"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        info["gpu"] = f"nvidia-smi: {error}"
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     timeout=10, cwd=os.path.dirname(__file__)).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["git"] = None
    try:
        from fastbp.kernels import cuda as kernels

        info["cuda_usable"] = kernels.unavailable_reason() or "yes"
        info["graphs"] = kernels.graphs_unavailable_reason() or "yes"
        info["numpy_problem"] = kernels.numpy_problem()
    except Exception as error:  # numba-cuda missing or broken: say so, the other parts will skip
        info["cuda_usable"] = f"{type(error).__name__}: {error}"
    return dict(rows=[dict(item=key, value=str(value)) for key, value in info.items()])


def part_launch(quick: bool) -> dict:
    kernels = _gpu()
    import numpy as np

    cuda = kernels.cuda

    @cuda.jit
    def k0():
        pass

    @cuda.jit
    def k1(a):
        pass

    @cuda.jit
    def k4(a, b, c, d):
        pass

    @cuda.jit
    def k8(a, b, c, d, e, f, g, h):
        pass

    arrays = [kernels.device_zeros(4, np.float32) for _ in range(8)]
    n = 300 if quick else 2000
    rows = []

    def host_us(call):
        call()
        kernels.synchronize()
        started = time.perf_counter()
        for _ in range(n):
            call()
        elapsed = time.perf_counter() - started
        kernels.synchronize()
        return elapsed / n * 1e6

    for kern, args in ((k0, ()), (k1, arrays[:1]), (k4, arrays[:4]), (k8, arrays[:8])):
        rows.append(dict(what=f"kernel[1, 1](...), {len(args)} arrays",
                         us=host_us(lambda kern=kern, args=args: kern[1, 1](*args))))
        overload = next(iter(kern.overloads.values()))
        rows.append(dict(what=f"overloads[sig].launch, {len(args)} arrays",
                         us=host_us(lambda o=overload, args=args: o.launch(list(args), (1, 1, 1), (1, 1, 1), 0, 0))))
    try:
        graph = kernels.Graph([(k4, 1, 1, tuple(arrays[:4]), 0)] * 12)
        per_replay = host_us(graph.replay)
        rows.append(dict(what="graph replay (12 launches of 4 arrays)", us=per_replay))
        rows.append(dict(what="  per launch in the graph", us=per_replay / 12))
        graph.close()
    except Exception as error:  # report, keep measuring
        rows.append(dict(what=f"graph replay failed: {type(error).__name__}: {error}", us=None))
    small = kernels.device_zeros(1, np.float32)
    rows.append(dict(what="4-byte copy to the host", us=host_us(lambda: small.copy_to_host())))
    # fastbp's own launch: one product of a W3 step (6 arguments: 3 flat arrays, 3 integers).
    from fastbp.kernels import cuda_step

    backend, X, Y, _ = _fastbp_backend("W3", samples=1024)
    plan, table = backend._plan(128, rows_from_step=True)
    backend._upload(backend._I, backend._arena.i_jobs, table)
    record = cuda_step.step_launch_records(plan, backend._F, backend._I, X.reshape(X.size), Y.reshape(Y.size))[0]
    backend._upload(backend._I, 0, backend._ctrl(X.shape[0]))
    rows.append(dict(what="fastbp step product launch (F, I, X + 3 ints)", us=host_us(lambda: kernels.launch(*record))))
    return dict(rows=rows)


def _fastbp_backend(name: str, samples=None, fused=True, graphs=True):
    """(CUDABackend with bench's initial weights, X and Y on the device, spec) for workload ``name``."""
    import numpy as np

    from fastbp.backends.cuda import CUDABackend
    from fastbp.bench import WORKLOADS, linear_init, make_data, one_hot
    from fastbp.kernels.pointwise import ACTIVATIONS, IDENTITY, LOSSES, N_HYPER, SGD
    from fastbp.layout import Layout

    spec = WORKLOADS[name]
    sizes = spec["sizes"]
    layout = Layout.from_sizes(sizes)
    acts = [ACTIVATIONS[spec["activation"]]] * (len(sizes) - 2) + [IDENTITY]
    backend = CUDABackend(layout, acts, LOSSES[spec["loss"]], SGD, np.zeros(N_HYPER), np.float32)
    backend.use_fused = fused
    backend.use_graphs = graphs and backend.use_graphs
    weights, biases = linear_init(sizes)
    backend.use_parameters(layout.pack(weights, biases, np.empty(layout.n_params, np.float32)))
    X, y = make_data(name, None if name == "W1" else samples)
    Y = y if spec["loss"] == "mse" else one_hot(y, sizes[-1])
    return backend, backend.as_input(X), backend.as_input(Y), spec


def _fastbp_unit(backend, X, Y, spec, seed=0):
    """A callable that runs one timed unit through the backend interface, as the Trainer would, ending with the
    parameters on the host."""
    import numpy as np

    n = X.shape[0]
    batch = spec["batch_size"] or n
    rng = np.random.default_rng(seed)
    params = np.empty(backend.layout.n_params, np.float32)
    state = {"steps": 0}

    def run():
        E = spec["epochs"]
        orders = (np.stack([rng.permutation(n) for _ in range(E)]) if batch < n else np.empty((E, 0), np.int64))
        _, _, state["steps"] = backend.train_epochs(X, Y, batch, orders, np.full(E, spec["lr"]), -np.inf,
                                                    state["steps"])
        backend.publish_parameters(params)
    return run


def _torch_unit(torch, name, X, y, seed=0, device="cuda"):
    """PyTorch eager from bench's initial weights (nn.Sequential + optim.SGD), data resident on ``device``; a
    unit ends when the GPU is done."""
    from fastbp.bench import WORKLOADS, linear_init

    spec = WORKLOADS[name]
    weights, biases = linear_init(spec["sizes"])
    layers = []
    for layer, (w, b) in enumerate(zip(weights, biases)):
        lin = torch.nn.Linear(*w.shape)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w.T.copy()))
            lin.bias.copy_(torch.from_numpy(b))
        layers.append(lin)
        if layer < len(weights) - 1:
            layers.append(torch.nn.ReLU() if spec["activation"] == "relu" else torch.nn.Sigmoid())
    device = torch.device(device)
    net = torch.nn.Sequential(*layers).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=spec["lr"])
    loss_fn = torch.nn.MSELoss() if spec["loss"] == "mse" else torch.nn.CrossEntropyLoss()
    Xt, yt = torch.from_numpy(X).to(device), torch.from_numpy(y).to(device)
    n, batch = X.shape[0], spec["batch_size"] or X.shape[0]
    gen = torch.Generator(device=device).manual_seed(seed)

    def run():
        for _ in range(spec["epochs"]):
            order = torch.randperm(n, generator=gen, device=device) if batch < n else None
            for start in range(0, n, batch):
                xb, yb = (Xt, yt) if order is None else (Xt[order[start:start + batch]], yt[order[start:start + batch]])
                opt.zero_grad()
                loss_fn(net(xb), yb).backward()
                opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    run.net = net  # for tests
    return run


def _profile(torch, run, steps: int):
    """(CUDA kernels per step, device-busy seconds, wall seconds) of one call of run() under torch.profiler (its
    CUPTI trace sees every kernel on the device, numba's included); copies and memsets are not counted."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
    wall = time.perf_counter() - started
    kernels, busy = 0, 0.0
    for event in prof.events():
        if event.device_type == DeviceType.CUDA and not event.name.lower().startswith(("memcpy", "memset")):
            kernels += 1
            busy += event.time_range.elapsed_us() * 1e-6
    return kernels / max(1, steps), busy, wall


def part_workloads(quick: bool) -> dict:
    kernels = _gpu()
    import numpy as np

    import fastbp
    from fastbp.bench import WORKLOADS, linear_init, make_data

    try:
        torch = _torch_cuda()
        torch_reason = None
    except Skip as error:
        torch, torch_reason = None, str(error)
    rows = []
    for name in ("W1", "W2", "W3", "W4"):
        spec = WORKLOADS[name]
        samples = (spec["samples"] // 10 if quick and name != "W1" else None)
        row = dict(workload=name, unit=spec["unit"])
        backend, X, Y, _ = _fastbp_backend(name, samples)
        n = X.shape[0]
        batch = spec["batch_size"] or n
        steps = spec["epochs"] * -(-n // batch)
        run = _fastbp_unit(backend, X, Y, spec)
        with kernels.recording() as names:
            run()
        row["fastbp_launches_per_step"] = round(len(names) / steps, 2)
        row["fastbp_path"] = "fused" if names == ["_fused_fit_kernel"] else "steps"
        row["fastbp_cuda_s"] = _median(run, 3)
        variants = [("fastbp_cuda_steps_s", dict(fused=False))] if name in ("W1", "W2") else []
        variants.append(("fastbp_cuda_no_graphs_s", dict(graphs=False, fused=name in ("W1", "W2"))))
        for key, options in variants:
            b, Xv, Yv, _ = _fastbp_backend(name, samples, **options)
            row[key] = _median(_fastbp_unit(b, Xv, Yv, spec), 2 if name == "W1" else 3)
        if torch is not None:
            row["fastbp_kernels_per_step"], busy, wall = _profile(torch, run, steps)
            row["fastbp_device_busy"] = busy / wall if wall else None
        # Through the Trainer (its one loop calls the backend interface: works once the Trainer's rewrite
        # has landed; before that it reports the error).
        Xh, yh = make_data(name, None if name == "W1" else samples)
        weights, biases = linear_init(spec["sizes"])
        for device in ("cuda", "cpu"):
            try:
                model = fastbp.MLP(spec["sizes"], spec["activation"], seed=0)
                for layer in range(len(weights)):
                    model.weights[layer][...] = weights[layer]
                    model.biases[layer][...] = biases[layer]
                trainer = fastbp.Trainer(model, loss=spec["loss"], lr=spec["lr"], batch_size=spec["batch_size"],
                                         device=device, seed=0)
                Xd = kernels.to_device(Xh) if device == "cuda" else Xh
                unit = lambda trainer=trainer, Xd=Xd, yh=yh, E=spec["epochs"]: trainer.fit(Xd, yh, epochs=E)  # noqa: E731
                row[f"fastbp_{device}_trainer_s"] = _median(unit, 3 if device == "cuda" else 1)
            except Exception as error:  # the pre-rewrite Trainer cannot drive the new backend
                row[f"fastbp_{device}_trainer_s"] = f"{type(error).__name__}: {str(error)[:120]}"
        if torch is not None:
            unit = _torch_unit(torch, name, Xh, yh if spec["loss"] == "mse" else yh.astype(np.int64))
            row["torch_cuda_s"] = _median(unit, 3)
            row["torch_kernels_per_step"], busy, wall = _profile(torch, unit, steps)
            row["torch_device_busy"] = busy / wall if wall else None
        else:
            row["torch_cuda_s"] = f"skipped: {torch_reason}"
        rows.append(row)
    return dict(rows=rows, notes=["quick: W2-W4 with a tenth of the samples" if quick else "full sizes"])


PRODUCT_SHAPES = {  # (name, B, n_in, n_out): the layers of W3 (batch 128) and W4 (batch 512)
    "W3 784x256": (128, 784, 256), "W3 256x256": (128, 256, 256), "W4 1024x1024": (512, 1024, 1024)}


def _fastbp_forms(kernels, dev):
    """The three products of a dense layer, relu, on the device arrays ``dev``."""
    return {
        "forward": lambda: kernels.dense_forward(dev["out"], dev["inp"], dev["w"], dev["b"], 3),
        "backward_params": lambda: kernels.dense_backward_params(dev["dw"], dev["db"], dev["dout"], dev["inp"]),
        "backward_input": lambda: kernels.dense_backward_input(dev["dinp"], dev["dout"], dev["w"], dev["inp"], 3),
    }


def _torch_forms(torch, dev):
    """The same three products with torch, on views of the same device memory."""
    t = {key: torch.as_tensor(value, device="cuda") for key, value in dev.items()}
    return {"forward": lambda: torch.relu(torch.addmm(t["b"], t["inp"], t["w"])),
            "backward_params": lambda: torch.mm(t["inp"].T, t["dout"]),
            "backward_input": lambda: torch.mm(t["dout"], t["w"].T)}


def part_products(quick: bool) -> dict:
    kernels = _gpu()
    import numpy as np

    try:
        torch = _torch_cuda()
    except Skip:
        torch = None
    rng = np.random.default_rng(0)
    rows = []
    start, end = kernels.cuda.event(), kernels.cuda.event()

    def event_ms(call, reps):
        call()
        start.record()
        for _ in range(reps):
            call()
        end.record()
        end.synchronize()
        return kernels.cuda.event_elapsed_time(start, end) / reps

    reps = 5 if quick else 20
    for label, (B, n_in, n_out) in PRODUCT_SHAPES.items():
        dev = {key: kernels.to_device(rng.normal(size=shape).astype(np.float32)) for key, shape in dict(
            inp=(B, n_in), w=(n_in, n_out), b=(n_out,), out=(B, n_out), dout=(B, n_out), dw=(n_in, n_out),
            db=(n_out,), dinp=(B, n_in)).items()}
        flops = 2.0 * B * n_in * n_out
        forms = _fastbp_forms(kernels, dev)
        for config in kernels.PRODUCT_CONFIGS:
            kernels.VOCABULARY_CONFIG = config
            for form, call in forms.items():
                ms = event_ms(call, reps)
                rows.append(dict(shape=label, form=form, impl=f"fastbp {config}", ms=ms, gflops=flops / ms * 1e-6))
        if torch is not None:
            for form, call in _torch_forms(torch, dev).items():
                started = torch.cuda.Event(enable_timing=True)
                ended = torch.cuda.Event(enable_timing=True)
                call()
                started.record()
                for _ in range(reps):
                    call()
                ended.record()
                ended.synchronize()
                ms = started.elapsed_time(ended) / reps
                rows.append(dict(shape=label, form=form, impl="torch", ms=ms, gflops=flops / ms * 1e-6))
    kernels.VOCABULARY_CONFIG = "r4"
    # Each launch of one training step of W3 and W4 (the plan the backend runs), event-timed.
    from fastbp.kernels import cuda_step

    for name, batch in (("W3", 128), ("W4", 512)):
        backend, X, Y, spec = _fastbp_backend(name, samples=4 * batch)
        _fastbp_unit(backend, X, Y, spec)()  # compiles, fills the arenas with a real step's tables
        plan, table = backend._plan(batch, rows_from_step=True)
        backend._upload(backend._I, backend._arena.i_jobs, table)
        records = cuda_step.step_launch_records(plan, backend._F, backend._I, X.reshape(X.size), Y.reshape(Y.size))
        backend._upload(backend._I, 0, backend._ctrl(X.shape[0]))  # C_STEP = 0: the first batch of the table
        for index, (record, launch) in enumerate(zip(records, plan.launches)):
            kern, grid, block, args, shared = record
            no_advance = args[:-1] + (0,) if launch[0] == "product" else args  # replays must not move the step
            ms = event_ms(lambda k=kern, g=grid, b=block, a=no_advance, s=shared: kernels.launch(k, g, b, a, s), reps)
            rows.append(dict(shape=f"{name} step", form=f"launch {index} ({launch[0]} {launch[1] or ''}, "
                                                         f"{grid} blocks)", impl="fastbp", ms=ms, gflops=None))
    return dict(rows=rows)


def part_tests(quick: bool, timeout: float = 280) -> dict:
    _gpu()
    root = ROOT
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"} | {"FASTBP_REQUIRE_CUDA": "1"}
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/cuda"] + (["-x"] if quick else [])
    try:
        result = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        tail = (result.stdout + result.stderr).strip().splitlines()[-25:]
        return dict(rows=[dict(result="passed" if result.returncode == 0 else f"failed (rc {result.returncode})",
                               summary=tail[-1] if tail else "")], output=tail)
    except subprocess.TimeoutExpired as error:
        out = (error.stdout or b"").decode(errors="replace").strip().splitlines()[-25:]
        return dict(rows=[dict(result=f"timed out after {timeout:.0f} s", summary=out[-1] if out else "")], output=out)


PART_FUNCTIONS = {"versions": part_versions, "launch": part_launch, "workloads": part_workloads,
                  "products": part_products, "tests": part_tests}


# --- the driver ------------------------------------------------------------------------------------------------
def run_part(name: str, out: str, quick: bool, timeout: float) -> dict:
    """Run part ``name`` in this process; write and return {"part", "status", "seconds", ...}."""
    started = time.perf_counter()
    try:
        function = PART_FUNCTIONS[name]
        result = function(quick, timeout - 15) if name == "tests" else function(quick)
        result.update(status="ok")
    except Skip as reason:
        result = dict(status="skipped", reason=str(reason), rows=[])
    except Exception as error:  # a part's failure is a result, not the end of the session
        import traceback

        result = dict(status="failed", reason=f"{type(error).__name__}: {error}", rows=[],
                      traceback=traceback.format_exc().splitlines()[-15:])
    result.update(part=name, seconds=round(time.perf_counter() - started, 1))
    with open(os.path.join(out, f"part-{name}.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    return result


def run_parts(parts, out: str, budget: float, quick: bool, command=None) -> list[dict]:
    """Each part in its own process, with min(its timeout, the budget left) seconds; returns their results.
    ``command(name, timeout)`` builds the part's command line (tests substitute their own)."""
    os.makedirs(out, exist_ok=True)
    deadline = time.monotonic() + budget
    results = []
    for name in parts:
        left = deadline - time.monotonic()
        timeout = min(TIMEOUTS.get(name, 60), left)
        if timeout < MIN_PART_SECONDS:
            results.append(dict(part=name, status="skipped", reason="no time left in the budget", rows=[]))
            continue
        argv = (command or _part_command)(name, out, quick, timeout)
        started = time.perf_counter()
        try:
            subprocess.run(argv, timeout=timeout, check=False, stdout=sys.stderr, stderr=sys.stderr, cwd=ROOT)
            path = os.path.join(out, f"part-{name}.json")
            if os.path.exists(path):
                with open(path) as f:
                    results.append(json.load(f))
            else:
                results.append(dict(part=name, status="failed", reason="the part's process wrote no result", rows=[]))
        except subprocess.TimeoutExpired:
            results.append(dict(part=name, status="timed out", reason=f"killed after {timeout:.0f} s", rows=[],
                                seconds=round(time.perf_counter() - started, 1)))
        print(f"gpu_session: {name}: {results[-1]['status']} ({time.perf_counter() - started:.0f} s)", file=sys.stderr,
              flush=True)
    return results


def _part_command(name, out, quick, timeout):
    argv = [sys.executable, "-m", "dev.gpu_session", "--part", name, "--out", out,
            "--part-timeout", str(int(timeout))]
    return argv + (["--quick"] if quick else [])


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "/").replace("\n", " ")


def markdown(results) -> str:
    lines = ["# fastbp GPU session", ""]
    for result in results:
        lines.append(f"## {result['part']}: {result['status']}" + (f" ({result.get('seconds')} s)"
                                                                     if result.get("seconds") is not None else ""))
        if result.get("reason"):
            lines.append("")
            lines.append(f"{result['reason']}")
        rows = result.get("rows") or []
        if rows:
            columns = list(dict.fromkeys(key for row in rows for key in row))
            lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
        for note in result.get("notes") or []:
            lines += ["", f"_{note}_"]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-session"), help="folder for the results")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all parts together")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="W2-W4 with a tenth of the samples, fewer repeats")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # one part, in this process
    parser.add_argument("--part-timeout", type=float, default=300.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.part:
        run_part(args.part, args.out, args.quick, args.part_timeout)
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PART_FUNCTIONS]
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    results = run_parts(parts, args.out, args.budget, args.quick)
    with open(os.path.join(args.out, "session.json"), "w") as f:
        json.dump(dict(parts=results, budget_s=args.budget, quick=args.quick), f, indent=1, default=str)
    with open(os.path.join(args.out, "session.md"), "w") as f:
        f.write(markdown(results))
    print(f"gpu_session: wrote {os.path.join(args.out, 'session.md')} and session.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
