"""The query model inside the ingress replica (``serve.colocate_model``): no Serve handle hop.

:class:`LocalModel` gives the ingress what a ``DeploymentHandle`` to the model deployment gives
it (``handle.method.remote(...)``, awaited on the event loop or ``.result()`` from a thread), over
an instance of the same model class in this process, so the routes, the engine and the responses
are the ones of the two-deployment layout. ``@serve.batch`` batches concurrent requests here as it
does in a model replica.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable
from typing import Any


class LocalResponse:
    """One call's result: awaitable on the replica's event loop, or ``result()`` from a thread."""

    def __init__(
        self, call: Callable[[], Awaitable[Any] | Any], loop: asyncio.AbstractEventLoop | None
    ):
        self._call = call
        self._loop = loop

    def __await__(self):
        return self._run().__await__()

    async def _run(self) -> Any:
        out = self._call()
        return await out if asyncio.iscoroutine(out) else out

    def result(self, timeout_s: float | None = None) -> Any:
        """Wait from a thread other than the event loop's (the version refresher's)."""
        if self._loop is None:
            raise RuntimeError("no event loop captured: result() is for calls from other threads")
        future = asyncio.run_coroutine_threadsafe(self._run(), self._loop)
        try:
            return future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError as err:
            raise TimeoutError(f"in-process model call took over {timeout_s}s") from err


class _Method:
    def __init__(self, owner: LocalModel, name: str):
        self._owner, self._name = owner, name

    def remote(self, *args: Any) -> LocalResponse:
        method = getattr(self._owner.instance, self._name)
        return LocalResponse(lambda: method(*args), self._owner.loop)


class LocalModel:
    """A handle-shaped wrapper over ``instance`` (a model deployment's class, built in-process)."""

    def __init__(self, instance: Any):
        self.instance = instance
        self.loop: asyncio.AbstractEventLoop | None = None  # set once the replica's loop runs

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(self, name)
