"""Fine-tuning as library code: what ``python -m pipelines.finetune`` and the benchmarks run.

- ``data``: the catalog's train products and their titles (``source.title_columns``);
- ``splits``: the train-only rule (nothing from val or test reaches a batch);
- ``batches`` / ``features``: a batch of products and titles, and the decoded-image cache;
- ``samplers``: which products share a batch (random, whole families, mined neighbours);
- ``mined`` / ``mining``: hard negatives mined from the published index, their file format;
- ``recipe``: ``finetune.*`` as training-loop settings and the model loaded for training;
- ``validation``: the val evaluation that picks the best checkpoint;
- ``runners`` (this process) and ``distributed`` / ``ray_worker`` (Ray Train).
"""
