"""The `raykit` logger and the quieting of libraries' own output.

Imports neither Ray nor torch, so the model core (`raykit.core`) can use it; the console that
prints a run's events on the driver is `raykit.runtime.console`."""

from __future__ import annotations

import logging
import os
import sys
import warnings

logger = logging.getLogger("raykit")
VERBOSE_ENV = "RAYKIT_VERBOSE"
# transformers and peft import torchao (installed for --dtype int8) whenever it is present;
# torchao's optional CUDA kernels and torch.compile registrations then warn on every import, in
# every Ray worker. Errors still show.
NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_noisy_loggers() -> None:
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def quiet_libraries() -> None:
    """transformers' load reports and progress bars: off unless verbose. Called on the driver
    and in every process that loads a model (Ray's own notices: `runtime.console.quiet_ray`)."""
    if is_verbose():
        return
    quiet_noisy_loggers()
    # Read by transformers when it is imported, here or in a local Ray worker: a command's
    # driver need not import it (1.4 s of one core before Ray could start, on an AVX2 EPYC).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # imported already: tell it
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    # peft's merge asks transformers a deprecated question; nothing for a user to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    # "Token authentication is enabled" on every start of a local instance.
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
