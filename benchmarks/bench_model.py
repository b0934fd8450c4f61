"""Model-only throughput on CPU (``model_throughput.py``) with the command, machine and date attached.

    python benchmarks/bench_model.py [--models blip-base tiny compact] [--batch-size 8]
        [--json benchmarks/results/model-cpu.json]

``benchmarks.model_throughput.run_bench`` in this process, eager and SDPA attention, for each
model: BLIP-base @384 with random weights (~0.7 s per image on 2 cores: one warm-up and two timed
batches, about 80 s), the tiny test checkpoint and the compact one (``.data/models``, built when
missing). The JSON holds ``run_bench``'s rows under ``rows`` with the header of every benchmark
here (``benchmarks/common.py``), so ``benchmarks/report.py`` can say where and when they were
measured.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, header, save  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["blip-base", "tiny", "compact"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", type=Path, default=RESULTS / "model-cpu.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from benchmarks.bench_index import ensure_model
    from benchmarks.model_throughput import format_report, run_bench

    result = header("model", argv)
    result["rows"] = []
    for name in args.models:
        spec = name if name == "blip-base" else str(ensure_model(name))
        rows = run_bench(spec, batch_sizes=[args.batch_size], device="cpu", attention="both")
        for row in rows:
            row["name"] = name
        print(format_report(rows) + "\n")
        result["rows"].extend(rows)
    save(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
