"""Fault-injection hooks for the fault tests (a test hook, like FoundationDB's "buggify").

NEVER set in production. The plan comes from ONE environment variable of the index job's driver:

    BLIP_FAULTS="encoder_exit_once=/tmp/marker,kill_before_tags"

Points (each a no-op unless named in the plan):

- ``encoder_exit_once=<marker file>``: the encoder actor (``EncodeBatch.__call__``) exits with
  ``os._exit(1)`` on its first batch if the marker file does not exist yet, creating it first, so
  the fault fires once per marker however often Ray restarts the actor. Ray workers do not see
  environment changes made after ``ray.init``, so the driver reads the plan and hands it to the
  actor explicitly (``fn_constructor_kwargs``).
- ``kill_before_tags``: the driver SIGKILLs itself after the ``runs`` row is committed and
  immediately before the first tag move (the window in which a run has written everything but
  published nothing).

An unknown point or a malformed value is an error naming it: a typo must not silently test nothing.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)

ENV = "BLIP_FAULTS"


@dataclass(frozen=True)
class FaultPlan:
    """The parsed ``BLIP_FAULTS`` plan (empty: no fault)."""

    encoder_exit_once: str | None = None  # marker file path
    kill_before_tags: bool = False

    def __bool__(self) -> bool:
        return bool(self.encoder_exit_once or self.kill_before_tags)

    @classmethod
    def parse(cls, text: str | None) -> FaultPlan:
        """``"point[=value],point..."``; whitespace around items is ignored."""
        values: dict = {}
        for item in (text or "").split(","):
            item = item.strip()
            if not item:
                continue
            name, eq, value = item.partition("=")
            name, value = name.strip(), value.strip()
            if name == "encoder_exit_once":
                if not value:
                    raise ValueError(f"{ENV}: encoder_exit_once needs a marker file path (=PATH)")
                values[name] = value
            elif name == "kill_before_tags":
                if eq:
                    raise ValueError(f"{ENV}: kill_before_tags takes no value, got {item!r}")
                values[name] = True
            else:
                raise ValueError(
                    f"{ENV}: unknown fault point {name!r} (known: encoder_exit_once, "
                    f"kill_before_tags)"
                )
        return cls(**values)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FaultPlan:
        plan = cls.parse((os.environ if environ is None else environ).get(ENV))
        if plan:
            logger.warning("%s is set: fault injection ACTIVE (%s); tests only", ENV, plan)
        return plan


def encoder_exit_once(plan: FaultPlan | None) -> None:
    """In the encoder actor: exit the process once per marker file."""
    if plan is None or not plan.encoder_exit_once:
        return
    try:  # O_EXCL: of several actors, exactly one fires
        fd = os.open(plan.encoder_exit_once, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    logger.warning("%s: encoder actor pid %d exits now (os._exit(1))", ENV, os.getpid())
    os._exit(1)


def kill_before_tags(plan: FaultPlan | None) -> None:
    """In the index driver, right before the first tag move: SIGKILL this process."""
    if plan is None or not plan.kill_before_tags:
        return
    logger.warning("%s: driver pid %d SIGKILLs itself before moving the tags", ENV, os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)
