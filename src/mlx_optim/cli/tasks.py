"""The tasks ``mlx-optim compare`` trains on: small, bundled, nothing downloaded.

* ``digits``: 10-class classification of 12x12 digit images rendered from a 5x7 bitmap font
  with random one-pixel shifts, stroke weight, contrast, missing ink and noise; an MLP 144-128-10.
* ``chars``: next-character prediction on ``data/corpus.txt`` (the Gettysburg Address and
  eight of Shakespeare's sonnets, 5.8 KB, public domain); the last 10% is held out. An MLP
  over the 12 previous characters' embeddings (Bengio et al. 2003).
* ``curve``: a least-squares fit of a 1-32-32-1 tanh network to 256 noisy samples of a
  damped wave, full batch: the setting L-BFGS is made for.

All data come from ``mx.random`` with a fixed key, so a seed gives the same task everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Callable

import mlx.core as mx
import mlx.nn as nn


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    make_model: Callable[[], nn.Module]
    loss: Callable[[nn.Module, mx.array, mx.array], mx.array]  # mean over the batch
    train: tuple[mx.array, mx.array]
    val: tuple[mx.array, mx.array] | None  # None: report the training set only
    batch_size: int | None  # None: every step sees the whole training set
    steps: int  # the default run length
    optimizers: tuple[str, ...]  # the default set
    classification: bool  # report accuracy

    def accuracy(self, model: nn.Module, x: mx.array, y: mx.array) -> float | None:
        if not self.classification:
            return None
        return (mx.argmax(model(x), axis=-1) == y).mean().item()


class MLP(nn.Module):
    def __init__(self, sizes: list[int], activation=nn.relu):
        super().__init__()
        self.layers = [nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])]
        self.activation = activation

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)


def cross_entropy(model, x, y):
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


def mse(model, x, y):
    return nn.losses.mse_loss(model(x), y, reduction="mean")


# ---------------------------------------------------------------------------- digits

FONT_5X7 = (  # 0-9, seven rows of five pixels each
    "01110 10001 10011 10101 11001 10001 01110", "00100 01100 00100 00100 00100 00100 01110",
    "01110 10001 00001 00010 00100 01000 11111", "11111 00010 00100 00010 00001 10001 01110",
    "00010 00110 01010 10010 11111 00010 00010", "11111 10000 11110 00001 00001 10001 01110",
    "00110 01000 10000 11110 10001 10001 01110", "11111 00001 00010 00100 01000 01000 01000",
    "01110 10001 10001 01110 10001 10001 01110", "01110 10001 10001 01111 00001 00010 01100",
)
DIGIT_SIZE = 12


def render_digits(labels: mx.array, key: mx.array, size: int = DIGIT_SIZE) -> mx.array:
    """Images (n, size*size) of the digits ``labels``, each placed and degraded at random."""
    font = mx.array([[[int(c) for c in row] for row in glyph.split()] for glyph in FONT_5X7],
                    dtype=mx.float32)  # (10, 7, 5)
    n = labels.shape[0]
    k_dy, k_dx, k_bold, k_drop, k_contrast, k_noise = mx.random.split(key, 6)
    # within a pixel of the centre: an MLP has no translation invariance to lean on
    dy = (size - 7) // 2 + mx.random.randint(-1, 2, (n, 1, 1), key=k_dy)
    dx = (size - 6) // 2 + mx.random.randint(-1, 2, (n, 1, 1), key=k_dx)  # room for a bold column
    rows = mx.arange(size)[None, :, None] - dy
    cols = mx.arange(size)[None, None, :] - dx
    inside = (rows >= 0) & (rows < 7) & (cols >= 0) & (cols < 5)
    ink = font[labels[:, None, None], mx.clip(rows, 0, 6), mx.clip(cols, 0, 4)] * inside
    bolder = mx.concatenate([mx.zeros((n, size, 1)), ink[:, :, :-1]], axis=2)
    ink = mx.where(mx.random.bernoulli(0.5, (n, 1, 1), key=k_bold), mx.maximum(ink, bolder), ink)
    ink = ink * mx.random.bernoulli(0.9, ink.shape, key=k_drop)  # missing ink
    contrast = mx.random.uniform(0.6, 1.0, (n, 1, 1), key=k_contrast)
    noise = 0.15 * mx.random.normal((n, size, size), key=k_noise)
    return (ink * contrast + noise).reshape(n, size * size)


def digits(seed: int) -> Task:
    k_train, k_val, k_ytrain, k_yval = mx.random.split(mx.random.key(seed), 4)
    y_train = mx.random.randint(0, 10, (3000,), key=k_ytrain)
    y_val = mx.random.randint(0, 10, (1000,), key=k_yval)
    x_train, x_val = render_digits(y_train, k_train), render_digits(y_val, k_val)
    mx.eval(x_train, x_val)  # once, not inside every step's graph
    return Task(
        name="digits",
        description=f"digits: 10 classes, {DIGIT_SIZE}x{DIGIT_SIZE} noisy glyphs, "
                    "3000 train / 1000 val, MLP 144-128-10, batch 64",
        make_model=lambda: MLP([DIGIT_SIZE * DIGIT_SIZE, 128, 10]),
        loss=cross_entropy,
        train=(x_train, y_train),
        val=(x_val, y_val),
        batch_size=64, steps=300,
        optimizers=("SGD", "Adam", "AdamW", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta"),
        classification=True,
    )


# ----------------------------------------------------------------------------- chars

CONTEXT = 12


def corpus() -> str:
    return (resources.files("mlx_optim") / "data" / "corpus.txt").read_text(encoding="utf-8")


class CharMLP(nn.Module):
    def __init__(self, vocab: int, context: int = CONTEXT, dims: int = 12, hidden: int = 128):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dims)
        self.hidden = nn.Linear(context * dims, hidden)
        self.out = nn.Linear(hidden, vocab)

    def __call__(self, x):
        h = self.embedding(x).reshape(x.shape[0], -1)
        return self.out(nn.relu(self.hidden(h)))


def chars(seed: int) -> Task:
    text = corpus()
    vocab = sorted(set(text))
    ids = mx.array([vocab.index(c) for c in text])
    n = ids.size - CONTEXT
    windows = ids[mx.arange(n)[:, None] + mx.arange(CONTEXT)[None, :]]
    targets = ids[CONTEXT:]
    split = int(0.9 * n)
    mx.eval(windows, targets)
    return Task(
        name="chars",
        description=f"chars: next character of {len(text)} bytes of bundled text, "
                    f"{len(vocab)} symbols, last 10% held out, MLP over {CONTEXT} characters, batch 64",
        make_model=lambda: CharMLP(len(vocab)),
        loss=cross_entropy,
        train=(windows[:split], targets[:split]),
        val=(windows[split:], targets[split:]),
        batch_size=64, steps=400,
        optimizers=("SGD", "Adam", "AdamW", "NAdam", "RMSprop", "Adagrad"),
        classification=True,
    )


# ----------------------------------------------------------------------------- curve

def curve(seed: int) -> Task:
    x = mx.linspace(-3, 3, 256)[:, None]
    y = mx.sin(2 * x) * mx.exp(-x * x / 8) + 0.3 * x
    y = y + 0.05 * mx.random.normal(y.shape, key=mx.random.key(seed))
    mx.eval(x, y)
    return Task(
        name="curve",
        description="curve: least-squares fit of sin(2x) exp(-x^2/8) + 0.3x + noise, "
                    "256 points, MLP 1-32-32-1 (tanh), full batch",
        make_model=lambda: MLP([1, 32, 32, 1], activation=mx.tanh),
        loss=mse,
        train=(x, y), val=None,
        batch_size=None, steps=200,
        optimizers=("LBFGS", "Adam", "Rprop", "SGD", "RMSprop"),
        classification=False,
    )


TASKS = {"digits": digits, "chars": chars, "curve": curve}
