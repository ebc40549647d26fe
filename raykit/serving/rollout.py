"""`raykit serve --rollout --model NEW`: switch a running app to new checkpoints in place.

The running app's own options are read back from its ingress and the app is deployed again
with only the models' checkpoints changed. Those live in each model deployment's user_config,
so Serve applies the change as a lightweight update, replica by replica, without restarting
any (`RerankerModel.reconfigure`): each loads the new checkpoint beside the old one, which
keeps serving, and switches when it is ready. No request fails, and each is wholly the old
model's or the new one's. This returns when every replica serves the new checkpoint.
"""

from __future__ import annotations

import time

from ray import serve

from raykit.config import ConfigError, ServeConfig
from raykit.core.served import ServedModel, parse_models
from raykit.runtime.logs import logger

ROLLOUT_TIMEOUT_S = 900.0  # a compiling replica on a busy CPU takes minutes
# Replies in a row from a deployment, all from the new checkpoint, that end the wait: Serve
# routes each call to a replica at random, so this many means every replica with near
# certainty (and the replica itself says when it has nothing left loading).
SETTLED_REPLIES = 12


def run_rollout(cfg: ServeConfig) -> None:
    """Roll the app `cfg.app_name` on the running cluster over to `cfg.model`."""
    import ray

    from raykit.runtime.console import ray_init_options
    from raykit.serving.app import build_served, check_models

    started = time.perf_counter()
    cfg.check_paths()
    check_models(cfg)
    if not ray.is_initialized():
        try:
            ray.init(address="auto", **ray_init_options())
        except ConnectionError:
            raise ConfigError(
                "rollout: no Ray cluster is running here; start the server first"
            ) from None
    try:
        ingress = serve.get_app_handle(cfg.app_name)
    except Exception:  # RayServeException: no such app (or no Serve at all)
        raise ConfigError(f"rollout: no app {cfg.app_name!r} is serving on this cluster") from None
    state = ingress.serving_state.remote().result()
    running = ServeConfig(**state["options"])
    served = new_checkpoints(state["sources"], cfg)
    changed = [m for m in served if m.path != state["sources"][m.name]]
    if not changed:
        logger.info("rollout: every model already serves these checkpoints")
        return
    prefix = live_route_prefix(cfg.app_name) or running.route_prefix
    serve.run(build_served(running, served), name=cfg.app_name, route_prefix=prefix)
    for model in changed:
        revision = wait_for_checkpoint(cfg.app_name, model)
        logger.info(f"rollout: {model.name} serves revision {revision} on every replica")
    logger.info(f"rollout done in {time.perf_counter() - started:.1f} s")


def live_route_prefix(app_name: str) -> str | None:
    """The route prefix the app is served under now (`serve run` or a config file may have
    set one other than its args'), so a rollout never moves it."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    return (details.get("applications", {}).get(app_name) or {}).get("route_prefix")


def new_checkpoints(sources: dict[str, str], cfg: ServeConfig) -> list[ServedModel]:
    """The running models, with the checkpoints `cfg.model` names. One model running: a plain
    PATH replaces it. Several: NAME=PATH items replace those models; the others keep theirs."""
    names = list(sources)
    if len(names) == 1 and len(cfg.model) == 1 and "=" not in cfg.model[0]:
        return [ServedModel(names[0], cfg.model[0])]
    updates = {m.name: m.path for m in parse_models(cfg.model)}
    unknown = sorted(set(updates) - set(names))
    if unknown:
        raise ConfigError(
            f"rollout: {', '.join(unknown)} not served by {cfg.app_name!r} "
            f"(it serves {', '.join(names)}); give NAME=PATH for a served model"
        )
    return [ServedModel(name, updates.get(name, path)) for name, path in sources.items()]


def wait_for_checkpoint(app_name: str, model: ServedModel) -> str:
    """Poll the model's replicas until `SETTLED_REPLIES` in a row serve `model.path` with
    nothing loading; its revision. A replica that failed to load it raises."""
    handle = serve.get_deployment_handle(model.deployment, app_name)
    deadline = time.monotonic() + ROLLOUT_TIMEOUT_S
    settled = 0
    while time.monotonic() < deadline:
        info = handle.info.remote().result()
        if info["rollout_error"] and info["loading"] is None and info["source"] != model.path:
            raise ConfigError(f"rollout: {model.name} failed to load: {info['rollout_error']}")
        done = info["source"] == model.path and info["loading"] is None
        settled = settled + 1 if done else 0
        if settled >= SETTLED_REPLIES:
            return info["revision"]
        time.sleep(0.05 if done else 0.5)
    raise ConfigError(f"rollout: {model.name} did not switch within {ROLLOUT_TIMEOUT_S:.0f} s")
