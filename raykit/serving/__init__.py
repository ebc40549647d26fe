"""Serving (`raykit serve`) on Ray Serve: the rerank APIs, batching queue and replicas.

`raykit.serving:app_builder` is the import path of a Serve config (`serve run`, KubeRay)."""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "app_builder":  # imported on use: `raykit.serving.queue` needs no Ray Serve
        from raykit.serving.app import app_builder

        return app_builder
    raise AttributeError(f"module 'raykit.serving' has no attribute {name!r}")
