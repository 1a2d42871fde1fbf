"""Constant-memory accumulators for streamed discovery: running moments and reservoirs.

:class:`RunningMoments` merges batches with Chan, Golub and LeVeque's parallel update (float64),
so the means, variances, mean absolute values and (optionally) covariances of any number of
inputs take memory that depends on the number of units only. :class:`Reservoir` keeps a uniform
random sample of bounded size from a stream (Vitter's algorithm R).
"""

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import InvalidInputError


class RunningMoments:
    """Streamed count, mean, variance, mean ``|x|``, extremes and optional covariance of units.

    ``update(x)`` takes a batch ``[batch, unit]``; every statistic is the one of all rows seen.
    Memory: ``O(unit)`` (``O(unit^2)`` with ``track_cov``).
    """

    def __init__(self, n_units: int, *, track_cov: bool = False) -> None:
        if n_units < 1:
            raise InvalidInputError(f"n_units must be >= 1, got {n_units}")
        self.n_units = n_units
        self.count = 0
        self.mean = torch.zeros(n_units, dtype=torch.float64)
        self._m2 = torch.zeros(n_units, dtype=torch.float64)
        self.abs_mean = torch.zeros(n_units, dtype=torch.float64)
        self.minimum = torch.full((n_units,), float("inf"), dtype=torch.float64)
        self.maximum = torch.full((n_units,), float("-inf"), dtype=torch.float64)
        self._comoment = (
            torch.zeros(n_units, n_units, dtype=torch.float64) if track_cov else None
        )

    def update(self, x: Float[Tensor, "batch unit"]) -> None:
        if x.shape[1] != self.n_units:
            raise InvalidInputError(
                f"batch has {x.shape[1]} units but the accumulator tracks {self.n_units}"
            )
        n_b = x.shape[0]
        if n_b == 0:
            return
        x = x.detach().to("cpu", torch.float64)
        mean_b = x.mean(0)
        centred = x - mean_b
        n_a, n = self.count, self.count + n_b
        d = mean_b - self.mean
        self.mean += d * (n_b / n)
        self._m2 += centred.pow(2).sum(0) + d.pow(2) * (n_a * n_b / n)
        self.abs_mean += (x.abs().mean(0) - self.abs_mean) * (n_b / n)
        self.minimum = torch.minimum(self.minimum, x.min(0).values)
        self.maximum = torch.maximum(self.maximum, x.max(0).values)
        if self._comoment is not None:
            self._comoment += centred.T @ centred + torch.outer(d, d) * (n_a * n_b / n)
        self.count = n

    def _need(self, k: int, what: str) -> None:
        if self.count < k:
            raise InvalidInputError(
                f"{what} needs at least {k} inputs, the stream gave {self.count}")

    @property
    def var(self) -> Float[Tensor, "unit"]:
        """Unbiased variance (``n - 1`` denominator)."""
        self._need(2, "a variance")
        return self._m2 / (self.count - 1)

    @property
    def std(self) -> Float[Tensor, "unit"]:
        return self.var.sqrt()

    @property
    def cov(self) -> Float[Tensor, "unit unit"]:
        """Unbiased covariance matrix (only with ``track_cov=True``)."""
        if self._comoment is None:
            raise InvalidInputError("this accumulator was built without track_cov=True")
        self._need(2, "a covariance")
        return self._comoment / (self.count - 1)


class RunningMean:
    """Streamed mean of tensors of any fixed trailing shape, over their first axis."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None

    def update(self, x: Tensor) -> None:
        n_b = x.shape[0]
        if n_b == 0:
            return
        x = x.detach().to("cpu", torch.float64)
        if self.mean is None:
            self.mean = torch.zeros(x.shape[1:], dtype=torch.float64)
        n = self.count + n_b
        self.mean += (x.mean(0) - self.mean) * (n_b / n)
        self.count = n


class Reservoir:
    """A uniform random sample of at most ``capacity`` items of a stream (algorithm R).

    ``add(items)`` takes a list; ``items`` holds the sample in arrival order of their slots.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise InvalidInputError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.seen = 0
        self.items: list[Any] = []
        self._rng = random.Random(seed)

    def add(self, items: Sequence[Any]) -> None:
        for item in items:
            if len(self.items) < self.capacity:
                self.items.append(item)
            else:
                j = self._rng.randrange(self.seen + 1)
                if j < self.capacity:
                    self.items[j] = item
            self.seen += 1


class TensorReservoir:
    """:class:`Reservoir` for rows of a ``[batch, unit]`` tensor (one preallocated tensor)."""

    def __init__(self, capacity: int, n_units: int, seed: int = 0) -> None:
        if capacity < 1:
            raise InvalidInputError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.seen = 0
        self._rows = torch.zeros(capacity, n_units, dtype=torch.float64)
        self._rng = random.Random(seed)

    def add(self, x: Float[Tensor, "batch unit"]) -> None:
        x = x.detach().to("cpu", torch.float64)
        fill = max(0, min(self.capacity - self.seen, x.shape[0]))
        if fill:
            self._rows[self.seen : self.seen + fill] = x[:fill]
        for i in range(fill, x.shape[0]):
            j = self._rng.randrange(self.seen + i + 1)
            if j < self.capacity:
                self._rows[j] = x[i]
        self.seen += x.shape[0]

    @property
    def rows(self) -> Float[Tensor, "batch unit"]:
        return self._rows[: min(self.seen, self.capacity)]


TextSource = Sequence[Any] | Callable[[], Iterable[Any]] | Iterable[Any]
"""Texts to stream: a sequence (read as often as needed) or a zero-argument callable returning a
fresh iterable each time it is called (a generator function, for data that is not in memory).
A one-shot iterator (a generator object) is refused with an error that says how to wrap it: the
pipeline reads its sources more than once."""


def open_source(source: TextSource, name: str) -> Iterator[Any]:
    """A fresh iterator over a :data:`TextSource`."""
    if isinstance(source, str):
        raise InvalidInputError(f"{name} must be a list of texts, not one string")
    if isinstance(source, Sequence):
        return iter(source)
    if callable(source):
        it = source()
        if isinstance(it, str) or not isinstance(it, Iterable):
            raise InvalidInputError(
                f"{name}() must return an iterable of texts, got {type(it).__name__}"
            )
        return iter(it)
    raise InvalidInputError(
        f"{name} must be a list of texts or a zero-argument callable returning an iterable of "
        f"texts (so it can be streamed more than once), got {type(source).__name__}; wrap a "
        f"generator as `lambda: make_texts()`"
    )


def chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of ``size`` items (the last one shorter)."""
    if size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {size}")
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
