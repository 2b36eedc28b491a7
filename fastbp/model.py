"""The MLP: layer sizes, activations and the parameters (plain numpy arrays the user may read and edit)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._validation import check_choice, check_dtype, check_int
from .kernels.pointwise import ACTIVATIONS, LEAKY_RELU_SLOPE
from .layout import Layout


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
        Plain numpy arrays: read or overwrite them in place; every trainer call starts from their
        current values and leaves its result in them.

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
            activations = [activation] * n_hidden
        elif isinstance(activation, Sequence):
            activations = list(activation)
            if len(activations) != n_hidden:
                raise ValueError(f"activation must be one name or a list with one name per hidden layer "
                                 f"({n_hidden}); got {len(activations)} names")
        else:
            raise TypeError(f"activation must be a name or a list of names; got {type(activation).__name__}")
        self.activations = [check_choice(f"activation[{i}]" if not isinstance(activation, str) else "activation",
                                         a, ACTIVATIONS) for i, a in enumerate(activations)]
        self.dtype = check_dtype("dtype", dtype)
        self.seed = check_int("seed", seed, minimum=0, allow_none=True)
        self.sizes = sizes
        self.layout = Layout.from_sizes(sizes)
        rng = np.random.default_rng(seed)
        self.weights = []
        self.biases = []
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
            self.weights.append(w.astype(self.dtype))
            self.biases.append(np.zeros(fan_out, dtype=self.dtype))

    @property
    def n_params(self) -> int:
        """Number of trainable numbers (weights and biases)."""
        return self.layout.n_params

    def activation_codes(self) -> np.ndarray:
        """One code per layer: the hidden activations, then identity for the output (the loss transforms it)."""
        return np.array([ACTIVATIONS[a] for a in self.activations] + [ACTIVATIONS["identity"]], dtype=np.int64)

    def check_parameters(self) -> None:
        """Raise if a user replaced a weight or bias with something the trainer cannot use: the wrong type,
        shape or dtype, a read-only array, two parameters sharing memory, or NaN/inf values."""
        arrays_seen = []
        for kind, arrays in (("weights", self.weights), ("biases", self.biases)):
            if not isinstance(arrays, (list, tuple)) or len(arrays) != len(self.sizes) - 1:
                got = f"{len(arrays)} arrays" if isinstance(arrays, (list, tuple)) else type(arrays).__name__
                raise ValueError(f"model.{kind} must be a list of {len(self.sizes) - 1} arrays; got {got}")
            for layer, arr in enumerate(arrays):
                shape = ((self.sizes[layer], self.sizes[layer + 1]) if kind == "weights"
                         else (self.sizes[layer + 1],))
                name = f"model.{kind}[{layer}]"
                if not isinstance(arr, np.ndarray) or arr.shape != shape:
                    got = getattr(arr, "shape", type(arr).__name__)
                    raise ValueError(f"{name} must be an array of shape {shape}; got {got}")
                if arr.dtype != self.dtype:
                    raise TypeError(f"{name} must have the model's dtype {self.dtype.name}; got {arr.dtype} "
                                    f"(assign in place, {name}[...] = values, or use .astype({self.dtype.name}))")
                if not arr.flags.writeable:
                    raise ValueError(f"{name} is read-only; the trainer writes its results into it (use a copy)")
                if not np.isfinite(arr).all():
                    raise ValueError(f"{name} contains NaN or inf")
                for other_name, other in arrays_seen:
                    if np.shares_memory(arr, other):
                        raise ValueError(f"{name} shares memory with {other_name}; every parameter needs its "
                                         "own array (use a copy)")
                arrays_seen.append((name, arr))

    def flat_parameters(self, out: np.ndarray | None = None) -> np.ndarray:
        """All parameters in one flat vector (W0, b0, W1, b1, ...), in the model's dtype."""
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
        clone.weights = [w.copy() for w in self.weights]
        clone.biases = [b.copy() for b in self.biases]
        return clone

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
        from .checkpoint import save_model

        save_model(self, path)

    @classmethod
    def load(cls, path) -> "MLP":
        """Read a model written by :meth:`MLP.save` (or the model inside a :meth:`Trainer.save` file)."""
        from .checkpoint import load_model

        return load_model(path)

    def __repr__(self) -> str:
        acts = self.activations[0] if len(set(self.activations)) == 1 else self.activations
        return f"MLP({self.sizes}, activation={acts!r}, dtype={self.dtype.name}, n_params={self.n_params})"
