"""``blip-search <command> [args]``: every command behind one console script.

    blip-search --help                 the commands, one line each
    blip-search index-catalog --config configs/local.yaml
    blip-search serve-search --help    a command's own options

``python -m pipelines.<module>`` keeps working; this only dispatches to the same ``main``. A
command is imported when it is run, so ``--help`` stays fast and loads neither Ray nor torch.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# command -> (module, what it does). Modules are named, not imported: the dispatcher sits above
# the commands, and nothing imports a command.
COMMANDS: dict[str, tuple[str, str]] = {
    "make-catalog": ("pipelines.make_catalog", "generate the demo catalog (titles, photos, families)"),
    "index-catalog": ("pipelines.index_catalog", "the nightly index job: catalog -> LanceDB"),
    "serve-search": ("pipelines.serve_search", "the search service (Ray Serve) and its page"),
    "finetune": ("pipelines.finetune", "fine-tune on the catalog's train split"),
    "evaluate": ("pipelines.evaluate", "retrieval recall, ITC alone and ITC -> ITM"),
    "mine-negatives": ("pipelines.mine_negatives", "hard negatives from the published index"),
    "publish": ("pipelines.publish", "move `published` to a run: rollout and rollback"),
    "maintain": ("pipelines.maintain", "prune run tags, compact, clean up old versions"),
    "export": ("pipelines.export", "tables or batch search results as Parquet"),
    "demo": ("pipelines.demo", "catalog -> fine-tune -> index -> service, offline"),
    "config": ("pipelines.config.cli", "print the resolved configuration"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return (
        "usage: blip-search <command> [args ...]\n\ncommands:\n" + "\n".join(lines)
        + "\n\n`blip-search <command> --help` shows a command's options.\n"
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(usage())
        return 0 if args else 2
    name = args[0].replace("_", "-")
    if name not in COMMANDS:
        sys.stderr.write(f"blip-search: unknown command {args[0]!r}\n\n{usage()}")
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
