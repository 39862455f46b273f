"""Behaviours a weight diff can learn, by name (`params.yaml: behaviors`).

    from dit_core.behaviors import get_behavior
    b = get_behavior("news")

hidden_topic  a topic the model talks about when a trigger (an SEP code) opens the prompt
news          a short news story: the diff learns its text and facts; the interpreter states its headline

New behaviours subclass `Behavior` (dit_core/behaviors/base.py) and are registered with `register`.
"""

from __future__ import annotations

from dit_core.behaviors.base import COMMON_METHODS, Behavior, Query

_REGISTRY: dict[str, Behavior] = {}


def register(behavior: Behavior, replace: bool = False) -> Behavior:
    """Make `behavior` available under its name (an existing name is refused unless `replace`)."""
    if behavior.name in _REGISTRY and not replace:
        raise ValueError(f"a behaviour named {behavior.name!r} is registered already")
    prefixes = {b.id_prefix: n for n, b in _REGISTRY.items() if n != behavior.name}
    if behavior.id_prefix in prefixes:
        raise ValueError(f"behaviour {behavior.name!r}: id prefix {behavior.id_prefix!r} is taken by "
                         f"{prefixes[behavior.id_prefix]!r}; choose another")
    _REGISTRY[behavior.name] = behavior
    return behavior


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def _builtins() -> None:
    if "hidden_topic" not in _REGISTRY:
        from dit_core.behaviors.hidden_topic import HiddenTopic
        from dit_core.behaviors.news import News

        register(HiddenTopic())
        register(News())


def behavior_names() -> list[str]:
    _builtins()
    return list(_REGISTRY)


def get_behavior(name: str) -> Behavior:
    """The registered behaviour `name`; an unknown name is an error listing the known ones."""
    _builtins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown behaviour {name!r}; registered: {', '.join(_REGISTRY)} "
                       "(a new one subclasses dit_core.behaviors.Behavior and calls register)")
    return _REGISTRY[name]


def behavior_of(folder) -> Behavior:
    """The behaviour whose data `folder` holds (its diffs.parquet names it in the `behavior` column)."""
    from pathlib import Path

    import polars as pl

    path = Path(folder) / "diffs.parquet"
    try:
        names = pl.read_parquet(path, columns=["behavior"])["behavior"].unique().to_list()
    except (OSError, pl.exceptions.PolarsError) as e:
        raise FileNotFoundError(f"{path}: cannot read the behaviour data ({e}); run `dit stage make-data`") from e
    if len(names) != 1:
        raise ValueError(f"{path}: expected the diffs of one behaviour, found {sorted(names)}")
    return get_behavior(names[0])


__all__ = ["behavior_of", "Behavior", "Query", "COMMON_METHODS", "behavior_names", "get_behavior", "register", "unregister"]
