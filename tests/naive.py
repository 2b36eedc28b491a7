"""The obviously-right reference: vectorised numpy, straight from the definitions, in float64.

Everything fastbp computes is compared against these functions. They follow PyTorch's definitions
(nn.MSELoss, nn.BCEWithLogitsLoss, nn.CrossEntropyLoss with reduction="mean"; optim.SGD, optim.Adam).
"""
import numpy as np

LEAKY_SLOPE = 0.01

ACTIVATIONS = {
    "identity": lambda z: z,
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "tanh": np.tanh,
    "relu": lambda z: np.maximum(z, 0.0),
    "leaky_relu": lambda z: np.where(z > 0, z, LEAKY_SLOPE * z),
}
# Derivatives with respect to z, evaluated at z (not from the output: an independent route).
DERIVATIVES = {
    "identity": lambda z: np.ones_like(z),
    "sigmoid": lambda z: ACTIVATIONS["sigmoid"](z) * (1.0 - ACTIVATIONS["sigmoid"](z)),
    "tanh": lambda z: 1.0 - np.tanh(z) ** 2,
    "relu": lambda z: (z > 0).astype(z.dtype),
    "leaky_relu": lambda z: np.where(z > 0, 1.0, LEAKY_SLOPE),
}


def forward(weights, biases, activations, X):
    """Pre-activations Z[l] and outputs A[l] of every layer (A[0] = X); the last layer is linear."""
    A, Z = [np.asarray(X, np.float64)], []
    for layer, (w, b) in enumerate(zip(weights, biases)):
        z = A[-1] @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
        Z.append(z)
        act = activations[layer] if layer < len(activations) else "identity"
        A.append(ACTIVATIONS[act](z))
    return Z, A


def log_softmax(z):
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def loss_and_dlogits(loss, z, Y):
    """Mean loss and d loss / d z for logits z (n, k) and targets Y (n, k) (one-hot for softmax CE)."""
    n, k = z.shape
    if loss == "mse":
        return np.mean((z - Y) ** 2), 2.0 * (z - Y) / (n * k)
    if loss == "binary_cross_entropy":
        q = 1.0 / (1.0 + np.exp(-z))
        # -[y log q + (1-y) log(1-q)] with log q = -log1p(exp(-z)), log(1-q) = -z - log1p(exp(-z))
        per = Y * np.logaddexp(0, -z) + (1 - Y) * (z + np.logaddexp(0, -z))
        return per.mean(), (q - Y) / (n * k)
    if loss == "softmax_cross_entropy":
        ls = log_softmax(z)
        p = np.exp(ls)
        return -(Y * ls).sum() / n, (p * Y.sum(axis=1, keepdims=True) - Y) / n
    if loss == "poisson":  # PyTorch's PoissonNLLLoss(log_input=True): exp(z) - y z
        return np.mean(np.exp(z) - Y * z), (np.exp(z) - Y) / (n * k)
    raise ValueError(loss)


def output_transform(loss, z):
    if loss == "mse":
        return z
    if loss == "binary_cross_entropy":
        return 1.0 / (1.0 + np.exp(-z))
    if loss == "poisson":
        return np.exp(z)
    return np.exp(log_softmax(z))


def loss_and_grads(weights, biases, activations, loss, X, Y):
    """Mean loss and its gradient for every weight and bias, by textbook backprop."""
    Z, A = forward(weights, biases, activations, X)
    value, delta = loss_and_dlogits(loss, Z[-1], np.asarray(Y, np.float64))
    dweights, dbiases = [None] * len(weights), [None] * len(weights)
    for layer in range(len(weights) - 1, -1, -1):
        dweights[layer] = A[layer].T @ delta
        dbiases[layer] = delta.sum(axis=0)
        if layer > 0:
            delta = (delta @ np.asarray(weights[layer], np.float64).T) * DERIVATIVES[activations[layer - 1]](Z[layer - 1])
    return value, dweights, dbiases


def one_hot(labels, k):
    Y = np.zeros((len(labels), k))
    Y[np.arange(len(labels)), labels] = 1.0
    return Y


def sgd_step(params, grads, state, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
    """torch.optim.SGD on a list of arrays; ``state`` is a dict kept between calls."""
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        g = g + weight_decay * p
        if momentum != 0:
            buf = g.copy() if i not in state else momentum * state[i] + (1 - dampening) * g
            state[i] = buf
            g = g + momentum * buf if nesterov else buf
        out.append(p - lr * g)
    return out


def adam_step(params, grads, state, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False):
    """torch.optim.Adam on a list of arrays (torch.optim.AdamW with ``decoupled=True``: the parameters shrink
    by ``1 - lr * weight_decay`` and the gradient is left alone); ``state`` is a dict kept between calls."""
    b1, b2 = betas
    t = state.get("t", 0) + 1
    state["t"] = t
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m = b1 * state.get(("m", i), 0.0) + (1 - b1) * g
        v = b2 * state.get(("v", i), 0.0) + (1 - b2) * g * g
        state[("m", i)], state[("v", i)] = m, v
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        out.append(p - lr * m_hat / (np.sqrt(v_hat) + eps))
    return out
