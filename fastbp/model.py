"""The MLP: layer sizes, activations and the parameters (plain numpy arrays the user may read and edit)."""
from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np

from . import checkpoint, interop
from ._validation import check_choice, check_dtype, check_int
from .kernels.pointwise import ACTIVATIONS, LEAKY_RELU_SLOPE
from .layout import Layout

# Names of activations fastbp does not have, whose closest spelling would mislead ("gelu" is spelled like relu).
_OWN = "the hidden activations are 'relu', 'leaky_relu', 'tanh', 'sigmoid' and 'identity'"
ACTIVATION_HINTS = {name: f"fastbp has no {name}; {_OWN}." for name in ("gelu", "elu", "selu", "silu", "swish",
                                                                         "mish", "softplus", "relu6", "prelu")}
ACTIVATION_HINTS |= {name: f"{name} is an output transform, set by the Trainer's loss (softmax: "
                           f"'softmax_cross_entropy', sigmoid: 'binary_cross_entropy'); {_OWN}."
                     for name in ("softmax", "log_softmax")}
ACTIVATION_HINTS["linear"] = "Did you mean 'identity'?"
ACTIVATION_HINTS["none"] = "Did you mean 'identity'?"

# What _attach rebuilds; never pickled (see MLP.__getstate__).
_PARAMETER_ATTRIBUTES = ("_flat", "_weight_views", "_bias_views", "weights", "biases")


def _field(state: dict, key: str):
    if not isinstance(state, dict) or key not in state:
        raise ValueError(f"the state lacks the field {key!r}")
    return state[key]


class MLP:
    """A dense feed-forward network: ``Z_l = A_{l-1} @ W_l + b_l``, ``A_l = act_l(Z_l)``.

    Parameters
    ----------
    sizes : sequence of int
        Layer widths, input first and output last, e.g. ``[64, 128, 10]`` (at least two).
    activation : str or sequence of str
        Hidden-layer activation: one name for all hidden layers, or one per hidden layer. Names:
        ``sigmoid``, ``relu``, ``tanh``, ``identity``, ``leaky_relu`` (slope 0.01). The output layer has
        no activation of its own: the loss fuses its output transform (see :class:`fastbp.Trainer`).
    dtype : numpy.float32 (default) or numpy.float64
    seed : int or None
        Seed of the initialisation: He normal (std ``gain / sqrt(fan_in)``) before relu / leaky_relu,
        Glorot uniform (``U(-a, a)``, ``a = sqrt(6 / (fan_in + fan_out))``) before sigmoid, tanh, identity
        and for the output layer; biases start at zero.

    Attributes
    ----------
    weights : list of ndarray, ``weights[l]`` of shape ``(sizes[l], sizes[l + 1])``
    biases : list of ndarray, ``biases[l]`` of shape ``(sizes[l + 1],)``
        Plain numpy arrays (views of one flat parameter vector): read or overwrite them in place; every
        trainer call starts from their current values and leaves its result in them. An array may also be
        replaced by another of the same shape and dtype; it then receives the results instead.

    Examples
    --------
    >>> import numpy as np, fastbp
    >>> model = fastbp.MLP([64, 128, 10], activation="relu", seed=0)
    >>> [w.shape for w in model.weights]
    [(64, 128), (128, 10)]
    """

    def __init__(self, sizes: Sequence[int], activation: str | Sequence[str] = "relu", dtype=np.float32,
                 seed: int | None = None):
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) and not isinstance(sizes, np.ndarray):
            raise TypeError(f"sizes must be a sequence of layer widths like [64, 128, 10]; got {sizes!r}")
        sizes = [check_int(f"sizes[{i}]", s, minimum=1) for i, s in enumerate(sizes)]
        if len(sizes) < 2:
            raise ValueError(f"sizes needs at least two layers (input and output); got {sizes}")
        n_hidden = len(sizes) - 2
        if isinstance(activation, str):
            check_choice("activation", activation, ACTIVATIONS, hints=ACTIVATION_HINTS)
            if n_hidden == 0 and activation != "relu":
                raise ValueError(f"activation={activation!r} has no effect: MLP({sizes}) has no hidden layer, and the "
                                 "output's transform comes from the Trainer's loss. Leave activation out (or pass [])")
            activations = [activation] * n_hidden
        elif isinstance(activation, Sequence):
            activations = list(activation)
            if len(activations) != n_hidden:
                raise ValueError(f"activation must be one name or a list with one name per hidden layer "
                                 f"({n_hidden}); got {len(activations)} names")
        else:
            raise TypeError(f"activation must be a name or a list of names; got {type(activation).__name__}")
        self.activations = [check_choice(f"activation[{i}]" if not isinstance(activation, str) else "activation",
                                         a, ACTIVATIONS, hints=ACTIVATION_HINTS) for i, a in enumerate(activations)]
        self.dtype = check_dtype("dtype", dtype)
        self.seed = check_int("seed", seed, minimum=0, allow_none=True)
        self.sizes = sizes
        self.layout = Layout.from_sizes(sizes)
        self._attach(np.empty(self.layout.n_params, dtype=self.dtype))
        rng = np.random.default_rng(seed)
        for layer in range(len(sizes) - 1):
            fan_in, fan_out = sizes[layer], sizes[layer + 1]
            act = self.activations[layer] if layer < n_hidden else "identity"
            if act == "relu" or act == "leaky_relu":
                slope = 0.0 if act == "relu" else LEAKY_RELU_SLOPE
                std = np.sqrt(2.0 / (1.0 + slope * slope)) / np.sqrt(fan_in)
                w = rng.normal(0.0, std, size=(fan_in, fan_out))
            else:
                bound = np.sqrt(6.0 / (fan_in + fan_out))
                w = rng.uniform(-bound, bound, size=(fan_in, fan_out))
            self.weights[layer][...] = w.astype(self.dtype)
            self.biases[layer][...] = 0

    # -- where the parameters live --------------------------------------------------------------------------------
    # All parameters live in ONE flat vector (fastbp.layout: W0, b0, W1, b1, ...), and weights[l] / biases[l] are
    # views of it. Trainers train that vector in place (the CPU) or copy it to and from their device, so a call
    # copies nothing on the CPU and the user's in-place edits (model.weights[l][...] = values) are seen at once.
    # A user may also REPLACE an array (model.weights[l] = new_array): such an array is copied into the vector
    # before each call and receives the results after it (_training_vector / _after_training).
    def _attach(self, flat: np.ndarray) -> None:
        """Make ``flat`` (P,) the parameter memory: weights and biases become views of it."""
        self._flat = flat
        views = [self.layout.views(flat, layer) for layer in range(self.layout.n_layers)]
        self._weight_views = [w for w, _ in views]
        self._bias_views = [b for _, b in views]
        self.weights = list(self._weight_views)
        self.biases = list(self._bias_views)

    def _replaced(self) -> list:
        """(kind, layer, array, view) for every parameter array the user replaced by an array of their own
        (none, usually: that case costs one identity test per array)."""
        if all(map(operator.is_, self.weights, self._weight_views)) and \
                all(map(operator.is_, self.biases, self._bias_views)):
            return []
        return [(kind, layer, arr, view)
                for kind, arrays, views in (("weights", self.weights, self._weight_views),
                                            ("biases", self.biases, self._bias_views))
                for layer, (arr, view) in enumerate(zip(arrays, views)) if arr is not view]

    def _training_vector(self) -> np.ndarray:
        """The flat vector (P,) trainers work on, holding the current values of every parameter (replaced
        arrays are copied in). Call check_parameters first."""
        for _, _, arr, view in self._replaced():
            view[...] = arr
        return self._flat

    def _after_training(self) -> None:
        """After a trainer wrote the flat vector: give replaced arrays their results (views already have them)."""
        for _, _, arr, view in self._replaced():
            arr[...] = view

    @property
    def n_params(self) -> int:
        """Number of trainable numbers (weights and biases)."""
        return self.layout.n_params

    def activation_codes(self) -> np.ndarray:
        """One code per layer: the hidden activations, then identity for the output (the loss transforms it)."""
        return np.array([ACTIVATIONS[a] for a in self.activations] + [ACTIVATIONS["identity"]], dtype=np.int64)

    def check_parameters(self, finite: bool = True) -> None:
        """Raise if a user replaced a weight or bias with something the trainer cannot use: the wrong type,
        shape or dtype, a read-only array, two parameters sharing memory, or (``finite``) NaN/inf values.

        The model's own arrays (views of its flat vector) always have the right shape, dtype and memory, so
        only replaced arrays are inspected one by one; finiteness is checked over all parameters."""
        n_layers = len(self.sizes) - 1
        for kind, arrays in (("weights", self.weights), ("biases", self.biases)):
            if not isinstance(arrays, (list, tuple)) or len(arrays) != n_layers:
                got = f"{len(arrays)} arrays" if isinstance(arrays, (list, tuple)) else type(arrays).__name__
                raise ValueError(f"model.{kind} must be a list of {n_layers} arrays; got {got}")
        replaced = self._replaced()
        for index, (kind, layer, arr, _) in enumerate(replaced):
            shape = (self.sizes[layer], self.sizes[layer + 1]) if kind == "weights" else (self.sizes[layer + 1],)
            name = f"model.{kind}[{layer}]"
            if not isinstance(arr, np.ndarray) or arr.shape != shape:
                got = getattr(arr, "shape", type(arr).__name__)
                raise ValueError(f"{name} must be an array of shape {shape}; got {got}")
            if arr.dtype != self.dtype:
                raise TypeError(f"{name} must have the model's dtype {self.dtype.name}; got {arr.dtype} "
                                f"(assign in place, {name}[...] = values, or use .astype({self.dtype.name}))")
            if not arr.flags.writeable:
                raise ValueError(f"{name} is read-only; the trainer writes its results into it (use a copy)")
            others = [(f"model.{k}[{l}]", a) for k, l, a, _ in replaced[:index]]
            others += [(f"model.{k}[{l}]", v) for k, views in (("weights", self._weight_views),
                                                                ("biases", self._bias_views))
                       for l, v in enumerate(views) if getattr(self, k)[l] is v]
            for other_name, other in others:
                if np.shares_memory(arr, other):
                    raise ValueError(f"{name} shares memory with {other_name}; every parameter needs its "
                                     "own array (use a copy)")
        if finite:
            self._check_finite(replaced)

    def _check_finite(self, replaced) -> None:
        # One float sum answers for all the model's own arrays at once: NaN or inf anywhere makes it non-finite
        # (a sum of finite values can overflow, so a non-finite sum is then checked element by element).
        with np.errstate(over="ignore", invalid="ignore"):
            total = self._flat.sum() + sum(arr.sum() for _, _, arr, _ in replaced)
        if np.isfinite(total):
            return
        for kind, arrays in (("weights", self.weights), ("biases", self.biases)):
            for layer, arr in enumerate(arrays):
                if not np.isfinite(arr).all():
                    raise ValueError(f"model.{kind}[{layer}] contains NaN or inf")

    def flat_parameters(self, out: np.ndarray | None = None) -> np.ndarray:
        """All parameters in one new flat vector (W0, b0, W1, b1, ...), in the model's dtype (or in ``out``)."""
        if out is None:
            out = np.empty(self.n_params, dtype=self.dtype)
        return self.layout.pack(self.weights, self.biases, out)

    def set_flat_parameters(self, flat: np.ndarray) -> None:
        """Copy a flat vector into the existing weight and bias arrays, in place."""
        self.layout.unpack(flat, self.weights, self.biases)

    def copy(self) -> "MLP":
        """An independent model with the same architecture and a copy of the parameters."""
        clone = object.__new__(MLP)
        clone.__dict__.update(self.__dict__)
        clone.sizes = list(self.sizes)
        clone.activations = list(self.activations)
        clone._attach(self.flat_parameters())
        return clone

    # Pickling keeps the parameter values, not which arrays the user had replaced (they cannot travel anyway):
    # an unpickled model has its own flat vector and views again. np.array also makes a read-only buffer (a
    # joblib memmap) writable.
    def __getstate__(self):
        state = {k: v for k, v in self.__dict__.items() if k not in _PARAMETER_ATTRIBUTES}
        state["_flat"] = self.flat_parameters()
        return state

    def __setstate__(self, state):
        flat = np.array(state.pop("_flat"))
        self.__dict__.update(state)
        self._attach(flat)

    # -- state ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything that defines the model, as plain values and copies of the arrays:
        ``{"sizes", "activations", "dtype", "seed", "weights": [(n_in, n_out) ...], "biases": [(n_out,) ...]}``.

        :meth:`MLP.from_state_dict` rebuilds the model; :meth:`load_state_dict` loads the parameters into a
        model of the same architecture. ``fastbp.checkpoint`` writes this dict to a file."""
        return {"sizes": [int(s) for s in self.sizes], "activations": list(self.activations),
                "dtype": self.dtype.name, "seed": self.seed,
                "weights": [np.array(w) for w in self.weights], "biases": [np.array(b) for b in self.biases]}

    def load_state_dict(self, state: dict) -> None:
        """Load the parameters of a :meth:`state_dict` of the same architecture, in place. Everything is
        checked first (architecture, each array's shape and dtype, finite values); a rejected state changes
        nothing."""
        for key in ("sizes", "activations", "dtype"):
            value = _field(state, key)
            mine = self.dtype.name if key == "dtype" else getattr(self, key)
            if value != mine:
                raise ValueError(f"the state's {key} {value!r} differ from this model's {mine!r}")
        arrays = {}
        for kind in ("weights", "biases"):
            given = _field(state, kind)
            if not isinstance(given, (list, tuple)) or len(given) != self.layout.n_layers:
                raise ValueError(f"{kind} must be a list of {self.layout.n_layers} arrays; got {given!r:.80}")
            for layer, arr in enumerate(given):
                shape = getattr(self, kind)[layer].shape
                arr = np.asarray(arr)
                if arr.shape != shape or arr.dtype != self.dtype:
                    raise ValueError(f"{kind}[{layer}] must have shape {shape} and dtype {self.dtype.name}; "
                                     f"got shape {arr.shape} and dtype {arr.dtype}")
                if not np.isfinite(arr).all():
                    raise ValueError(f"{kind}[{layer}] contains NaN or inf")
                arrays[kind, layer] = arr
        for (kind, layer), arr in arrays.items():
            getattr(self, kind)[layer][...] = arr

    @classmethod
    def from_state_dict(cls, state: dict) -> "MLP":
        """A new model built from a :meth:`state_dict` (architecture, seed and parameters)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from MLP.state_dict(); got {type(state).__name__}")
        sizes, activations = _field(state, "sizes"), _field(state, "activations")
        if not isinstance(sizes, list) or not isinstance(activations, list):
            raise ValueError("sizes and activations must be lists")
        dtype = check_choice("dtype", _field(state, "dtype"), ("float32", "float64"))
        model = cls(sizes, activation=activations, dtype=np.dtype(dtype), seed=_field(state, "seed"))
        model.load_state_dict(state)
        return model

    # -- files -----------------------------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the architecture and parameters to one ``.npz`` file at ``path`` (atomically, no pickle).

        See :mod:`fastbp.checkpoint` for the format; :meth:`MLP.load` reads it back bit for bit.

        >>> import os, tempfile, numpy as np, fastbp
        >>> model = fastbp.MLP([3, 4, 2], seed=0)
        >>> path = os.path.join(tempfile.mkdtemp(), "model.npz")
        >>> model.save(path)
        >>> bool(np.array_equal(fastbp.MLP.load(path).weights[0], model.weights[0]))
        True
        """
        self.check_parameters()
        checkpoint.write(path, "model", {"model": self.state_dict()})

    @classmethod
    def load(cls, path) -> "MLP":
        """Read a model written by :meth:`MLP.save` (or the model inside a :meth:`Trainer.save` file)."""
        _, state = checkpoint.read(path)
        with checkpoint.reported_as_checkpoint_error("model"):
            return cls.from_state_dict(state["model"])

    # -- other frameworks (fastbp.interop) ------------------------------------------------------------------------
    def save_safetensors(self, path, *, metadata=None) -> None:
        """Write the parameters to ``path`` as a safetensors file that PyTorch loads into the matching
        ``nn.Sequential(Linear, act, ..., Linear)``: ``"0.weight"`` of shape (out, in), ``"0.bias"``, ``"2.weight"``,
        ... Atomic; the architecture goes in the file's metadata. See :func:`fastbp.interop.write_safetensors`.

        >>> import os, tempfile, fastbp
        >>> model = fastbp.MLP([3, 4, 2], activation="tanh", seed=0)
        >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
        >>> model.save_safetensors(path)
        >>> fastbp.MLP.load_safetensors(path).activations
        ['tanh']
        """
        self.check_parameters()  # wrong shapes, dtypes or NaN/inf never reach a file
        interop.write_safetensors(path, self.state_dict(), metadata=metadata)

    @classmethod
    def load_safetensors(cls, path, activation=None, *, dtype=None) -> "MLP":
        """Read a safetensors file holding an ``nn.Sequential`` of Linear layers: one written by
        :meth:`save_safetensors` (architecture stored), or by ``safetensors.torch.save_file(module.state_dict())``
        (pass ``activation=``). See :func:`fastbp.interop.read_safetensors`."""
        return cls.from_state_dict(interop.read_safetensors(path, activation, dtype=dtype))

    @classmethod
    def from_torch(cls, module, *, dtype=None) -> "MLP":
        """The model of a ``torch.nn.Sequential`` of ``nn.Linear`` and activation modules (weights copied).
        See :func:`fastbp.interop.state_from_torch`."""
        return cls.from_state_dict(interop.state_from_torch(module, dtype=dtype))

    def to_torch(self):
        """A ``torch.nn.Sequential`` computing this network, with copies of the weights in the model's dtype
        (Linear ``l`` at index ``2 l``). See :func:`fastbp.interop.state_to_torch`."""
        self.check_parameters()
        return interop.state_to_torch(self.state_dict())

    def __repr__(self) -> str:
        acts = self.activations[0] if len(set(self.activations)) == 1 else self.activations
        return f"MLP({self.sizes}, activation={acts!r}, dtype={self.dtype.name}, n_params={self.n_params})"
