"""The in-process executor: runs each item in turn, in this process."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, TypeVar

R = TypeVar("R")


class LocalExecutor:
    """Runs ``fn(shared, item)`` for each item, in order, in this process."""

    name = "local"
    workers = 1

    def share(self, value: Any) -> Any:
        return value

    def map(self, fn: Callable[[Any, Any], R], shared: Any, items: Sequence[Any],
            progress: Optional[Callable[[int, int], None]] = None) -> list[R]:
        results = []
        for i, item in enumerate(items):
            results.append(fn(shared, item))
            if progress is not None:
                progress(i + 1, len(items))
        return results

    def close(self) -> None:
        pass
