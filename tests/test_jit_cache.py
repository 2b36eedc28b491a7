"""Compilation promises: import compiles nothing, a second process loads kernels from the disk cache,
and a function that cannot be cached still works (with a warning) instead of failing at import."""
import contextlib
import importlib.util
import os
import pickle
import re
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import fastbp._jit
from fastbp.kernels import cpu as cpu_kernels


def run_python(code, cache_dir, **environment):
    """stdout of ``code`` run in a new process with the numba cache ``cache_dir`` (this process's cache when None;
    stderr too, with want_stderr=True)."""
    want_stderr = environment.pop("want_stderr", False)
    env = dict(os.environ, **environment)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = str(cache_dir)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return (result.stdout, result.stderr) if want_stderr else result.stdout


def test_import_compiles_nothing(tmp_path):
    out = run_python("""
        import fastbp, fastbp.kernels.cpu as k
        from numba.core.registry import CPUDispatcher
        compiled = [name for name, f in vars(k).items() if isinstance(f, CPUDispatcher) and f.signatures]
        print(len(compiled))
    """, tmp_path)
    assert out.strip() == "0"


def test_second_process_loads_from_disk_cache(tmp_path):
    # A small kernel, so that the first process compiles in a second (each driver's own loading is checked by
    # test_each_driver_loads_from_the_cache_as_a_first_call).
    code = """
        import numpy as np
        from fastbp.kernels import cpu
        out = np.empty((2, 3), np.float32)
        cpu.gather_rows(out, np.arange(12, dtype=np.float32).reshape(4, 3), np.array([3, 1]), 0)
        assert out.tolist() == [[9, 10, 11], [3, 4, 5]], out
        print(cpu.gather_rows.stats.cache_hits.most_common(1), cpu.gather_rows.stats.cache_misses.most_common(1))
    """
    first = run_python(code, tmp_path)
    second = run_python(code, tmp_path)
    assert "[]" == first.split("] [")[0] + "]", first  # no hit the first time: compiled and written
    assert second.startswith("[((") and second.rstrip().endswith("[]"), second  # a hit, no miss


def test_uncacheable_function_falls_back_with_a_warning():
    # A function with no source file cannot be cached ("no locator available"): it must still compile.
    namespace = {}
    exec("def add_one(a):\n    return a + 1\n", namespace)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = fastbp._jit.cpu_jit()(namespace["add_one"])
    assert compiled(np.arange(3.0)).tolist() == [1.0, 2.0, 3.0]
    if fastbp._jit.CACHE_ENABLED:
        assert any("compiling without a disk cache" in str(w.message) for w in caught)


def test_users_own_numba_code_keeps_its_warning():
    import numba
    from numba.core.errors import NumbaPerformanceWarning

    @numba.njit(parallel=True)
    def users_function(a):  # no prange: numba warns that nothing was parallelised
        return a[0] + 1.0

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        import fastbp  # noqa: F401  (importing fastbp must not filter the user's numba warnings)
        users_function(np.ones(2))
    assert any(issubclass(w.category, NumbaPerformanceWarning) for w in caught)


# Each of fastbp's drivers as the FIRST compiled call of a new process with a warm cache. The drivers call the
# engine, the loss and the optimizer by symbol (fastbp._jit.SeparatelyCompiled); a driver loaded from the disk
# cache before those symbols are registered would jump to address 0. Each call runs in a process of its own, so
# that no earlier call can have registered what the next one needs.
DRIVER_CALLS = {
    "fit": "trainer.fit(X, y, epochs=1)",
    "weighted_fit": "trainer.fit(X, y, epochs=1, sample_weight=w)",
    "predict": "trainer.predict(X)",
    "evaluate": "trainer.evaluate(X, y)",
    "loss_and_grads": "trainer.loss_and_grads(X, y, sample_weight=w)",
    "narrow_fit": "narrow.fit(X[:, :2], y, epochs=1)",
    "narrow_predict": "narrow.predict(X[:, :2])",
}
DRIVER_SCRIPT = """
    import numpy as np
    import fastbp
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 6)).astype(np.float32)
    y = rng.integers(0, 3, 50)
    w = rng.random(50).astype(np.float32)
    trainer = fastbp.Trainer(fastbp.MLP([6, 40, 3], "tanh", seed=0), loss="softmax_cross_entropy", optimizer="adam",
                             batch_size=16, clip_grad_norm=1.0)
    narrow = fastbp.Trainer(fastbp.MLP([2, 8, 3], "relu", seed=0), loss="softmax_cross_entropy", batch_size=16)

    {calls}
    import sys
    # numba refreshes its compiler (importing its implementations: scipy.linalg among them) before it compiles,
    # and before its own cache loads; fastbp's loads skip that (0.2-0.3 s of a warm first call)
    print("done", "numba.np.arraymath" in sys.modules)
"""


def test_each_driver_loads_from_the_cache_as_a_first_call():
    # The first process fills the cache with every driver (the suite's cache, where other tests have compiled most
    # of them already: what a driver's cold compile prints is test_a_cold_first_call_shares_its_compiling's
    # business), then each driver is the first call of a process of its own.
    run_python(DRIVER_SCRIPT.format(calls="; ".join(DRIVER_CALLS.values())), None)
    for name, call in DRIVER_CALLS.items():
        assert run_python(DRIVER_SCRIPT.format(calls=call), None).strip() == "done False", name


BLAS_NAMES = {"dot", "vdot", "inner", "outer", "matmul", "tensordot", "einsum", "linalg", "kron"}


def test_compiled_cpu_code_calls_no_blas():
    """The compile helper tells numba that scipy's BLAS is absent (fastbp._compile_worker.NO_BLAS_MODULE), while the
    user's process may have it: numba compiles np.dot and its kin differently in the two, so a function the helper
    compiled into the cache would give other numbers than the same function compiled in the user's process. Hence
    no CPU kernel source names a BLAS-backed numpy operation, nor the @ operator."""
    import ast
    import pathlib

    import fastbp._compile_worker

    assert fastbp._compile_worker.NO_BLAS_MODULE == "scipy.linalg.cython_blas"  # what numba.np.linalg imports
    package = pathlib.Path(fastbp.__file__).parent
    sources = [package / "_jit.py"] + [path for path in (package / "kernels").glob("*.py")
                                       if not path.name.startswith("cuda")]
    found = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.BinOp, ast.AugAssign)) and isinstance(node.op, ast.MatMult):
                found.append(f"{path.name}:{node.lineno} @")
            elif isinstance(node, ast.Attribute) and node.attr in BLAS_NAMES:
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert len(sources) >= 6 and not found, found


def test_the_helper_compiles_without_scipy(tmp_path):
    # The helper's own process, on an empty cache: numba's implementations loaded (it compiled), scipy.linalg
    # never imported (numba imports it in the user's process, where scipy is installed).
    code = ("import sys, runpy; sys.argv = sys.argv[:1] + {args!r}\n"
            "try:\n    runpy.run_module('fastbp._compile_worker', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('numba.np.arraymath' in sys.modules, 'scipy.linalg' in sys.modules)")
    args = [str(tmp_path / "claims"), str(os.getpid()), "float64", "fastbp.kernels.cpu:softmax_block"]
    os.makedirs(args[0])
    assert run_python(code.format(args=args), tmp_path / "cache").split() == ["True", "False"]


def test_only_functions_with_a_prange_are_compiled_parallel():
    """numba warns "no transformation for parallel execution" when it compiles a parallel=True function that
    holds no prange, and its parfor passes cost compile time for nothing there: fastbp's compiled functions are
    parallel exactly where they hold a prange (inline helpers take their caller's setting)."""
    import inspect

    from numba.core.registry import CPUDispatcher

    from fastbp.kernels import gemm, narrow, pointwise, simd

    def holds_prange(func):  # in its own code or in the inline helpers it calls (their code becomes its)
        inlined = [value.py_func for value in map(func.__globals__.get, func.__code__.co_names)
                   if isinstance(value, CPUDispatcher) and value.targetoptions.get("inline") == "always"]
        return "prange(" in inspect.getsource(func) or any(map(holds_prange, inlined))

    checked = []
    kernel = narrow.kernel_for(np.array([0]), 0)  # a closure's dispatcher: made on demand
    values = [(module, value) for module in (cpu_kernels, gemm, narrow, simd, pointwise)
              for value in vars(module).values()] + [(narrow, kernel)]
    for module, value in values:
        dispatcher = getattr(value, "dispatcher", value)  # a SeparatelyCompiled's own dispatcher
        if (isinstance(dispatcher, CPUDispatcher) and dispatcher.py_func.__module__ == module.__name__
                and dispatcher.targetoptions.get("inline") != "always"):
            parallel = bool(dispatcher.targetoptions.get("parallel"))
            assert parallel == holds_prange(dispatcher.py_func), dispatcher.py_func.__qualname__
            checked.append(parallel)
    assert len(checked) > 20 and 0 < sum(checked) < len(checked)


def test_code_loaded_without_numbas_refresh_runs_and_raises(tmp_path):
    """fastbp's cache loads skip numba's compiler refresh (see _RegisteringCache.load_overload): code loaded that
    way must still allocate arrays (numba's runtime), call math functions and raise from compiled code."""
    (tmp_path / "loaded_kernel.py").write_text(textwrap.dedent("""
        import math
        import numpy as np
        from fastbp._jit import cpu_jit

        @cpu_jit()
        def softplus_sum(x):
            if x.shape[0] == 0:
                raise ValueError("softplus_sum: x is empty")
            y = np.empty_like(x)  # numba's runtime allocates it
            total = 0.0
            for i in range(x.shape[0]):
                y[i] = math.log1p(math.exp(x[i]))
                total += y[i]
            return total
    """))
    code = f"""
        import sys
        import numpy as np
        sys.path.insert(0, {str(tmp_path)!r})
        from loaded_kernel import softplus_sum
        value = softplus_sum(np.array([0.0, 1.0]))
        try:
            softplus_sum(np.zeros(0))
        except ValueError as error:
            message = str(error)
        print(round(value, 12), message, softplus_sum.stats.cache_hits.most_common(1) != [],
              "numba.np.arraymath" in sys.modules)
    """
    expected = f"{round(np.log(2) + np.log1p(np.e), 12)} softplus_sum: x is empty"
    assert run_python(code, tmp_path / "cache").split() == (expected + " False True").split()  # compiled
    assert run_python(code, tmp_path / "cache").split() == (expected + " True False").split()  # loaded


def test_cache_entry_follows_the_code_it_calls(tmp_path):
    """numba keys a cached function by its own bytecode and file only, so a caller compiled against an older
    callee in another file kept being served (numba #10776). fastbp's cpu_jit keys it by everything its machine
    code is built from. Five callers, each compiled against a callee in another file that then changes: (0) an
    inline helper's module-level number; and four changes the callee's own bytecode does not show: (1) the
    declared type of an argument of a function called by symbol (the caller passes its arguments as declared: an
    int64 read as a float64, wrong numbers; a changed array type, a crash); (2) a plain Python helper that
    declaration calls; (3) a module-level table of numbers the code reads (numba freezes it into the code); (4) a
    lower_builtin registered for a stub function (as simd's operators on its vectors). A second process loads all
    five from the cache; after the edits, a third recompiles each and gives the new result."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "callers.py").write_text(textwrap.dedent("""
        from fastbp._jit import cpu_jit
        from . import declared, helped, inline, lowered, table

        @cpu_jit()
        def by_inline(x):
            return inline.inner(x) + 1.0

        @cpu_jit()
        def by_declaration(a):
            declared.leaf(a, 3)
            return a[0]

        @cpu_jit()
        def by_helper(a):
            helped.leaf(a, 3)
            return a[0]

        @cpu_jit()
        def by_table(x):
            return x + table.TABLE[1]

        @cpu_jit()
        def by_lowering(x):
            return lowered.scale(x) + 1.0
    """))
    leaf = """
        from numba import types
        from fastbp._jit import SeparatelyCompiled, cpu_jit

        def scalar_type():
            return types.{scalar}

        def leaf_signature(f):
            return (types.Array(f, 1, "C"), {declared})

        @cpu_jit()
        def _leaf(a, n):
            a[0] = n * 0.5

        leaf = SeparatelyCompiled(_leaf, leaf_signature)
    """
    lowered = """
        from numba import types
        from numba.extending import lower_builtin, type_callable

        def scale(x):
            raise NotImplementedError("compiled code only")

        @type_callable(scale)
        def _type_scale(context):
            return lambda x: x if x == types.float64 else None

        @lower_builtin(scale, types.float64)
        def _lower_scale(context, builder, signature, args):
            return builder.fmul(args[0], context.get_constant(types.float64, {factor}))
    """
    code = f"""
        import sys
        import numpy as np
        sys.path.insert(0, {str(tmp_path)!r})
        from pkg import callers
        for caller, argument in ((callers.by_inline, 1.0), (callers.by_declaration, np.zeros(2)),
                                 (callers.by_helper, np.zeros(2)), (callers.by_table, 1.0), (callers.by_lowering, 1.0)):
            print(caller(argument), caller.stats.cache_hits.most_common(1) != [], end="  ")
    """

    def write(scale, declared_type, helper_type, number, factor):
        (package / "inline.py").write_text(textwrap.dedent(f"""
            from fastbp._jit import cpu_jit
            SCALE = {scale}

            @cpu_jit()
            def inner(x):
                return x * SCALE
        """))
        (package / "declared.py").write_text(textwrap.dedent(leaf.format(scalar="float64", declared=declared_type)))
        (package / "helped.py").write_text(textwrap.dedent(leaf.format(scalar=helper_type, declared="scalar_type()")))
        (package / "table.py").write_text(f"TABLE = (0.0, {number})\n")
        (package / "lowered.py").write_text(textwrap.dedent(lowered.format(factor=factor)))

    write("2.0", "types.int64", "float64", "10.0", "2.0")
    assert run_python(code, tmp_path / "cache").split() == "3.0 False 1.5 False 1.5 False 11.0 False 3.0 False".split()
    assert run_python(code, tmp_path / "cache").split() == "3.0 True 1.5 True 1.5 True 11.0 True 3.0 True".split()
    write("5.0", "types.float64", "int64", "20.0", "5.0")
    assert run_python(code, tmp_path / "cache").split() == "6.0 False 1.5 False 1.5 False 21.0 False 6.0 False".split()


def test_nrt_false_compiles_without_reference_counting():
    """cpu_jit(nrt=False) reaches numba (its _nrt option): such a function cannot allocate (numba types no
    np.empty without its runtime), and views of its arguments work. The drivers, loss, output transform and
    optimizer compile that way (a quarter less to compile for the drivers)."""
    from numba.core.errors import TypingError

    from fastbp.kernels import cpu

    def allocates(n):
        return np.empty(n)

    def sums_a_view(a):
        return a[1:].reshape((1, a.shape[0] - 1)).sum()

    with pytest.raises(TypingError, match="empty"):
        fastbp._jit.cpu_jit(nrt=False, cache=False)(allocates)(3)
    assert fastbp._jit.cpu_jit(nrt=False, cache=False)(sums_a_view)(np.arange(4.0)) == 6.0
    for driver in (cpu.train_epochs, cpu.forward_pass, cpu.dataset_grads, cpu.batch_grads.dispatcher,
                   cpu.optimizer_step.dispatcher, cpu.loss_grad, cpu.output_transform, cpu.softmax_block.dispatcher):
        assert driver.targetoptions.get("_nrt") is False, driver


def test_a_separately_compiled_function_without_a_python_entry_point_is_called_from_python_by_symbol():
    """The functions only compiled code calls are compiled without numba's CPython wrapper (less to compile);
    called from Python (tests, benchmarks), a SeparatelyCompiled goes through a small compiled function that
    calls it by symbol, with the same results and return value."""
    from fastbp.kernels import cpu, gemm

    for function in (gemm.product, gemm.task_by_symbol, gemm.parallel_tasks, cpu.batch_grads, cpu.softmax_block):
        assert function.dispatcher.targetoptions.get("no_cpython_wrapper") is True, function
    a = np.zeros(3)
    _leaf_by_symbol_without_wrapper(a)
    _leaf_by_symbol_without_wrapper(a)
    assert a[0] == 20.0 and _leaf_by_symbol_without_wrapper._from_python is not None


def test_concurrent_saves_never_mix_up_machine_code(tmp_path, monkeypatch):
    """Two processes that save different entries of one function into one cache at once each start from the
    index as they read it: numba named both data files '.1.nbc', so the index one process wrote could name the
    data file the other wrote last (numba #10128). fastbp's caches name a data file after its key, so an entry
    loads its own machine code or nothing (a recompile), never another entry's."""
    source = tmp_path / "module_for_cache.py"
    source.write_text("def add(a):\n    return a + 1\n")
    spec = importlib.util.spec_from_file_location("module_for_cache", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cache_file = fastbp._jit.cpu_jit()(module.add)._cache._cache._cache_file
    save_data = cache_file._save_data
    writes = []
    monkeypatch.setattr(cache_file, "_load_index", lambda: {})  # both read the index before either saved
    monkeypatch.setattr(cache_file, "_save_data", lambda name, data: writes.append((name, data)))
    cache_file.save(("process B",), b"machine code B")  # B writes its index first ...
    cache_file.save(("process A",), b"machine code A")  # ... A's index is the one that stays,
    monkeypatch.undo()
    for name, data in reversed(writes):  # ... and B's data file is written last
        save_data(name, data)
    assert cache_file.load(("process A",)) == b"machine code A"


# -- compile sessions: slots, the helper process ------------------------------------------------------------------
COLD_PREDICT = """
    import numpy as np
    import fastbp
    from fastbp import _jit
    from fastbp.kernels import cpu, gemm
    import os
    X = np.random.default_rng(0).standard_normal((40, 6)).astype(np.float32)
    trainer = fastbp.Trainer(fastbp.MLP([6, 40, 3], "relu", seed=0), loss="softmax_cross_entropy")
    prefetched = [[leaf.__qualname__ for leaf in helper.leaves] for helper in _jit._helpers.values()]
    if os.environ.get("BIG_CALL"):  # this predict counts as a big call: it waits for the tiled worker
        gemm.TILES_PAY_AFTER = len(X) * trainer.model.n_params
    print(trainer.predict(X).tobytes().hex())
    print(sum(gemm._task.stats.cache_hits.values()), sum(gemm._task.stats.cache_misses.values()), prefetched)
    print("loss compiled or loaded here:", bool(cpu.loss_block._results), "compile seconds:", fastbp.compile_seconds())
"""


def test_a_cold_first_call_shares_its_compiling_with_a_helper_process(tmp_path):
    """With an empty cache, the leaves of predict's call tree (the product engine's product, the output transform)
    are compiled by a helper process, started when the trainer was made (with the other leaves of predict's and,
    for a wide trainer, the fit's call trees, then the versions of forward_pass a trainer calls after a fit, then
    the product's optional tiled worker and parallel region), and loaded here from the cache by the first predict,
    which waits only for what it needs: not the loss, which predict never calls, nor the tiled worker, whose plain
    product gives the same numbers (its own version of forward_pass it compiles here, the helper not having
    started it); the results are those of a process that compiled everything itself. Without a helper, the
    predict compiles no worker either (it is compiled at a later call, where a product wanted it). A warm predict
    loads only what predict's code calls: nothing is compiled though the cache lacks the loss and the worker."""
    # FASTBP_COMPILE_PROCESSES="": helpers allowed, whatever this process was given (see conftest.py)
    shared = run_python(COLD_PREDICT, tmp_path / "shared", FASTBP_COMPILE_PROCESSES="").strip().splitlines()
    alone, stderr = run_python(COLD_PREDICT, tmp_path / "alone", FASTBP_COMPILE_PROCESSES="1",
                               PYTHONWARNINGS="default", want_stderr=True)
    assert not re.search(r"Numba\w*Warning", stderr), stderr[-2000:]  # a cold compile prints none of numba's
    alone = alone.strip().splitlines()
    warm = run_python(COLD_PREDICT, tmp_path / "alone", FASTBP_COMPILE_PROCESSES="1").strip().splitlines()
    assert shared[0] == alone[0] == warm[0]  # bit for bit
    # _task neither loaded nor compiled here; the predict took the helper over
    assert shared[1] == ("0 0 [['_product_by_symbol', 'loss_grad', 'adam_update', 'clip_grad_norm', 'sgd_update', "
                         "'_softmax_block', 'forward_pass.predict', 'forward_pass.predict_and_loss', '_task', "
                         "'_parallel_tasks']]"
                         ), shared[1]
    assert alone[1] == "0 0 []", alone[1]  # no helper, and no worker compiled for a first predict
    # the loss: not waited for (the helper may still be compiling it) nor compiled here, nor by the warm process
    assert shared[2].startswith("loss compiled or loaded here: False"), shared[2]
    assert alone[2].startswith("loss compiled or loaded here: False"), alone[2]
    assert warm[1] == "0 0 []" and warm[2] == "loss compiled or loaded here: False compile seconds: 0.0", warm[1:]
    # A call of gemm.TILES_PAY_AFTER multiply-adds or more waits for the worker (compiled here, or by the helper this
    # trainer started for it: the cache lacks it) and runs on the tiles: the same numbers.
    big = run_python(COLD_PREDICT, tmp_path / "alone", FASTBP_COMPILE_PROCESSES="", BIG_CALL="1").splitlines()
    assert big[0] == shared[0]
    assert big[1].split(" [")[0] in ("0 1", "1 0") and big[1].endswith("'_task', '_parallel_tasks']]"), big[1]


def test_a_large_network_has_its_helper_compile_the_tiled_worker_first(monkeypatch):
    """The tiled worker and the parallel region are optional (the plain product, one thread, do without them), and
    compiled after everything else a trainer needs, except for a network of TILES_FIRST_PARAMS parameters or more:
    its products are large enough for them to pay from the first call (compiled last, they missed the cache of
    every script that ended before its helper got to them)."""
    from fastbp.backends import cpu as backend
    from fastbp.kernels import gemm

    lists = []

    class Recording:  # the helper process a trainer starts, recorded instead of started
        def __init__(self, leaves, dtype):
            lists.append([leaf.__qualname__ for leaf in leaves])
            self.leaves, self.owner = leaves, os.getpid()
            self.process = type("Running", (), {"poll": lambda self: None})()

        def finished(self, dtype):
            return False

    monkeypatch.setattr(fastbp._jit, "_Helper", Recording)
    monkeypatch.setattr(fastbp._jit, "_helper_allowed", lambda: True)
    monkeypatch.setattr(fastbp._jit, "_missing", lambda function, dtype: True)  # an empty cache
    monkeypatch.setattr(fastbp._jit, "_helpers", {})
    monkeypatch.setattr(fastbp._jit, "_prefetch_checked", set())
    assert gemm.task_by_symbol.optional
    for sizes in ([6, 40, 3], [6, 300, 300, 3]):
        fastbp._jit._helpers.clear()
        fastbp.Trainer(fastbp.MLP(sizes, "relu", seed=0), loss="softmax_cross_entropy")
    small, large = lists
    assert fastbp.MLP([6, 300, 300, 3]).n_params >= backend.TILES_FIRST_PARAMS > fastbp.MLP([6, 40, 3]).n_params
    assert small[-2:] == ["_task", "_parallel_tasks"] and small.count("_task") == 1, small
    assert large[:2] == ["_task", "_parallel_tasks"] and large.count("_task") == large.count("_parallel_tasks") == 1
    assert "_product_by_symbol" in large, large


@pytest.mark.parametrize("sizes, activation, work, waits_for", [
    ([6, 40, 3], "relu", 10, []),  # small network, small call: the plain product, on one thread
    ([6, 40, 3], "relu", None, ["_task"]),  # small network, a call of TILES_PAY_AFTER multiply-adds: the worker
    ([6, 300, 300, 3], "relu", 10, ["_task"]),  # large network: the worker, any call (the region: loaded when there)
    ([6, 40, 3], "tanh", 10, ["_activate_row"]),  # its products call the activation filled on request
    ([6, 300, 300, 3], "sigmoid", 10, ["_activate_row", "_task"]),
], ids=["small", "big call", "large network", "tanh", "large sigmoid network"])
def test_which_calls_fill_a_slot_first(monkeypatch, sizes, activation, work, waits_for):
    from fastbp.backends import cpu as backend
    from fastbp.kernels import gemm

    waited, called = [], []
    monkeypatch.setattr(backend, "fill_now", lambda function, dtype: waited.append(function.__qualname__))
    monkeypatch.setattr(backend, "prefetch", lambda *args, **kwargs: None)  # no helper
    for function in (gemm.task_by_symbol, gemm.parallel_tasks, gemm.activate_row):
        monkeypatch.setattr(function, "_results", {})  # none compiled yet

    class Driver:  # an Entry that records its preparation and its call
        def prepare(self, *args):
            called.append("prepare")

        def __call__(self, *args):
            called.append("call")
            return 7

    trainer = fastbp.Trainer(fastbp.MLP(sizes, activation, seed=0), loss="softmax_cross_entropy")
    assert trainer._backend._call(Driver(), gemm.TILES_PAY_AFTER if work is None else work, 1, 2) == 7
    assert waited == waits_for
    assert called == (["prepare"] * len(waits_for) + ["call"])


def test_a_predict_compiles_its_losss_transform_before_its_driver(monkeypatch):
    """A predict's driver calls the loss's output transform (a slot filled on request): where the helper has not
    started it, this process compiles it before the driver, whose session then waits for the helper's product;
    a fit's calls never fill it."""
    from fastbp.backends import cpu as backend
    from fastbp.kernels import cpu

    order = []
    monkeypatch.setattr(backend, "take_unstarted", lambda function, dtype: order.append(("take", function)))
    monkeypatch.setattr(backend, "fill_now", lambda function, dtype: order.append(("fill", function)))
    monkeypatch.setattr(backend, "prefetch", lambda *args, **kwargs: None)
    monkeypatch.setattr(cpu.softmax_block, "_results", {})

    class Driver:
        def prepare(self, *args):
            order.append(("prepare", None))

        def __call__(self, *args):
            order.append(("call", None))

    trainer = fastbp.Trainer(fastbp.MLP([6, 40, 3], "relu", seed=0), loss="softmax_cross_entropy")
    trainer._backend._call(Driver(), 10, 1)
    assert order == [("call", None)]
    order.clear()
    trainer._backend._call(Driver(), 10, 1, transforms=True)
    assert order == [("take", cpu.softmax_block), ("prepare", None), ("fill", cpu.softmax_block), ("call", None)]
    assert cpu.transform_for(fastbp.kernels.LOSSES["mse"]) is cpu.identity_block


COLD_NARROW_FIT = """
    import numpy as np
    import fastbp
    from fastbp import _jit
    from fastbp.kernels import narrow
    X = np.linspace(-1, 1, 64, dtype=np.float32).reshape(-1, 1)
    trainer = fastbp.Trainer(fastbp.MLP([1, 8, 1], "sigmoid", seed=0), loss="mse", batch_size=64)
    prefetched = [[leaf.__qualname__ for leaf in helper.leaves] for helper in _jit._helpers.values()]
    trainer.fit(X, 2 * X, epochs=2)
    print(prefetched)
    for function in (narrow.forward_sigmoid, fastbp.kernels.cpu.optimizer_step):
        stats = function.dispatcher.stats
        print(function.__qualname__, sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))
    import time
    from numba import types
    helper = _jit._helpers[types.float32]
    while not helper.finished(types.float32) and helper.process.poll() is None:
        time.sleep(0.05)
    trainer.predict(X)
    stats = fastbp.kernels.cpu.forward_pass.stats
    print("forward_pass", sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))
"""


def test_a_cold_narrow_fit_leaves_the_kernels_callees_to_the_helper(tmp_path):
    """A narrow trainer's helper compiles the fused kernel's callees first (then the sigmoid its products call,
    filled on request, predict's product, then the loss, then the loss's output transform (filled on request) and
    the versions of forward_pass a predict and an evaluation call, then the product's optional tiled worker and
    parallel region), while the fit
    compiles the kernel: the fit loads them from the cache, and so does the predict, once the helper is done."""
    out = run_python(COLD_NARROW_FIT, tmp_path, FASTBP_COMPILE_PROCESSES="").strip().splitlines()
    assert out[0] == ("[['forward_sigmoid', '_optimizer_step', '_activate_row', '_product_by_symbol', 'loss_grad', "
                      "'_identity_block', 'forward_pass.predict', 'forward_pass.loss', '_task', '_parallel_tasks']]"
                      ), out[0]
    assert out[1:3] == ["forward_sigmoid 1 0", "_optimizer_step 1 0"], out[1:]  # loaded, not compiled here
    assert out[3] == "forward_pass 1 0", out[3]


def test_the_driver_versions_are_those_the_backend_calls(monkeypatch):
    # What a helper compiles ahead (fastbp._jit.DriverVersion) must be exactly the types the CPU backend passes:
    # every first call of forward_pass through the backend's Entries, recorded here, is one of the versions.
    from numba import types

    from fastbp.backends import cpu as backend
    from fastbp.kernels import cpu

    seen = []

    class Recording:
        def __init__(self, entry):
            self.entry = entry

        def __call__(self, *args):
            seen.append(tuple(self.entry.dispatcher.typeof_pyval(a) for a in args))
            return self.entry(*args)

        def prepare(self, *args):
            self.entry.prepare(*args)

    for name in ("_predict", "_loss", "_predict_and_loss"):
        monkeypatch.setattr(backend, name, Recording(getattr(backend, name)))
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        X = rng.standard_normal((40, 6)).astype(dtype)
        for loss, y in (("softmax_cross_entropy", np.arange(40) % 3), ("mse", X[:, :3] * 2)):
            trainer = fastbp.Trainer(fastbp.MLP([6, 40, 3], "relu", dtype=dtype, seed=0), loss=loss)
            trainer.fit(X, y, epochs=1, validation_data=(X, y))
            trainer.predict(X)
            trainer.evaluate(X, y)
    versions = {tuple(version.signature_for(f)) for f in (types.float32, types.float64)
                for version in (cpu.forward_pass_predict, cpu.forward_pass_predict_and_loss, cpu.forward_pass_loss)}
    assert len(seen) >= 12 and set(seen) == versions


def test_a_separately_compiled_function_names_its_own_module():
    from fastbp.kernels import gemm

    assert repr(gemm.parallel_tasks) == "<separately compiled fastbp.kernels.gemm._parallel_tasks>"


def test_separately_compiled_functions_pickle_by_reference():
    # their slots hold this process's addresses; a pickled trainer's fused kernel names them (test_workers)
    import pickle

    from fastbp.kernels import gemm, narrow
    for function in (narrow.forward_sigmoid, narrow.forward_tanh, gemm.product):
        assert pickle.loads(pickle.dumps(function)) is function


def _leaf(a):
    a[0] += 1.0


def _leaf_signature(f):
    from numba import types

    return (types.Array(f, 1, "C"),)


def _caller(a):
    _leaf_by_slot(a)


_leaf_by_slot = fastbp._jit.SeparatelyCompiled(fastbp._jit.cpu_jit(cache=False)(_leaf), _leaf_signature)
_caller_jit = fastbp._jit.cpu_jit(cache=False)(_caller)


def test_a_call_through_an_empty_slot_raises_instead_of_crashing(monkeypatch):
    from numba import types

    # Empty, whatever an earlier test in this process compiled (the slot outlives their monkeypatched _results)
    _leaf_by_slot.declare(types.float64)
    monkeypatch.setattr(_leaf_by_slot._slots[types.float64], "value", None)
    monkeypatch.setattr(_leaf_by_slot, "_results", {})
    session = fastbp._jit._CompileSession()
    monkeypatch.setattr(fastbp._jit, "_session", session)
    _caller_jit.compile((types.Array(types.float64, 1, "C"),))  # the leaf is deferred: its slot stays empty
    monkeypatch.setattr(fastbp._jit, "_session", None)
    assert session.pending == [(_leaf_by_slot, types.float64)]
    a = np.zeros(1)
    with pytest.raises(RuntimeError, match="_leaf .float64. was called before it was compiled"):
        _caller_jit(a)
    session.fill_pending()
    _caller_jit(a)
    assert a[0] == 1.0


def _leaf_declared_wrongly(a):
    a[0] += 1.0


def test_a_declared_return_type_is_checked():
    from numba import types

    wrong = fastbp._jit.SeparatelyCompiled(fastbp._jit.cpu_jit(cache=False)(_leaf_declared_wrongly),
                                           _leaf_signature, returns=types.float64)
    with pytest.raises(TypeError, match="returns none, but is declared to return float64"):
        wrong.fill(types.float32)


def test_a_second_object_of_one_function_is_refused_and_the_first_keeps_its_slots():
    # Their slots' symbols would be the same: code linked after the second declared them would read its slots.
    from numba import types

    _leaf_by_slot.fill(types.float64)
    with pytest.raises(ValueError, match=r"test_jit_cache\._leaf is already compiled separately"):
        fastbp._jit.SeparatelyCompiled(fastbp._jit.cpu_jit(cache=False)(_leaf), _leaf_signature)
    same_name = fastbp._jit.cpu_jit(cache=False)(lambda a: None)
    same_name.py_func.__module__, same_name.py_func.__qualname__ = _leaf.__module__, _leaf.__qualname__
    with pytest.raises(ValueError, match="already compiled separately"):  # another function, the same name
        fastbp._jit.SeparatelyCompiled(same_name, _leaf_signature)
    a = np.zeros(1)
    fastbp._jit.cpu_jit(cache=False)(_caller)(a)  # linked now: it must find the first object's slot, filled
    assert a[0] == 1.0


def stand_in_helpers(monkeypatch, code):
    """Sessions get, instead of a compile helper, a process running ``code`` that claims nothing; the list of
    those started. The leaf is missing from the disk cache and from this process."""

    class StandIn(fastbp._jit._Helper):
        def __init__(self, leaves, dtype):
            import tempfile

            self.folder = tempfile.mkdtemp(prefix="fastbp-compile-")
            self.leaves = leaves
            self.dtype = dtype
            self.owner = os.getpid()
            self.process = subprocess.Popen([sys.executable, "-c", code])
            started.append(self)

    started = []
    monkeypatch.setattr(fastbp._jit, "_helpers", {})
    monkeypatch.setattr(fastbp._jit, "_Helper", StandIn)
    monkeypatch.setattr(fastbp._jit, "_helper_allowed", lambda: True)
    monkeypatch.setattr(_leaf_by_slot, "in_disk_cache", lambda dtype: False)
    monkeypatch.setattr(_leaf_by_slot, "_results", {})  # as if nothing were compiled yet
    return started


def test_a_helper_that_dies_leaves_its_work_to_this_process(monkeypatch):
    """The helper claims nothing and exits: this process claims every leaf itself and the call runs."""
    started = stand_in_helpers(monkeypatch, "raise SystemExit(3)")
    entry = fastbp._jit.Entry(fastbp._jit.cpu_jit(cache=False)(_caller))
    a = np.zeros(1, np.float32)
    entry(a)
    entry(a)
    assert [helper.leaves for helper in started] == [[_leaf_by_slot]] and a[0] == 2.0
    for helper in started:
        helper.process.wait()
        helper.close()


def test_a_session_does_not_wait_for_what_it_compiled_itself(monkeypatch):
    """A helper still busy (here: asleep, having claimed nothing): this process claims and compiles the leaf, and
    goes on without waiting for the helper to exit."""
    import time

    started = stand_in_helpers(monkeypatch, "import time; time.sleep(60)")
    a = np.zeros(1)
    start = time.perf_counter()
    try:
        fastbp._jit.Entry(fastbp._jit.cpu_jit(cache=False)(_caller))(a)
        assert time.perf_counter() - start < 30 and a[0] == 1
        assert len(started) == 1 and started[0].process.poll() is None  # it did not wait for the helper's end
    finally:
        for helper in started:
            helper.process.kill()
            helper.process.wait()
            helper.close()


def _other(a):
    a[0] += 2.0


def _other_caller(a):
    _other_by_slot(a)


_other_by_slot = fastbp._jit.SeparatelyCompiled(fastbp._jit.cpu_jit(cache=False)(_other), _leaf_signature)


def test_a_busy_helper_takes_a_later_trainers_leaves_and_one_done_is_not_waited_for(monkeypatch):
    """A helper still busy gets the leaves a later prefetch needs that it lacks, through its queue file (a
    session's own look-up leaves it as it is). A helper whose leaves are all done, but whose process has not
    exited yet (it is asleep here): the next trainer's missing leaves go to a new helper instead of being
    compiled by this process, and the old one's folder is removed at exit."""
    from numba import types

    started = stand_in_helpers(monkeypatch, "import time; time.sleep(60)")
    monkeypatch.setattr(fastbp._jit, "_retired", [])
    monkeypatch.setattr(fastbp._jit, "_prefetch_checked", set())
    monkeypatch.setattr(_other_by_slot, "in_disk_cache", lambda dtype: False)
    monkeypatch.setattr(_other_by_slot, "_results", {})
    caller, other_caller = (fastbp._jit.cpu_jit(cache=False)(f) for f in (_caller, _other_caller))
    try:
        first = fastbp._jit._helper_for(types.float64, [caller])
        assert first.leaves == [_leaf_by_slot]
        assert fastbp._jit._helper_for(types.float64, [other_caller]) is first  # a session's: as it is
        assert first.leaves == [_leaf_by_slot] and not os.path.exists(fastbp._jit.queue_file(first.folder))
        fastbp._jit.prefetch([other_caller], types.float64)  # a trainer's: queued for the busy helper
        assert first.leaves == [_leaf_by_slot, _other_by_slot] and started == [first]
        with open(fastbp._jit.queue_file(first.folder)) as queue:
            assert queue.read() == f"{__name__}:_other_by_slot\n"
        for leaf in (_leaf_by_slot, _other_by_slot):
            open(fastbp._jit.done_marker(first.folder, leaf, types.float64), "wb").close()
        second = fastbp._jit._helper_for(types.float64, [other_caller])
        assert second is not first and second.leaves == [_other_by_slot]
        assert fastbp._jit._retired == [first] and started == [first, second]
    finally:
        for helper in started:
            helper.process.kill()
            helper.process.wait()
            helper.close()


def test_the_helper_takes_what_was_queued_before_the_rest_of_its_list(tmp_path):
    # The real helper, on the suite's disk cache (compiled there if missing): its list (the SGD/Adam step, the
    # output transform), but first what its queue holds (the fused kernel's sigmoid layer, and the output
    # transform again: a later trainer needs it too), and last what was queued as last (the tanh layer), each
    # marked done once.
    from numba import types

    from fastbp.kernels import cpu, narrow
    folder = str(tmp_path)
    with open(fastbp._jit.queue_file(folder), "w") as queue:
        queue.write("fastbp.kernels.narrow:forward_tanh" + fastbp._jit.LAST_SUFFIX + "\n"
                    "fastbp.kernels.narrow:forward_sigmoid\nfastbp.kernels.cpu:softmax_block\n")
    subprocess.run([sys.executable, "-m", "fastbp._compile_worker", folder, str(os.getpid()), "float64",
                    "fastbp.kernels.cpu:optimizer_step", "fastbp.kernels.cpu:softmax_block"], check=True,
                   timeout=600, env=fastbp._jit.helper_environment(**{fastbp._jit.WORKER_VARIABLE: "1"}))
    order = [narrow.forward_sigmoid, cpu.softmax_block, cpu.optimizer_step, narrow.forward_tanh]
    done = [os.stat(fastbp._jit.done_marker(folder, function, types.float64)).st_mtime_ns for function in order]
    assert done == sorted(done)


def _optional_leaf(a):
    a[0] += 10.0


def _optional_caller(a):
    # wants the optional function for arrays of 2 or more (the product engine: for products big enough to be
    # worth a parallel region), its work counted as the array's length (the tiled worker: multiply-adds)
    if a.shape[0] >= 2 and fastbp._jit.is_compiled(_optional_by_slot, a, a.shape[0]):
        _optional_by_slot(a)
    else:  # what the caller does without it (the product engine: its tasks on the calling thread)
        a[0] += 1.0


def _leaf_without_wrapper(a):
    a[0] += 10.0


# Each SeparatelyCompiled wraps a function of its own: two of one function share its slot's symbol, and the one
# declared last takes it (this file's optional-slot tests failed whenever pytest-xdist ran the test above after
# them: the compiled caller read the other object's slot, never filled).
_leaf_by_symbol_without_wrapper = fastbp._jit.SeparatelyCompiled(
    fastbp._jit.cpu_jit(cache=False, no_cpython_wrapper=True)(_leaf_without_wrapper), _leaf_signature)
_optional_by_slot = fastbp._jit.SeparatelyCompiled(fastbp._jit.cpu_jit(cache=False)(_optional_leaf), _leaf_signature,
                                                   optional=True)


def _without_the_optional_function(monkeypatch):
    # Nothing compiled, nothing in the disk cache, its slot empty; no optional function pending, no helper running
    # (one found running would take it).
    from numba import types

    monkeypatch.setattr(fastbp._jit, "_helpers", {})

    _optional_by_slot.declare(types.float64)
    monkeypatch.setattr(_optional_by_slot._slots[types.float64], "value", None)
    monkeypatch.setattr(_optional_by_slot._wanted[types.float64], "value", 0)
    monkeypatch.setattr(_optional_by_slot, "_results", {})
    monkeypatch.setattr(_optional_by_slot, "in_disk_cache", lambda dtype: False)
    monkeypatch.setattr(fastbp._jit, "_optional_pending", [])
    monkeypatch.setattr(fastbp._jit, "_next_poll", [0.0])


@contextlib.contextmanager
def _sleeping_helpers(monkeypatch):
    """The stand-in helpers (asleep, claiming nothing) that sessions start within the block, killed after it."""
    started = stand_in_helpers(monkeypatch, "import time; time.sleep(60)")
    try:
        yield started
    finally:
        for helper in started:
            if helper.process.poll() is None:
                helper.process.kill()
            helper.process.wait()
            helper.close()


@contextlib.contextmanager
def _a_driver_with_an_optional_callee(monkeypatch):
    """(entry, a, started): an Entry of _optional_caller whose optional callee is missing everywhere, its array,
    and the stand-in helpers (asleep, claiming nothing) that its sessions start."""
    with _sleeping_helpers(monkeypatch) as started:
        _without_the_optional_function(monkeypatch)
        yield fastbp._jit.Entry(fastbp._jit.cpu_jit(cache=False)(_optional_caller)), np.zeros(2), started


def _after_a_poll_interval():
    import time

    time.sleep(fastbp._jit.POLL_SECONDS)  # Entry looks for optional functions at most this often


def test_an_optional_function_is_left_to_the_helper_and_picked_up_by_a_later_call(monkeypatch):
    """A session does not compile an optional function its driver tests with is_compiled: the helper gets it
    (last), the driver runs without it, and a later call loads it once the helper has marked it done."""
    from numba import types

    with _a_driver_with_an_optional_callee(monkeypatch) as (entry, a, started):
        entry(a)
        assert a[0] == 1.0 and _optional_by_slot._results == {}  # ran without it; not compiled here
        assert [helper.leaves for helper in started] == [[_optional_by_slot]]
        assert fastbp._jit._optional_pending == [(_optional_by_slot, types.float64, started[0])]
        entry(a)  # the helper is not done: still without it
        assert a[0] == 2.0
        open(fastbp._jit.done_marker(started[0].folder, _optional_by_slot, types.float64), "wb").close()
        _after_a_poll_interval()
        entry(a)  # loaded (compiled here: cache=False stands in for the disk cache), then called
        assert a[0] == 12.0 and fastbp._jit._optional_pending == []


def test_an_optional_function_whose_helper_died_is_compiled_by_a_later_call(monkeypatch):
    with _a_driver_with_an_optional_callee(monkeypatch) as (entry, a, started):
        entry(a)
        assert a[0] == 1.0
        started[0].process.kill()
        started[0].process.wait()
        _after_a_poll_interval()
        entry(a)
        assert a[0] == 11.0 and fastbp._jit._optional_pending == []


def test_a_forked_process_loads_an_optional_function_from_the_cache_and_never_compiles_it(monkeypatch):
    """A process forked while its parent's helper compiled an optional function (joblib's workers, say) inherits the
    pending entry: it cannot wait for that helper (not its child), so it loads the function once the disk cache
    has it, and runs without it until then instead of compiling it."""
    from numba import types

    with _a_driver_with_an_optional_callee(monkeypatch) as (entry, a, started):
        entry(a)
        assert fastbp._jit._optional_pending == [(_optional_by_slot, types.float64, started[0])]
        monkeypatch.setattr(started[0], "owner", -1)  # as seen from a forked child
        started[0].process.kill()
        started[0].process.wait()  # gone: a parent's helper would look gone from the child too
        _after_a_poll_interval()
        entry(a)
        assert a[0] == 2.0 and _optional_by_slot._results == {}  # not compiled here
        monkeypatch.setattr(_optional_by_slot, "in_disk_cache", lambda dtype: True)  # the parent's helper wrote it
        _after_a_poll_interval()
        entry(a)  # loaded (compiled here: cache=False stands in for the disk cache), then called
        assert a[0] == 12.0 and fastbp._jit._optional_pending == []


@pytest.mark.parametrize("wants_it", [True, False], ids=["wanted", "never wanted"])
def test_without_a_helper_an_optional_function_is_compiled_once_a_call_wants_it(monkeypatch, wants_it):
    """One usable CPU or FASTBP_COMPILE_PROCESSES=1: no helper compiles it, so this process does, at the first call
    after a caller found its slot empty where it would have called it; a process that never needs it (a small
    network's products) never compiles it."""
    from numba import types

    _without_the_optional_function(monkeypatch)
    monkeypatch.setattr(fastbp._jit, "_helper_allowed", lambda: False)
    entry = fastbp._jit.Entry(fastbp._jit.cpu_jit(cache=False)(_optional_caller))
    a = np.zeros(2 if wants_it else 1)
    entry(a)
    assert a[0] == 1.0 and _optional_by_slot._results == {}
    assert fastbp._jit._optional_pending == [(_optional_by_slot, types.float64, None)]
    assert _optional_by_slot.wanted(types.float64) == wants_it
    _after_a_poll_interval()
    entry(a)
    if wants_it:  # compiled before this call, which calls it
        assert a[0] == 11.0 and fastbp._jit._optional_pending == []
    else:
        assert a[0] == 2.0 and _optional_by_slot._results == {} and len(fastbp._jit._optional_pending) == 1


def test_without_a_helper_an_optional_function_is_compiled_once_the_work_done_without_it_adds_up(monkeypatch):
    """The product engine's tiled worker is worth its compile once the plain products a process ran add up to
    gemm.TILES_PAY_AFTER multiply-adds (its wanted_after): each call that finds the slot empty adds its work."""
    from numba import types

    _without_the_optional_function(monkeypatch)
    monkeypatch.setattr(fastbp._jit, "_helper_allowed", lambda: False)
    monkeypatch.setattr(_optional_by_slot, "wanted_after", 5)
    entry = fastbp._jit.Entry(fastbp._jit.cpu_jit(cache=False)(_optional_caller))
    a = np.zeros(2)  # 2 a call
    for calls in (1, 2):
        entry(a)
        _after_a_poll_interval()
        assert a[0] == calls and not _optional_by_slot.wanted(types.float64)
    entry(a)  # 6 >= 5: wanted
    assert a[0] == 3.0 and _optional_by_slot.wanted(types.float64) and _optional_by_slot._results == {}
    _after_a_poll_interval()
    entry(a)  # compiled before this call, which calls it
    assert a[0] == 13.0 and fastbp._jit._optional_pending == []
    from fastbp.kernels import gemm

    assert gemm.task_by_symbol.wanted_after == gemm.TILES_PAY_AFTER and gemm.parallel_tasks.wanted_after == 1


def test_precompile_compiles_an_optional_function_with_its_driver(monkeypatch):
    # fastbp.precompile compiles in sessions without helpers (one_compile_process): it fills the cache with
    # everything a later process may load, the optional functions included
    _without_the_optional_function(monkeypatch)
    a = np.zeros(2)
    with fastbp._jit.one_compile_process():
        fastbp._jit.Entry(fastbp._jit.cpu_jit(cache=False)(_optional_caller))(a)
    assert a[0] == 10.0 and fastbp._jit._optional_pending == []


def _on_request_caller(a):
    # reaches its callee only for some arguments (the product engine: the sigmoid and tanh of some networks)
    if a.shape[0] >= 2:
        _on_request_by_slot(a)
    else:
        a[0] += 1.0


def _on_request_leaf(a):
    a[0] += 10.0


_on_request_by_slot = fastbp._jit.SeparatelyCompiled(fastbp._jit.cpu_jit(cache=False)(_on_request_leaf),
                                                     _leaf_signature, on_request=True)


def _without_the_on_request_function(monkeypatch):
    from numba import types

    _on_request_by_slot.declare(types.float64)
    monkeypatch.setattr(_on_request_by_slot._slots[types.float64], "value", None)
    monkeypatch.setattr(_on_request_by_slot, "_results", {})
    monkeypatch.setattr(_on_request_by_slot, "in_disk_cache", lambda dtype: False)


def test_a_session_leaves_a_function_filled_on_request_to_its_caller(monkeypatch):
    """A compile session neither compiles nor hands to its helper a function filled on request: a call that
    reaches it through the empty slot raises, one that does not runs; once the caller fills it (fill_now), it
    runs. Nothing reaches a helper's list (the drivers' leaves exclude it: a relu network's never compiles it)."""
    from numba import types

    with _sleeping_helpers(monkeypatch) as started:
        _without_the_on_request_function(monkeypatch)
        entry = fastbp._jit.Entry(fastbp._jit.cpu_jit(cache=False)(_on_request_caller))
        small, large = np.zeros(1), np.zeros(2)
        entry(small)
        assert small[0] == 1.0 and _on_request_by_slot._results == {}
        assert all(_on_request_by_slot not in helper.leaves for helper in started)
        assert fastbp._jit._leaves(_on_request_caller) == [] and fastbp._jit._optional_callees(_on_request_caller) == []
        with pytest.raises(RuntimeError, match="was called before it was compiled"):
            entry(large)
        assert large[0] == 0.0
        fastbp._jit.fill_now(_on_request_by_slot, types.float64)  # no helper has it: compiled here
        entry(large)
        assert large[0] == 10.0 and types.float64 in _on_request_by_slot._results


def test_fill_now_takes_a_function_filled_on_request_from_the_helpers_list(monkeypatch):
    # On the list of this process's helper (the CPU backend's prefetch puts it first): claimed here where the helper
    # has not started it, as a session takes a leaf
    from numba import types

    with _sleeping_helpers(monkeypatch) as started:
        _without_the_on_request_function(monkeypatch)
        fastbp._jit.prefetch([], types.float64, first=[_on_request_by_slot])
        assert [helper.leaves for helper in started] == [[_on_request_by_slot]]
        fastbp._jit.fill_now(_on_request_by_slot, types.float64)
        assert os.path.exists(os.path.join(started[0].folder, _on_request_by_slot.symbol(types.float64)))  # claimed
        assert types.float64 in _on_request_by_slot._results


def test_outside_a_session_a_function_filled_on_request_is_compiled_with_its_caller(monkeypatch):
    # A caller compiled outside a compile session (a test's, a benchmark's, a user's direct call) compiles it at
    # once, as any other; a helper never does unless it is on its list
    _without_the_on_request_function(monkeypatch)
    a = np.zeros(2)
    fastbp._jit.cpu_jit(cache=False)(_on_request_caller)(a)
    assert a[0] == 10.0
    with pytest.raises(ValueError, match="not both"):
        fastbp._jit.SeparatelyCompiled(_on_request_by_slot.dispatcher, _leaf_signature, optional=True,
                                       on_request=True)


def test_is_compiled_takes_only_an_optional_function():
    from numba.core.errors import TypingError

    def tests_a_required_one(a):
        return fastbp._jit.is_compiled(_leaf_by_slot, a, 1)

    with pytest.raises(TypingError, match="is_compiled takes an optional SeparatelyCompiled function"):
        fastbp._jit.cpu_jit(cache=False)(tests_a_required_one)(np.zeros(1))


def test_a_finished_helper_that_is_still_exiting_loses_its_folder_at_exit(monkeypatch):
    """At this process's exit, a helper whose leaves are all done but whose process has not exited yet (here:
    asleep for half a second) is waited for, and its claim folder removed (neither side removed it before)."""
    from numba import types

    started = stand_in_helpers(monkeypatch, "import time; time.sleep(0.5)")
    monkeypatch.setattr(fastbp._jit, "_retired", [])
    helper = fastbp._jit._helper_for(types.float64, [fastbp._jit.cpu_jit(cache=False)(_caller)])
    try:
        open(fastbp._jit.done_marker(helper.folder, _leaf_by_slot, types.float64), "wb").close()
        fastbp._jit._forget_helpers()
        assert started == [helper] and helper.process.poll() == 0 and not os.path.exists(helper.folder)
    finally:
        helper.process.kill()
        helper.process.wait()
        helper.close()


def test_a_helper_inherited_through_fork_is_left_to_its_parent(monkeypatch, tmp_path):
    """A forked child sees its parent's helper object (poll() there cannot tell a running helper from a finished
    one): it drops it without removing the parent's claim folder."""
    from numba import types

    class Inherited:
        owner = os.getpid() + 1  # another process's
        folder = str(tmp_path)
        leaves = [_leaf_by_slot]
        process = subprocess.Popen([sys.executable, "-c", "pass"])

    Inherited.process.wait()
    monkeypatch.setattr(fastbp._jit, "_helpers", {types.float32: Inherited()})
    monkeypatch.setattr(fastbp._jit, "_helper_allowed", lambda: False)
    assert fastbp._jit._helper_for(types.float32, []) is None
    assert fastbp._jit._helpers == {} and tmp_path.exists()


def test_a_ctrl_c_to_the_script_lets_its_helper_finish_and_clean_up(tmp_path):
    """Ctrl-C reaches the whole process group of a script: its compile helper, in a session of its own, finishes
    the function it is compiling (into the disk cache), then sees that the script has gone and removes its claim
    folder (before, the interrupt stopped it mid-compile and the folder stayed in the temporary directory)."""
    import signal
    import time

    script = textwrap.dedent("""
        import signal, time
        from numba import types
        import fastbp._jit
        from fastbp.kernels import cpu
        # Ctrl-C stops a script, as in a terminal, also where the tests were started as a background job (whose
        # processes inherit an ignored SIGINT: this test then waited its full minute)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        helper = fastbp._jit._Helper([cpu.optimizer_step, cpu.loss_block], types.float64)
        print(helper.folder, flush=True)
        time.sleep(120)
    """)
    cache = tmp_path / "cache"
    script_process = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, NUMBA_CACHE_DIR=str(cache)),
                                      stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        folder = script_process.stdout.readline().strip()
        claim = os.path.join(folder, cpu_kernels.optimizer_step.symbol("float64"))
        deadline = time.monotonic() + 120
        while not os.path.exists(claim) and time.monotonic() < deadline:  # the helper has started compiling
            time.sleep(0.005)
        assert os.path.exists(claim)
        os.killpg(script_process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        script_process.wait(timeout=60)
    finally:
        if script_process.poll() is None:
            script_process.kill()
    deadline = time.monotonic() + 120
    while os.path.exists(folder) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(folder)
    # it finished what it had started (the optimizer step's entry is in the cache), and nothing after it
    assert list(cache.rglob("*_optimizer_step*.nbi")) and not list(cache.rglob("*loss_grad*.nbi"))


def test_a_helper_whose_parent_is_exiting_compiles_nothing_and_cleans_up(tmp_path):
    """A helper whose parent has written the exit marker (its atexit hook ran, but the process is still shutting
    down, so its pid is still the helper's parent: here, this test process) compiles nothing more and removes the
    claim folder. Before the marker, such a helper left the folder in the temporary directory (every cold run of
    examples/demo.py left one)."""
    _helper_with_a_gone_parent_compiles_nothing(tmp_path, parent=os.getpid(), exit_marked=True)


def test_exiting_tells_a_helper_still_compiling_to_clean_up(monkeypatch):
    """At this process's exit, a helper still compiling (here: asleep, its leaf not done) is not waited for; its
    claim folder gets the exit marker, so that the helper removes it when it stops."""
    from numba import types

    started = stand_in_helpers(monkeypatch, "import time; time.sleep(60)")
    monkeypatch.setattr(fastbp._jit, "_retired", [])
    helper = fastbp._jit._helper_for(types.float64, [fastbp._jit.cpu_jit(cache=False)(_caller)])
    try:
        fastbp._jit._forget_helpers()
        assert started == [helper] and helper.process.poll() is None  # not waited for
        assert os.path.exists(fastbp._jit.exit_marker(helper.folder))
    finally:
        helper.process.kill()
        helper.process.wait()
        helper.close()
    assert not os.path.exists(helper.folder)


def test_a_helper_whose_parent_has_exited_compiles_nothing(tmp_path):
    """A helper started for a script that has ended (here: told that its parent is pid 1, which it is not)
    compiles nothing more, and it removes the claim folder the parent could not."""
    _helper_with_a_gone_parent_compiles_nothing(tmp_path, parent=1, exit_marked=False)


def _helper_with_a_gone_parent_compiles_nothing(tmp_path, parent, exit_marked):
    # the real helper, given one leaf, parent pid ``parent`` and (with exit_marked) the exit marker: it must
    # compile nothing into its disk cache and remove its claim folder
    folder = tmp_path / "claims"
    folder.mkdir()
    if exit_marked:
        open(fastbp._jit.exit_marker(str(folder)), "wb").close()
    # a helper's environment, as fastbp._jit gives it (without the worker variable, its ``import fastbp`` would start
    # a standby helper into the cold cache where the tests run without pytest-xdist)
    env = fastbp._jit.helper_environment(NUMBA_CACHE_DIR=str(tmp_path / "cache"), **{fastbp._jit.WORKER_VARIABLE: "1"})
    result = subprocess.run([sys.executable, "-m", "fastbp._compile_worker", str(folder), str(parent), "float64",
                             "fastbp.kernels.cpu:optimizer_step"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert not folder.exists()
    assert not (tmp_path / "cache").exists()  # nothing compiled into the disk cache


def test_cached_code_of_another_declaration_is_refused_before_it_loads():
    # What a call by symbol leaves in its library's reload_init (numba runs it before loading the machine code from
    # a cache): it fills the callee's slot, and refuses code compiled against another declaration of the callee
    # (a user's cache, which numba keys by the user's file only, after a fastbp upgrade) instead of letting it pass
    # its arguments as they were declared then.
    from numba import types

    from fastbp.kernels import gemm

    fill = fastbp._jit._FillOnLoad("fastbp.kernels.gemm:product", "float32", gemm.product.declared(types.float32))
    fill()
    assert gemm.product._slots[types.float32].value
    assert fill == fastbp._jit._FillOnLoad(*(pickle.loads(pickle.dumps(fill)).__dict__[k]
                                             for k in ("reference", "dtype_name", "declared")))
    stale = fastbp._jit._FillOnLoad("fastbp.kernels.gemm:product", "float32", "(int64, float32) -> none")
    gone = fastbp._jit._FillOnLoad("fastbp.kernels.gemm:no_such_function", "float32", "(int64,) -> none")
    older = fastbp._jit._FillOnLoad.__new__(fastbp._jit._FillOnLoad)  # as unpickled from one without declarations
    older.reference, older.dtype_name = "fastbp.kernels.gemm:product", "float32"
    for refused in (stale, gone, older):
        with pytest.raises(RuntimeError, match="compiled with another version of fastbp"):
            refused()


def test_every_slot_is_known_to_the_loader_from_the_start():
    # Declared (empty) when the object is made: code that calls a slot nothing filled raises RuntimeError at the
    # call; a symbol unknown to LLVM's loader would be bound to address 0 and crash the process.
    from numba import types

    def _declared_early(a):
        a[0] = 1.0

    early = fastbp._jit.SeparatelyCompiled(fastbp._jit.cpu_jit(cache=False)(_declared_early), _leaf_signature)
    assert set(early._slots) == {types.float32, types.float64}
    assert all(slot.value is None for slot in early._slots.values())
