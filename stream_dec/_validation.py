"""Validation of inputs (embeddings) and of the estimator's hyper-parameters.

Hyper-parameters are checked against one constraints table per estimator (as
scikit-learn's ``_parameter_constraints``), built from :class:`Interval`,
:class:`Options`, :class:`InstanceOf`, :class:`NoneOr` and :class:`Each`.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Mapping

import numpy as np


def check_embeddings(X, *, n_features: int | None = None, name: str = "X") -> np.ndarray:
    """Return ``X`` as a C-contiguous float32 ``[n, d]`` array or raise a ``ValueError``.

    Rejects non-numeric data, arrays that are not 2-D, empty arrays, NaN/inf and a
    feature count other than ``n_features`` (when given).
    """
    try:
        arr = np.asarray(X)
    except Exception as exc:  # ragged lists and the like
        raise ValueError(f"{name} cannot be converted to an array: {exc}") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n_samples, n_features], got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 samples)")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has 0 features")
    if n_features is not None and arr.shape[1] != n_features:
        raise ValueError(f"{name} has {arr.shape[1]} features, but the model was fitted with {n_features}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise ValueError(f"{name} contains NaN or infinite values in {bad} row(s)")
    return arr


def resolve_device(device: str):
    """The ``torch.device`` for a ``device`` hyper-parameter ("auto": CUDA when available)."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device {device!r} is not a torch device: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


# ---------------------------------------------------------------- hyper-parameter constraints
@dataclass(frozen=True)
class Interval:
    """A number of type ``kind`` within bounds; a bound may name another parameter.

    >>> str(Interval(Integral, 1)), str(Interval(Real, 0, 1, closed="neither"))
    ('an int >= 1', 'a number in (0, 1)')
    >>> Interval(Integral, "n_clusters").ok(3, {"n_clusters": 5})
    False
    """

    kind: type
    low: float | str | None = None
    high: float | str | None = None
    closed: str = "both"  # which bounds are included: "both", "left", "right", "neither"

    def ok(self, value: Any, params: Mapping[str, Any]) -> bool:
        """Whether ``value`` satisfies the constraint (``params``: all parameters, for named bounds)."""
        if isinstance(value, bool) or not isinstance(value, self.kind):
            return False
        low = params[self.low] if isinstance(self.low, str) else self.low
        high = params[self.high] if isinstance(self.high, str) else self.high
        left, right = self.closed in ("both", "left"), self.closed in ("both", "right")
        if low is not None and (value < low if left else value <= low):
            return False
        return high is None or (value <= high if right else value < high)

    def __str__(self) -> str:
        what = "an int" if self.kind is Integral else "a number"
        left, right = self.closed in ("both", "left"), self.closed in ("both", "right")
        if self.low is not None and self.high is not None:
            return f"{what} in {'[' if left else '('}{self.low}, {self.high}{']' if right else ')'}"
        if self.low is not None:
            return f"{what} {'>=' if left else '>'} {self.low}"
        if self.high is not None:
            return f"{what} {'<=' if right else '<'} {self.high}"
        return what


@dataclass(frozen=True)
class Options:
    """One of a fixed set of values."""

    values: tuple

    def ok(self, value: Any, params: Mapping[str, Any]) -> bool:
        """Whether ``value`` is one of the options."""
        return any(value == v and type(value) is type(v) for v in self.values)

    def __str__(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)


@dataclass(frozen=True)
class InstanceOf:
    """A value of a type, or of one of a tuple of types."""

    kind: type | tuple[type, ...]
    name: str

    def ok(self, value: Any, params: Mapping[str, Any]) -> bool:
        """Whether ``value`` has the type."""
        return isinstance(value, self.kind)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class NoneOr:
    """None, or a value satisfying ``inner``."""

    inner: Any

    def ok(self, value: Any, params: Mapping[str, Any]) -> bool:
        """Whether ``value`` is None or satisfies ``inner``."""
        return value is None or self.inner.ok(value, params)

    def __str__(self) -> str:
        return f"None or {self.inner}"


@dataclass(frozen=True)
class Each:
    """A list or tuple whose every item satisfies ``inner``."""

    inner: Any

    def ok(self, value: Any, params: Mapping[str, Any]) -> bool:
        """Whether ``value`` is a sequence of valid items."""
        return isinstance(value, (list, tuple)) and all(self.inner.ok(v, params) for v in value)

    def __str__(self) -> str:
        return f"a list or tuple, each {self.inner}"


def check_params(params: Mapping[str, Any], constraints: Mapping[str, Any]) -> None:
    """Raise ``ValueError("invalid hyper-parameter: ...")`` for the first parameter that breaks its constraint.

    >>> check_params({"k": 0}, {"k": Interval(Integral, 1)})
    Traceback (most recent call last):
    ...
    ValueError: invalid hyper-parameter: k must be an int >= 1, got 0
    """
    unknown = set(params) ^ set(constraints)
    if unknown:
        raise ValueError(f"hyper-parameters without constraints or constraints without parameters: {sorted(unknown)}")
    for name, constraint in constraints.items():
        if not constraint.ok(params[name], params):
            raise ValueError(f"invalid hyper-parameter: {name} must be {constraint}, got {params[name]!r}")
