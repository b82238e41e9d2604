"""Argument checks shared by the core and every adapter.

Each check raises ``ValueError`` (bad value) or ``TypeError`` (bad type) with a
message that names the argument and the offending value, in the style of
``torch.optim``. Hyperparameters are plain Python numbers here: these checks run
once at construction, never on array values inside an update.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "check_choice",
    "check_int",
    "check_nonnegative",
    "check_open_unit",
    "check_positive",
    "check_unit_interval",
    "check_beta",
    "check_finite_number",
    "check_same_shapes",
    "check_tree",
]


def check_finite_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        try:
            import numbers

            if not isinstance(value, numbers.Real):
                raise TypeError
        except TypeError:
            raise TypeError(
                f"{name} must be a real number, got {value!r} ({type(value).__name__})"
            ) from None
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"Invalid {name}: {value!r} (must be finite)")
    return v


def check_nonnegative(name: str, value: Any) -> float:
    v = check_finite_number(name, value)
    if v < 0:
        raise ValueError(f"Invalid {name}: {value!r} (must be >= 0)")
    return v


def check_positive(name: str, value: Any) -> float:
    v = check_finite_number(name, value)
    if v <= 0:
        raise ValueError(f"Invalid {name}: {value!r} (must be > 0)")
    return v


def check_unit_interval(name: str, value: Any) -> float:
    v = check_finite_number(name, value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"Invalid {name}: {value!r} (must be in [0, 1])")
    return v


def check_open_unit(name: str, value: Any) -> float:
    v = check_finite_number(name, value)
    if not 0.0 < v < 1.0:
        raise ValueError(f"Invalid {name}: {value!r} (must be in (0, 1))")
    return v


def check_beta(name: str, value: Any) -> float:
    v = check_finite_number(name, value)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"Invalid {name}: {value!r} (must be in [0, 1))")
    return v


INT_MAX = 2**63 - 1
"""Largest integer hyperparameter accepted (the range of the int64 counters)."""


def check_int(name: str, value: Any, minimum: int = 0, maximum: int = INT_MAX) -> int:
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < minimum:
        raise ValueError(f"Invalid {name}: {value!r} (must be >= {minimum})")
    if value > maximum:
        raise ValueError(f"Invalid {name}: {value!r} (must be <= {maximum})")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(
            f"Invalid {name}: {value!r} (must be one of {', '.join(map(repr, choices))})"
        )
    return str(value)


def check_tree(name: str, tree: Any) -> None:
    """A tree must be a non-empty list/tuple of arrays (checked on structure, never values)."""
    if not isinstance(tree, list | tuple):
        raise TypeError(f"{name} must be a list or tuple of arrays, got {type(tree).__name__}")
    if len(tree) == 0:
        raise ValueError(f"{name} is an empty parameter list")


def check_same_shapes(name_a: str, a: Any, name_b: str, b: Any) -> None:
    """``a`` and ``b`` must have the same number of leaves with equal shapes."""
    check_tree(name_a, a)
    check_tree(name_b, b)
    if len(a) != len(b):
        raise ValueError(f"{name_a} has {len(a)} arrays but {name_b} has {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        if tuple(x.shape) != tuple(y.shape):
            raise ValueError(
                f"shape mismatch at index {i}: {name_a}[{i}].shape={tuple(x.shape)} "
                f"but {name_b}[{i}].shape={tuple(y.shape)}"
            )
