"""The search service's logic, without Ray: request parsing, filters, the pinned index snapshot,
the image-token cache and the two-stage search itself. ``pipelines/serve_search.py`` wires it
into Ray Serve; offline tools (batch search exports, evaluation) call it directly."""
