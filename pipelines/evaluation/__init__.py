"""Retrieval evaluation as library code: what ``python -m pipelines.evaluate``, fine-tuning's
checkpoint choice and the quality tasks read and write.

- ``data``: the inputs of one evaluation (:class:`EvalData`, images decoded on access);
- ``karpathy`` / ``catalog``: reading them from a Karpathy-split annotation or a demo catalog;
- ``run``: :func:`run_evaluation` (model, metrics, every output file);
- ``report`` / ``plot``: the markdown tables and the recall-vs-k_test chart.
"""
