"""The query models one model replica holds, by model_id: rollout and rollback without a restart.

A published version names the model that encoded it (``model_id``) and the checkpoint its run used
(``model_path``, in the ``runs`` row). The replica starts with the configured checkpoint; when the
published version moves to another model (a rollout, or a rollback to an older run), the ingress
asks for that model by ``(model_id, model_path)``: it is loaded once, checked to have that id (a
checkpoint overwritten since the run is refused, never silently used), and kept beside the others,
the least recently used dropped beyond ``max_models``. Requests still in flight on the previous
version keep naming the previous model, so both answer during a switch.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from pipelines.search.scorer import QueryScorer

logger = logging.getLogger(__name__)


class ModelMismatchError(RuntimeError):
    """A published version's model cannot be served: not loadable, or another model_id."""


class ModelRef(NamedTuple):
    """Which model a request needs: the published version's model_id and its run's checkpoint."""

    model_id: str
    path: str | None


class QueryModels:
    """Loaded :class:`QueryScorer` s by model_id, at most ``max_models`` (the default one included)."""

    def __init__(
        self,
        load: Callable[[str], object],
        default_path: str,
        *,
        max_models: int = 2,
        cache_items: int = 4096,
        decode_threads: int = 4,
    ):
        if max_models < 1:
            raise ValueError(f"max_models must be at least 1, got {max_models}")
        self._load = load
        self.max_models = max_models
        self.cache_items = cache_items
        self.decode_threads = decode_threads
        self._scorers: OrderedDict[str, QueryScorer] = OrderedDict()
        self._lock = threading.Lock()
        default = QueryScorer(load(default_path), cache_items, decode_threads)
        self.default_id = default.model_id
        self._scorers[default.model_id] = default

    @property
    def loaded(self) -> list[str]:
        return list(self._scorers)

    def get(self, ref: ModelRef | tuple | None = None) -> QueryScorer:
        """The scorer for ``ref`` (None: the configured model), loading it on first use."""
        if ref is None:
            ref = ModelRef(self.default_id, None)
        ref = ModelRef(*ref)
        with self._lock:  # one load at a time; concurrent callers of a loading model wait for it
            scorer = self._scorers.get(ref.model_id)
            if scorer is None:
                scorer = self._add(ref)
            self._scorers.move_to_end(ref.model_id)
            return scorer

    def _add(self, ref: ModelRef) -> QueryScorer:
        if not ref.path:
            raise ModelMismatchError(
                f"model {ref.model_id} is not loaded here and its run recorded no checkpoint path "
                f"(runs written before model_path existed): deploy that checkpoint as model.name_or_path"
            )
        try:
            model = self._load(ref.path)
        except Exception as err:  # noqa: BLE001 - any load failure refuses the version, with why
            raise ModelMismatchError(
                f"could not load the checkpoint {ref.path!r} recorded for model {ref.model_id}: "
                f"{type(err).__name__}: {err}"
            ) from err
        if model.model_id != ref.model_id:
            raise ModelMismatchError(
                f"the checkpoint at {ref.path!r} is now model {model.model_id}, but the published "
                f"version was encoded by {ref.model_id}: the checkpoint changed since that run"
            )
        scorer = QueryScorer(model, self.cache_items, self.decode_threads)
        self._scorers[ref.model_id] = scorer
        while len(self._scorers) > self.max_models:
            dropped, _ = self._scorers.popitem(last=False)
            logger.info("query model %s unloaded (max_models=%d)", dropped, self.max_models)
        logger.info("query model %s loaded from %s", ref.model_id, ref.path)
        return scorer
