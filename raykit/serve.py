"""The import path of Serve configs written for raykit before its sub-packages:
`raykit.serve:app_builder` keeps working; new configs use `raykit.serving:app_builder`."""

import warnings

from raykit.serving.app import app_builder

warnings.warn(
    "raykit.serve:app_builder is now raykit.serving:app_builder", DeprecationWarning, stacklevel=2
)

__all__ = ["app_builder"]
