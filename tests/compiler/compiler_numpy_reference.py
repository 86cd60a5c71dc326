"""An independent numpy implementation of the layers the reference models use: forward, backward
by hand (textbook formulas, explicit loops over kernel offsets), and the torch.optim updates.

It shares no code with the compiler, so agreement between the two is evidence for both.
"""

from __future__ import annotations

import numpy as np


class Layer:
    params: tuple[str, ...] = ()

    def forward(self, x, p):
        raise NotImplementedError

    def backward(self, g, p, grads):
        raise NotImplementedError


class Linear(Layer):
    """y = x W^T + b (Gemm transB=1)."""

    def __init__(self, w, b):
        self.params = (w, b)

    def forward(self, x, p):
        self.x = x
        return x @ p[self.params[0]].T + p[self.params[1]]

    def backward(self, g, p, grads):
        grads[self.params[0]] = g.T @ self.x
        grads[self.params[1]] = g.sum(axis=0)
        return g @ p[self.params[0]]


class MatMulAdd(Layer):
    """y = x W + b with W stored [in, out] (torch's pre-transposed MatMul export)."""

    def __init__(self, w, b):
        self.params = (w, b)

    def forward(self, x, p):
        self.x = x
        return x @ p[self.params[0]] + p[self.params[1]]

    def backward(self, g, p, grads):
        grads[self.params[0]] = self.x.T @ g
        grads[self.params[1]] = g.sum(axis=0)
        return g @ p[self.params[0]].T


class Activation(Layer):
    def __init__(self, kind, alpha=0.01):
        self.kind, self.alpha = kind, alpha

    def forward(self, x, p):
        self.x = x
        if self.kind == "relu":
            self.y = np.maximum(x, 0)
        elif self.kind == "leaky_relu":
            self.y = np.where(x > 0, x, self.alpha * x)
        elif self.kind == "sigmoid":
            self.y = 1 / (1 + np.exp(-x))
        elif self.kind == "tanh":
            self.y = np.tanh(x)
        return self.y

    def backward(self, g, p, grads):
        if self.kind == "relu":
            return g * (self.x > 0)
        if self.kind == "leaky_relu":
            return g * np.where(self.x > 0, 1.0, self.alpha)
        if self.kind == "sigmoid":
            return g * self.y * (1 - self.y)
        return g * (1 - self.y**2)


class Conv2d(Layer):
    """Cross-correlation with stride, symmetric padding and groups, by loops over kernel offsets."""

    def __init__(self, w, b, stride=1, pad=0, groups=1):
        self.params = (w, b)
        self.stride, self.pad, self.groups = stride, pad, groups

    def forward(self, x, p):
        w, b = p[self.params[0]], p[self.params[1]]
        self.xp = np.pad(x, ((0, 0), (0, 0), (self.pad, self.pad), (self.pad, self.pad)))
        self.x_shape = x.shape
        n, c, h, wd = self.xp.shape
        m, cg, kh, kw = w.shape
        s = self.stride
        self.out_hw = ((h - kh) // s + 1, (wd - kw) // s + 1)
        ho, wo = self.out_hw
        mg = m // self.groups
        y = np.zeros((n, m, ho, wo))
        for gi in range(self.groups):
            xs = self.xp[:, gi * cg:(gi + 1) * cg]
            ws = w[gi * mg:(gi + 1) * mg]
            for i in range(kh):
                for j in range(kw):
                    patch = xs[:, :, i:i + s * ho:s, j:j + s * wo:s]  # n, cg, ho, wo
                    y[:, gi * mg:(gi + 1) * mg] += np.einsum("ncij,mc->nmij", patch, ws[:, :, i, j])
        return y + b.reshape(1, -1, 1, 1)

    def backward(self, g, p, grads):
        w = p[self.params[0]]
        m, cg, kh, kw = w.shape
        s = self.stride
        ho, wo = self.out_hw
        mg = m // self.groups
        dw = np.zeros_like(w)
        dxp = np.zeros_like(self.xp)
        for gi in range(self.groups):
            gs = g[:, gi * mg:(gi + 1) * mg]
            for i in range(kh):
                for j in range(kw):
                    patch = self.xp[:, gi * cg:(gi + 1) * cg, i:i + s * ho:s, j:j + s * wo:s]
                    dw[gi * mg:(gi + 1) * mg, :, i, j] = np.einsum("nmij,ncij->mc", gs, patch)
                    dxp[:, gi * cg:(gi + 1) * cg, i:i + s * ho:s, j:j + s * wo:s] += np.einsum(
                        "nmij,mc->ncij", gs, w[gi * mg:(gi + 1) * mg, :, i, j]
                    )
        grads[self.params[0]] = dw
        grads[self.params[1]] = g.sum(axis=(0, 2, 3))
        h, wd = self.x_shape[2:]
        return dxp[:, :, self.pad:self.pad + h, self.pad:self.pad + wd]


class Pool2d(Layer):
    """k x k pooling with stride k, floor mode: max (first maximum wins) or average."""

    def __init__(self, kind, k=2):
        self.kind, self.k = kind, k

    def forward(self, x, p):
        k = self.k
        n, c, h, w = x.shape
        self.x_shape = x.shape
        ho, wo = h // k, w // k
        win = x[:, :, :ho * k, :wo * k].reshape(n, c, ho, k, wo, k).transpose(0, 1, 2, 4, 3, 5)
        win = win.reshape(n, c, ho, wo, k * k)
        if self.kind == "max":
            self.arg = win.argmax(axis=-1)
            return win.max(axis=-1)
        return win.mean(axis=-1)

    def backward(self, g, p, grads):
        k = self.k
        n, c, h, w = self.x_shape
        ho, wo = g.shape[2:]
        if self.kind == "max":
            win = np.zeros((n, c, ho, wo, k * k))
            np.put_along_axis(win, self.arg[..., None], g[..., None], axis=-1)
        else:
            win = np.repeat(g[..., None] / (k * k), k * k, axis=-1)
        dx = np.zeros(self.x_shape)
        dx[:, :, :ho * k, :wo * k] = win.reshape(n, c, ho, wo, k, k).transpose(0, 1, 2, 4, 3, 5).reshape(
            n, c, ho * k, wo * k
        )
        return dx


class GlobalAvgPool(Layer):
    def forward(self, x, p):
        self.x_shape = x.shape
        return x.mean(axis=(2, 3), keepdims=True)

    def backward(self, g, p, grads):
        h, w = self.x_shape[2:]
        return np.broadcast_to(g / (h * w), self.x_shape).copy()


class BatchNormEval(Layer):
    """Inference batch norm with running statistics; only scale and bias can be trained."""

    def __init__(self, scale, bias, mean, var, eps=1e-5):
        self.params = (scale, bias)
        self.mean, self.var, self.eps = mean, var, eps

    def forward(self, x, p):
        shape = (1, -1, 1, 1)
        self.inv = (1 / np.sqrt(p[self.var] + self.eps)).reshape(shape)
        self.xhat = (x - p[self.mean].reshape(shape)) * self.inv
        return self.xhat * p[self.params[0]].reshape(shape) + p[self.params[1]].reshape(shape)

    def backward(self, g, p, grads):
        grads[self.params[0]] = (g * self.xhat).sum(axis=(0, 2, 3))
        grads[self.params[1]] = g.sum(axis=(0, 2, 3))
        return g * p[self.params[0]].reshape(1, -1, 1, 1) * self.inv


class Flatten(Layer):
    def forward(self, x, p):
        self.shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, g, p, grads):
        return g.reshape(self.shape)


def cross_entropy(logits, labels):
    z = logits - logits.max(axis=1, keepdims=True)
    log_prob = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n = logits.shape[0]
    loss = -log_prob[np.arange(n), labels].mean()
    grad = np.exp(log_prob)
    grad[np.arange(n), labels] -= 1
    return loss, grad / n


def mse(output, target):
    diff = output - target
    return (diff**2).mean(), 2 * diff / diff.size


def loss_and_gradients(layers, params, x, y, loss: str):
    """Forward through ``layers``, the loss, and backward; returns (loss, {param: gradient})."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    h = np.asarray(x, dtype=np.float64)
    for layer in layers:
        h = layer.forward(h, p)
    value, g = cross_entropy(h, y) if loss == "cross_entropy" else mse(h, y)
    grads: dict[str, np.ndarray] = {}
    for layer in reversed(layers):
        g = layer.backward(g, p, grads)
    return value, grads


def optimizer_step(kind, hp, p, g, state, lr, step):
    """One torch.optim step for one parameter: returns (new p, new state)."""
    wd = hp.get("weight_decay", 0.0)
    if kind == "sgd":
        return p - lr * (g + wd * p), {}
    if kind == "momentum":
        buf = hp["momentum"] * state["velocity"] + (g + wd * p)
        return p - lr * buf, {"velocity": buf}
    b1, b2, eps = hp["beta1"], hp["beta2"], hp["eps"]
    if kind == "adamw":
        p = p * (1 - lr * wd)
    else:
        g = g + wd * p
    m = b1 * state["m"] + (1 - b1) * g
    v = b2 * state["v"] + (1 - b2) * g * g
    m_hat = m / (1 - b1**step)
    v_hat = v / (1 - b2**step)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), {"m": m, "v": v}
