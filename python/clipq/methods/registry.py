"""Compression methods by name: every method registers its class once (a second class with the same name
is refused), and the pipeline, `clipq compare`, the Caffe converter's layer kinds and the tests take the
methods from here, never from a list of their own."""

from __future__ import annotations

from typing import TypeVar

from clipq.methods.base import Method

M = TypeVar("M", bound=type[Method])


class Registry:
    """Method classes by their NAME, in registration order."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Method]] = {}

    def register(self, cls: M) -> M:
        """Class decorator: add `cls` under `cls.NAME`; a ValueError if the name is taken or empty."""
        if not cls.NAME:
            raise ValueError(f"{cls.__name__}: a method needs a NAME")
        if cls.NAME in self._classes:
            raise ValueError(f"method name {cls.NAME!r} is taken by {self._classes[cls.NAME].__name__}; "
                             f"{cls.__name__} needs another")
        self._classes[cls.NAME] = cls
        return cls

    def __getitem__(self, name: str) -> type[Method]:
        return self._classes[name]

    def __contains__(self, name: str) -> bool:
        return name in self._classes

    def names(self) -> tuple[str, ...]:
        return tuple(self._classes)

    def labels(self) -> dict[str, str]:
        return {name: cls.LABEL for name, cls in self._classes.items()}

    def layer_kinds(self) -> tuple[str, ...]:
        """Every Caffe Python layer kind a registered method uses, once each."""
        return tuple(dict.fromkeys(kind for cls in self._classes.values() for kind in cls.LAYER_KINDS))


METHODS = Registry()
