"""Hypothesis strategies for stepsource values and operation programs.

``json_values()`` draws strict JSON (what state, inputs and outputs may hold);
``state_keys()`` short keys that collide often; ``operation_programs()`` sequences of
context operations (JSON lists) for a handler to interpret and a model to check against.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

__all__ = [
    "boundary_programs",
    "json_objects",
    "json_values",
    "operation_programs",
    "operations",
    "state_keys",
]

_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1

_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(_INT_MIN, _INT_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text
)


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Strict JSON values: nested dicts (str keys) and lists of scalars."""
    return st.recursive(
        _scalars,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4)
        ),
        max_leaves=max_leaves,
    )


def json_objects(max_leaves: int = 12) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(_text, json_values(max_leaves), max_size=4)


def state_keys() -> st.SearchStrategy[str]:
    """A few short keys, so operations often touch the same key."""
    return st.sampled_from(["a", "b", "c", "status", "progress", "ünï"])


def operation_programs(max_size: int = 25) -> st.SearchStrategy[list[list[Any]]]:
    """Programs of context operations, each a JSON list ``[name, *args]``.

    ``restore`` carries an index into the checkpoints created so far (taken modulo their
    number; skipped when there are none), so every program is valid.
    """
    return st.lists(operations(), max_size=max_size)


def operations() -> st.SearchStrategy[list[Any]]:
    """One deterministic context operation ``[name, *args]`` (state, checkpoints, history)."""
    return st.one_of(
        st.tuples(st.just("set"), state_keys(), json_values()),
        st.tuples(st.just("update"), st.dictionaries(state_keys(), json_values(), max_size=3)),
        st.tuples(st.just("delete"), state_keys()),
        st.tuples(st.just("checkpoint"), json_objects(4)),
        st.tuples(st.just("restore"), st.integers(0, 10)),
        st.tuples(st.just("history"), st.sampled_from(["custom", "audit"]), json_objects(4)),
    ).map(list)


def boundary_programs(max_size: int = 12) -> st.SearchStrategy[list[list[Any]]]:
    """Programs that mix deterministic operations with side-effect boundaries (``do``,
    ``uuid4``, ``flush``; see :func:`stepsource.testing.programs.run_program_operations`)."""
    deterministic = operations()
    boundary = st.one_of(
        st.tuples(st.just("do"), json_values()).map(list),
        st.just(["uuid4"]),
        st.just(["flush"]),
    )
    return st.lists(st.one_of(deterministic, deterministic, boundary), max_size=max_size)
