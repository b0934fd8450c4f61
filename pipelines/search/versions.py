"""Which published index version a search replica serves, and its move to a newer one.

The states, per replica:

- **nothing served** (``snapshot`` None): before :meth:`PinnedVersions.start`; ``start`` fails when
  nothing is published or the published version's model cannot be had (the replica then fails to
  start, with the reason).
- **serving** one pinned version (``snapshot``): every request reads the snapshot it took at its
  start, so an answer comes wholly from one version.
- **moved**: :meth:`refresh` (every ``refresh_seconds``, :meth:`watch`) found a newer published
  version whose model it could have, opened it beside the pinned one and swapped the reference; the
  replaced snapshots stay open for two refreshes (no request lives that long), then are closed.
- **refusing** (``refused`` set): the published version's model cannot be served (another model_id
  with ``serve.follow_model`` off, or its checkpoint would not load); the pinned version keeps
  serving, the refusal is logged once per published version and reported by ``/healthz``. It
  clears when the published tag points back at the pinned version or a servable one.

A failed look-up or open changes nothing: the pinned version keeps serving and the next period tries
again. No Ray here: the model deployment is reached through the ``load_model`` callable.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

RETIRED_KEPT = 2  # replaced snapshots kept open: two refresh periods, longer than any request


class PinnedVersions:
    """The pinned-version state machine of one search replica (see the module docstring).

    published(): the published pointer (``products_table``, ``products_version``, ``model_id``,
        ``model_path`` …) or None. open_version(pointer): the opened snapshot of that version.
    load_model(ref): the text settings of model ``ref`` (a ``ModelRef``), loaded where the queries
        are encoded; blocking, called from the refresh thread. Raises when it cannot be had.
    follow_model: serve a published version encoded by another model (load it) rather than refuse.
    model_path: the configured checkpoint (for messages). metrics: ``set_version(version, rows)``.
    """

    def __init__(
        self,
        *,
        published: Callable[[], dict | None],
        open_version: Callable[[dict], Any],
        load_model: Callable[[tuple], Any],
        follow_model: bool,
        index_uri: str,
        model_path: str,
        metrics=None,
    ):
        self._published = published
        self._open_version = open_version
        self._load_model = load_model
        self.follow_model = follow_model
        self.index_uri = index_uri
        self.model_path = model_path
        self.metrics = metrics
        self.model_id: str | None = None  # the configured model's, known once its replica is up
        self.text_settings = None
        self.snapshot = None
        self.retired: list = []  # replaced snapshots, kept while requests may still use them
        self.refused: dict | None = None  # the published pointer refused, with "why"
        self._lock = threading.Lock()

    # ---- start ------------------------------------------------------------------------------
    def start(self, model_id: str, text_settings) -> None:
        """Serve the published version with the configured model (``model_id``); raises
        ModelMismatchError or NoPublishedIndex when there is nothing this replica can serve."""
        self.model_id, self.text_settings = model_id, text_settings
        self.refresh()
        if self.snapshot is not None:
            return
        if self.refused is not None:
            from pipelines.search.models import ModelMismatchError

            p = self.refused
            raise ModelMismatchError(
                self.mismatch_message(
                    p["model_id"], p["products_table"], int(p["products_version"]), p["why"]
                )
            )
        from pipelines.search.snapshot import NoPublishedIndex

        raise NoPublishedIndex(f"no published index at {self.index_uri}: run the index job first")

    # ---- refresh ----------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Swap in a newly published version (and its model); True when the served version changed."""
        with self._lock:
            pointer = self._published()
            if pointer is None:
                return False
            key = (pointer["products_table"], int(pointer["products_version"]))
            if self.snapshot is not None and key == self.snapshot.key:
                self.refused = None
                return False
            try:
                model_ref, text_settings = self._query_model(pointer)
            except Exception as err:  # noqa: BLE001 - refuse the version, keep serving the pinned one
                self._refuse(pointer, key, err)
                return False
            new = self._open_version(pointer)
            new.model_ref, new.text_settings = model_ref, text_settings
            self._swap(new)
            return True

    def _query_model(self, pointer: dict):
        """``(ModelRef or None, text settings)`` of the model that encoded ``pointer``'s version:
        the configured one, or (``follow_model``) the checkpoint its run recorded, loaded before the
        switch. Raises ModelMismatchError when it cannot be had."""
        from pipelines.search.models import ModelMismatchError, ModelRef

        if pointer["model_id"] == self.model_id:
            return None, self.text_settings
        if not self.follow_model:
            raise ModelMismatchError("")
        ref = ModelRef(pointer["model_id"], pointer.get("model_path"))
        return ref, self._load_model(ref)

    def _refuse(self, pointer: dict, key: tuple[str, int], err: Exception) -> None:
        from pipelines.search.models import ModelMismatchError

        cause = getattr(err, "cause", None) or err  # a RayTaskError wraps the replica's
        why = (
            str(cause)
            if isinstance(cause, ModelMismatchError)
            else f"its model could not be loaded ({type(cause).__name__}: {cause})"
        )
        if self.refused is None or any(self.refused.get(k) != v for k, v in pointer.items()):
            logger.error(self.mismatch_message(pointer["model_id"], *key, why))
        self.refused = {**pointer, "why": why}

    def _swap(self, new) -> None:
        old, self.snapshot, self.refused = self.snapshot, new, None
        if self.metrics is not None:
            self.metrics.set_version(new.version, new.rows)
        if old is not None:
            self.retired.append(old)
            while len(self.retired) > RETIRED_KEPT:
                self.retired.pop(0).close()
        logger.info(
            "now serving %s version %d (model %s)", new.products_table, new.version, new.model_id
        )

    def mismatch_message(
        self, pointer_model: str, products_table: str, version: int, why: str = ""
    ) -> str:
        why = why or (
            f"this service loaded {self.model_id} ({self.model_path}) and "
            f"serve.follow_model is off"
        )
        return (
            f"REFUSED: published table {products_table} version {version} was encoded by model "
            f"{pointer_model}, but {why}; deploy the matching checkpoint or move the published "
            f"tag back"
        )

    # ---- the periodic check -----------------------------------------------------------------
    async def watch(self, period_s: float, sleep=asyncio.sleep) -> None:
        """:meth:`refresh` every ``period_s`` (off the event loop) until the replica stops; a
        failed check is logged and retried the next period."""
        while True:
            await sleep(period_s)
            try:
                await asyncio.to_thread(self.refresh)
            except RuntimeError as err:
                if "shutdown" in str(err):  # the replica is stopping
                    return
                logger.exception("looking for a newly published version failed")
            except Exception:  # noqa: BLE001 - keep serving the pinned version; retry next period
                logger.exception("looking for a newly published version failed")

    def describe_refusal(self) -> dict | None:
        """What ``/healthz`` reports about a refused published version (None: none refused)."""
        if self.refused is None:
            return None
        return {
            "products_table": self.refused["products_table"],
            "table_version": int(self.refused["products_version"]),
            "model_id": self.refused["model_id"],
            "why": self.refused["why"],
        }
