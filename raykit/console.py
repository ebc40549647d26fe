"""What a command prints: one `[raykit]` line per event, from the driver only.

By default Ray's worker output is not forwarded to the driver (`log_to_driver=False`), Ray's
own loggers stay at warning level and transformers/Hugging Face Hub print errors only: training
workers send their events (evaluations, progress, messages) to the driver through a Ray queue,
and `RunConsole` prints them there, once each. On a terminal a fine-tune shows a progress bar
(loss, lr, pairs/s, ETA); elsewhere (CI, `ray job logs`) every event is one plain line.
`--verbose` forwards and shows everything Ray and transformers print, as before.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
from typing import Any

logger = logging.getLogger("raykit")
VERBOSE_ENV = "RAYKIT_VERBOSE"
# transformers and peft import torchao (installed for --dtype int8) whenever it is present;
# torchao's optional CUDA kernels and torch.compile registrations then warn on every import, in
# every Ray worker. Errors still show.
NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_noisy_loggers() -> None:
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is at the time (pytest and typer swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_console(verbose: bool = False) -> None:
    """Driver side: `[raykit] message` lines on stdout; library internals quiet unless verbose.
    Local Ray workers inherit the environment set here."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("[raykit] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    quiet_libraries()


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def quiet_libraries() -> None:
    """transformers' load reports and progress bars, Ray's deprecation notices: off unless
    verbose. Called on the driver and in every worker process raykit starts."""
    if is_verbose():
        return
    quiet_noisy_loggers()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from ray.util.annotations import RayDeprecationWarning

        warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    except ImportError:
        pass
    # peft's merge asks transformers a deprecated question; nothing for a user to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    # "Token authentication is enabled" on every start of a local instance.
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)


def ray_init_options() -> dict[str, Any]:
    """Keyword arguments for `ray.init`: no worker output on the driver once `setup_console`
    asked for a quiet console (a library user who never called it keeps Ray's defaults)."""
    if os.environ.get(VERBOSE_ENV) != "0":
        return {}
    import ray

    return {"log_to_driver": False, "logging_config": ray.LoggingConfig(log_level="WARNING")}


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_line(event: dict[str, Any]) -> str:
    """The plain-text form of a training progress event."""
    return (
        f"step {event['step']}/{event['total_steps']} epoch {event['epoch']:.2f} "
        f"loss {event['loss']:.4f} lr {event['lr']:.2e} pairs/s {event['pairs_per_s']:.1f} "
        f"tokens/s {event['tokens_per_s']:.0f} padding {event['padding']:.1%} "
        f"eta {format_eta(event.get('eta_s'))}"
    )


def event_line(event: dict[str, Any]) -> str:
    """One line for any event a training worker sends."""
    if event["kind"] == "progress":
        return progress_line(event)
    if event["kind"] == "eval":
        values = " ".join(f"{k}={v:.4f}" for k, v in event["metrics"].items())
        return f"eval {event['label']} step {event['step']}: {values}".replace("  ", " ")
    return str(event["text"])


class RunConsole:
    """The driver's view of a fine-tune: drains the event queue that rank 0 writes to and prints
    each event once; on a terminal, progress events move a tqdm bar instead of printing lines."""

    def __init__(self, interactive: bool | None = None):
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self.interactive = sys.stdout.isatty() if interactive is None else interactive
        self.bar: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True, name="raykit-console")

    def __enter__(self) -> RunConsole:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._print_pending()
        if self.bar is not None:
            self.bar.close()
        import ray

        ray.kill(self.queue.actor)

    def _drain(self) -> None:
        while not self._stop.is_set():
            self._print_pending(wait=0.5)

    def _print_pending(self, wait: float | None = None) -> None:
        from ray.util.queue import Empty

        try:
            events = [self.queue.get(timeout=wait)] if wait else []
            events += self.queue.get_nowait_batch(self.queue.qsize())
        except Empty:
            return
        except Exception:  # the queue actor is gone (Ray shut down): nothing more to show
            self._stop.set()
            return
        for event in events:
            self.show(event)

    def show(self, event: dict[str, Any]) -> None:
        if event["kind"] == "progress" and self.interactive:
            self._move_bar(event)
            return
        line = event_line(event)
        if self.bar is not None:
            self.bar.write(f"[raykit] {line}")
        else:
            logger.info(line)

    def _move_bar(self, event: dict[str, Any]) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=event["total_steps"], initial=event.get("resumed_from", 0),
                            unit="step", dynamic_ncols=True, file=sys.stdout)  # fmt: skip
        self.bar.update(event["step"] - self.bar.n)
        self.bar.set_postfix_str(
            f"loss {event['loss']:.4f} lr {event['lr']:.2e} pairs/s {event['pairs_per_s']:.1f}"
        )


class EventSender:
    """Worker side: rank 0's events go to the driver's queue when there is one, else to the
    `raykit` logger (a Tune trial, or `train_loop_per_worker` used on its own)."""

    def __init__(self, queue: Any | None, enabled: bool):
        self.queue, self.enabled = queue, enabled

    def send(self, kind: str, **fields: Any) -> None:
        if not self.enabled:
            return
        event = {"kind": kind, **fields}
        if self.queue is not None:
            try:
                self.queue.put(event, timeout=30)
                return
            except Exception:  # the driver is gone; the run itself carries on
                self.queue = None
        logger.info(event_line(event))


class RowProgress:
    """Rows done of a known total with rate and ETA: a tqdm bar on a terminal (stderr), else
    one line every `every` seconds."""

    def __init__(self, total: int, label: str, unit: str = "rows", every: float = 30.0):
        from tqdm import tqdm

        self.total, self.label, self.unit, self.every = total, label, unit, every
        self.bar = tqdm(total=total, unit=unit, desc=label, file=sys.stderr, mininterval=2.0,
                        disable=None)  # fmt: skip
        self.started = self.last_log = time.time()

    def update(self, done: int) -> None:
        self.bar.update(done - self.bar.n)
        now = time.time()
        if self.bar.disable and now - self.last_log > self.every:
            rate = done / max(1e-9, now - self.started)
            eta = (self.total - done) / rate if rate else None
            logger.info(f"{self.label}: {done}/{self.total} {self.unit} ({rate:.1f}/s), "
                        f"eta {format_eta(eta)}")  # fmt: skip
            self.last_log = now

    def close(self) -> None:
        self.bar.close()


def summary_table(
    before: dict[str, float] | None, after: dict[str, float] | None, rows: list[tuple[str, str]]
) -> str:
    """The end-of-run table: eval before/after per measure, then `rows` as label/value."""
    lines = []
    metrics = list((after or before or {}).keys())
    if metrics:
        width = max(len(m) for m in metrics) + 2
        lines.append(" " * 17 + "".join(m.ljust(max(width, 9)) for m in metrics))
        for label, values in (("before training", before), ("after training", after)):
            if values:
                cells = "".join(f"{values[m]:.4f}".ljust(max(width, 9)) for m in metrics)
                lines.append(f"{label:<17}{cells}")
    lines += [f"{label:<17}{value}" for label, value in rows]
    return "\n".join(line.rstrip() for line in lines)


__all__ = [
    "setup_console",
    "quiet_libraries",
    "ray_init_options",
    "RunConsole",
    "EventSender",
    "RowProgress",
    "summary_table",
    "event_line",
    "logger",
]
