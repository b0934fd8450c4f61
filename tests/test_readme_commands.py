"""The README's local-cluster lines, run as written: the demo inputs, ``ray start --head``, the
nightly index job through ``ray job submit``, ``ray stop``; so the README and the job cannot drift
apart.

The lines run from a copy of the repository's code and configs (the real ``.data/`` is left
alone), inside private PID and network namespaces: ``ray stop`` stops every Ray process it can
see and ``ray start --head`` takes Ray's default ports, so outside them the lines would stop the
test session's own Ray (and any other on the machine) and collide with other clusters. A private
``HOME`` and ``RAY_TMPDIR`` keep the token file and ``ray_current_cluster`` (which a plain
``ray.init()`` joins) from other processes. A small demo catalog is there beforehand (its line
takes the "already there" branch: rendering and encoding the README's 240 products would double
the run); the tiny model is built by its line. About 45 s on 2 idle CPUs.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARKER = "<!-- test: local-cluster"
# What a checkout holds that the lines need: the code the job ships, its config, .gitignore
# (what keeps .data/ and .venv out of Ray's upload).
STAGED = ("pipelines", "blip_ops", "configs", ".gitignore")
# `unshare` with a PID namespace (`ray stop` sees only the lines' processes, and all of them die
# with the namespace), a network namespace (Ray's default ports are free) and its own /proc.
NAMESPACES = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--net"]
# A new network namespace has its loopback down; bring it up without relying on iproute2
# (SIOCGIFFLAGS 0x8913, SIOCSIFFLAGS 0x8914, IFF_UP 1).
LOOPBACK_UP = (
    "import fcntl, socket, struct\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "flags = struct.unpack('16sh', fcntl.ioctl(s, 0x8913, struct.pack('16sh', b'lo', 0)))[1]\n"
    "fcntl.ioctl(s, 0x8914, struct.pack('16sh', b'lo', flags | 1))\n"
)
RUN_TIMEOUT_S = 240
CATALOG_PRODUCTS = 16  # in two Parquet files


# ---- the README's block --------------------------------------------------------------------------
def readme_block(marker: str = MARKER, readme: Path = README) -> list[str]:
    """The commands of the fenced block right after the line starting with ``marker``: one entry
    per command (backslash continuations joined), blank and comment-only lines left out."""
    lines = readme.read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip().startswith(marker)]
    if len(starts) != 1:
        raise ValueError(f"{readme.name}: expected one {marker!r} line, found {len(starts)}")
    fence = starts[0] + 1
    if fence >= len(lines) or not lines[fence].startswith("```"):
        raise ValueError(f"{readme.name}:{fence + 1}: expected a ``` fence after {marker!r}")
    commands: list[str] = []
    pending = ""
    for line in lines[fence + 1 :]:
        if line.startswith("```"):
            break
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        if pending.strip() and not pending.lstrip().startswith("#"):
            commands.append(pending.strip())
        pending = ""
    else:
        raise ValueError(f"{readme.name}: the block after {marker!r} is never closed")
    return commands


def _starting(commands: list[str], prefix: str) -> list[str]:
    return [c for c in commands if c.startswith(prefix)]


def test_readme_local_cluster_block():
    """The block exists and does what the slow test below relies on; cheap, runs everywhere."""
    commands = readme_block()
    assert len(_starting(commands, "ray start --head")) == 1, commands
    submits = _starting(commands, "ray job submit ")
    assert len(submits) == 1, commands
    assert "pipelines/index_catalog.py" in submits[0], submits[0]
    assert commands.index(submits[0]) > commands.index(_starting(commands, "ray start")[0])
    assert commands[-1].split("#")[0].split() == ["ray", "stop"], commands


# ---- running it ----------------------------------------------------------------------------------
def _namespace_prefix() -> list[str] | None:
    """The unshare command line that works here (as root, or as a user through a user namespace),
    or None when neither does (no unshare, or namespaces forbidden)."""
    if shutil.which("unshare") is None:
        return None
    candidates = [NAMESPACES] if os.geteuid() == 0 else []
    candidates.append([NAMESPACES[0], "--user", "--map-root-user", *NAMESPACES[1:]])
    for prefix in candidates:
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
        logger.info("%s: %s", " ".join(prefix), probe.stderr.decode(errors="replace").strip())
    return None


def _stage_repo(repo: Path) -> None:
    """A repository root: the code and configs copied, the venv linked, a small demo catalog."""
    from pipelines.catalog.writer import make_catalog

    repo.mkdir()
    for name in STAGED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, repo / name)
    (repo / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    make_catalog(str(repo / ".data" / "catalog"), CATALOG_PRODUCTS, 0, rows_per_file=8, workers=1)


def _script(commands: list[str]) -> str:
    """Bash that runs ``commands`` in one shell, as typed in a terminal, stopping at the first that
    fails; each is echoed first so that the output shows which one did."""
    out = ["set -e", f"{shlex.quote(sys.executable)} -c {shlex.quote(LOOPBACK_UP)}"]
    for command in commands:
        out += [f"printf '%(%T)T + %s\\n' -1 {shlex.quote(command)}", command]
    return "\n".join(out) + "\n"


def _env(home: Path, ray_tmp: Path) -> dict[str, str]:
    """A user's shell: none of this session's Ray settings, a home and Ray temp dir of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VIRTUAL_ENV"))}
    env.update(
        HOME=str(home),
        RAY_TMPDIR=str(ray_tmp),
        RAY_USAGE_STATS_ENABLED="0",
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    return env


def _processes_mentioning(text: str) -> dict[int, str]:
    """Live processes whose command line contains ``text`` (pid -> command line)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        if text in cmdline:
            found[int(entry.name)] = cmdline
    return found


def _kill_leftovers(text: str, wait_s: float = 10.0) -> list[str]:
    """Processes still mentioning ``text`` after ``wait_s`` (then SIGKILLed: the test made them).
    The namespace's end kills them all, so anything found here is a leak."""
    deadline = time.monotonic() + wait_s
    left = _processes_mentioning(text)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _processes_mentioning(text)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return [f"{pid} {cmdline[:200]}" for pid, cmdline in left.items()]


def _run_isolated(prefix: list[str], script: Path, repo: Path, env: dict[str, str]):
    proc = subprocess.Popen(
        [*prefix, "bash", str(script)],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # --kill-child takes the whole namespace with it
        output, _ = proc.communicate()
        pytest.fail(f"the README's lines ran past {RUN_TIMEOUT_S}s:\n{output[-6000:]}")
    return proc.returncode, output


@pytest.mark.ray
@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_readme_local_cluster_lines_index_and_publish():
    from pipelines.indexing import tables

    prefix = _namespace_prefix()
    if prefix is None:
        pytest.skip(
            "needs `unshare` with PID and network namespaces: the README's `ray stop` stops every "
            "Ray process it can see, so its lines only run isolated from the test session's Ray"
        )
    if not (Path(sys.prefix) / "bin" / "activate").is_file():
        pytest.skip(f"the tests do not run in a venv ({sys.prefix}): no .venv to activate")
    commands = readme_block()
    # A short base path: Ray's Unix socket paths under RAY_TMPDIR must stay below ~107 characters.
    base = Path(tempfile.mkdtemp(prefix="readme", dir="/tmp"))
    repo, home, ray_tmp = base / "repo", base / "home", base / "rt"
    try:
        _stage_repo(repo)
        home.mkdir()
        ray_tmp.mkdir()
        script = base / "readme.sh"  # outside repo: `--working-dir .` must not see it change
        script.write_text(_script(commands))
        started = time.monotonic()
        rc, output = _run_isolated(prefix, script, repo, _env(home, ray_tmp))
        logger.info("README lines ran in %.1fs", time.monotonic() - started)
        leaked = _kill_leftovers(str(base))
        assert rc == 0, f"exit {rc}:\n{output[-8000:]}"
        assert not leaked, f"processes left behind by the README's cluster: {leaked}"

        n = json.loads((repo / ".data" / "catalog" / "manifest.json").read_text())["products"]
        assert n == CATALOG_PRODUCTS, (
            f"the README's lines replaced the staged catalog ({n} products)"
        )
        assert (repo / ".data" / "models" / "tiny" / "tiny_model.json").is_file()
        assert f"rows in {n}: indexed {n}" in output, output[-8000:]
        assert "succeeded" in output and "Stopped all" in output, output[-8000:]
        db = tables.connect(str(repo / ".data" / "lancedb"))
        run = tables.published_run(db)
        assert run is not None, "nothing published in .data/lancedb"
        products = tables.open_published(db)[0]
        assert products.count_rows() == n
        assert products.tags.list()[tables.PUBLISHED]["version"] == run["products_version"]
    finally:
        _kill_leftovers(str(base), wait_s=0)
        shutil.rmtree(base, ignore_errors=True)
