"""One record of every attribute drawbot sets on DiffSynth's objects (a layer's `forward` or `cast_to`, a block's
compiled forward, the VAE decoder's tiling switch, the prompt unit's cache), so that each group of patches can be
undone and the object is exactly as DiffSynth made it again (like diffusers' hook registry)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_ABSENT = object()


@dataclass
class _Saved:
    target: Any
    name: str
    previous: Any
    """The instance attribute that was there before, or _ABSENT (the class attribute showed through)."""


class Patches:
    """`set(target, name, value, group=...)` records what `target.name` was as an instance attribute and sets it;
    `undo(group)` puts back, in reverse order, everything that group set. Patching the same attribute twice keeps the
    first saved value, so undo always returns to DiffSynth's original."""

    def __init__(self) -> None:
        self._saved: dict[str, dict[tuple[int, str], _Saved]] = {}

    def set(self, target: Any, name: str, value: Any, *, group: str) -> None:
        saved = self._saved.setdefault(group, {})
        key = (id(target), name)
        if key not in saved:
            previous = vars(target).get(name, _ABSENT) if hasattr(target, "__dict__") else getattr(target, name)
            saved[key] = _Saved(target, name, previous)
        setattr(target, name, value)

    def count(self, group: str) -> int:
        return len(self._saved.get(group, {}))

    def patched(self, group: str) -> list[Any]:
        """The objects that `group` patched, in the order they were first patched."""
        return [s.target for s in self._saved.get(group, {}).values()]

    def undo(self, group: str) -> None:
        for saved in reversed(list(self._saved.pop(group, {}).values())):
            if saved.previous is _ABSENT:
                try:
                    delattr(saved.target, saved.name)
                except AttributeError:
                    pass
            else:
                setattr(saved.target, saved.name, saved.previous)

    def undo_all(self) -> None:
        for group in reversed(list(self._saved)):
            self.undo(group)
