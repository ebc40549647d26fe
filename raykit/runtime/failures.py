"""Finding the user's error (a ConfigError or DataError) inside Ray's wrappers, so that a bad
option or row raised in a task, an actor or a Ray Train worker prints as its one line."""

from __future__ import annotations

import re

import ray

from raykit.errors import ConfigError, DataError

_NAMED = re.compile(r"raykit\.errors\.(ConfigError|DataError): ([^\n]+)")


def user_error(exc: BaseException | None) -> ConfigError | DataError | None:
    """The ConfigError/DataError behind `exc`, if that is what it was.

    Ray wraps what a task raised (`RayTaskError`, also an instance of its cause's type), Ray
    Train what a worker raised (its `_base_exc`), and Ray keeps only the text of an actor
    constructor's error (`ActorDiedError`), which names the type.
    """
    seen, hops = exc, 0
    while seen is not None and hops < 8:
        hops += 1
        if isinstance(seen, ray.exceptions.RayTaskError):
            seen = seen.cause
            continue
        if isinstance(seen, (DataError, ConfigError)):
            return seen
        if isinstance(seen, ray.exceptions.ActorDiedError) and seen.actor_init_failed:
            found = _NAMED.search(str(seen))
            if found:
                return (ConfigError if found[1] == "ConfigError" else DataError)(found[2])
        seen = getattr(seen, "_base_exc", None) or seen.__cause__ or getattr(seen, "cause", None)
    return None
