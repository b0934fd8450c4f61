"""The search service, one module per job.

Ray-free (offline tools such as batch search exports and evaluation call them directly):
``request`` and ``filters`` (parsing and checking a query), ``snapshot`` (one pinned version of the
published table), ``versions`` (which version a replica serves and its move to a newer one),
``engine`` and ``hybrid`` (the two-stage search), ``scorer`` and ``models`` (query encoding and
the ITM re-rank through ``blip_ops.rerank``, image tokens cached by ``blip_ops.token_cache``),
``metrics`` (Prometheus and JSON logs), ``http`` (the FastAPI routes behind an ASGI guard; it
imports Ray's exception types only to recognise a lost model replica) and ``samples`` (sample
queries sent to a running service over HTTP).

``deployments`` is the one module that imports Ray Serve: the model and ingress deployments,
:func:`~pipelines.search.deployments.start` and
:func:`~pipelines.search.deployments.deployment_errors`. ``pipelines/serve_search.py`` is the
command (``serve run`` builder and CLI) on top of it.
"""
