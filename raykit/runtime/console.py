"""What a command prints: one `[raykit]` line per event, from the driver only.

By default Ray's worker output is not forwarded to the driver (`log_to_driver=False`), Ray's
own loggers stay at warning level and transformers/Hugging Face Hub print errors only: training
workers send their events (evaluations, progress, messages) to the driver through the run's
mailbox actor, and `RunConsole` prints them there, once each. On a terminal a fine-tune shows a
progress bar (loss, lr, pairs/s, ETA); elsewhere (CI, `ray job logs`) every event is one plain line.
`--verbose` forwards and shows everything Ray and transformers print, as before.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from raykit.runtime.logs import VERBOSE_ENV, is_verbose, logger, quiet_libraries


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
    quiet_ray()


def quiet_ray() -> None:
    """Ray's deprecation notices and Ray Data's advice on task concurrency (one input file
    reads in one task): off unless verbose (driver, training workers, actors)."""
    if is_verbose():
        return
    from ray.util.annotations import RayDeprecationWarning

    warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    warnings.filterwarnings(
        "ignore", message="The maximum number of concurrent tasks", category=UserWarning
    )


def quiet_ray_data() -> None:
    """Ray Data's plans, progress blocks and its "progress bars disabled" notice: off unless
    verbose, as commands print their own progress line. Ray Data sets its logger's level
    again at every execution, from RAY_DATA_LOG_LEVEL when set."""
    if is_verbose():
        return
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    logging.getLogger("ray.data").setLevel(os.environ["RAY_DATA_LOG_LEVEL"])
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def ray_init_options() -> dict[str, Any]:
    """Keyword arguments for `ray.init`: no worker output on the driver once `setup_console`
    asked for a quiet console (a library user who never called it keeps Ray's defaults)."""
    if os.environ.get(VERBOSE_ENV) != "0":
        return {}
    import ray

    return {"log_to_driver": False, "logging_config": ray.LoggingConfig(log_level="WARNING")}


# Printed (as an error) by the driver's Ray core worker for every actor that a Ray Data actor
# pool creates, whatever its arguments, since Ray Data puts its map function in the object store
# (ray-project/ray#57733); no setting turns it off.
ACTOR_ARGS_NOTICE = b"has constructor arguments in the object store and max_restarts > 0"


@contextmanager
def dropped_stderr_lines(*needles: bytes) -> Iterator[None]:
    """Drop the lines containing any of `needles` from what this process writes to its stderr
    (file descriptor 2, where Ray's C++ core writes too) while the block runs; everything else
    passes through as it comes. A no-op where descriptor 2 cannot be redirected."""
    try:
        saved = os.dup(2)
        read_end, write_end = os.pipe()
    except OSError:
        yield
        return
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)
    pump = threading.Thread(
        target=_pass_lines, args=(read_end, saved, needles), name="stderr-filter", daemon=True
    )
    pump.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last write end closes: the pump reads to its end
        pump.join(timeout=5)
        os.close(saved)


def _pass_lines(source: int, target: int, needles: tuple[bytes, ...]) -> None:
    """Copy `source` to `target` but the whole lines holding a needle; a line's unfinished tail
    waits for its end unless it is a progress bar's (ends in a carriage return)."""
    tail = b""
    with os.fdopen(source, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            *lines, tail = (tail + chunk).split(b"\n")
            out = b"".join(line + b"\n" for line in lines if not any(n in line for n in needles))
            if tail.endswith(b"\r"):
                out, tail = out + tail, b""
            _write_all(target, out)
    if not any(n in tail for n in needles):
        _write_all(target, tail)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def process_started_at() -> float:
    """When this process started (the user's launch, interpreter start and imports included),
    else now."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # no psutil, or the platform hides it
        return time.time()


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
        f"tokens/s {event['tokens_per_s']:.0f} mfu {event.get('mfu', 0):.1%} "
        f"padding {event['padding']:.1%} eta {format_eta(event.get('eta_s'))}"
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
    """The driver's view of a fine-tune: drains the run's mailbox (the `RunLock` actor, whose
    `put` rank 0 calls) and prints each event once; on a terminal, progress events move a tqdm
    bar instead of printing lines."""

    def __init__(self, mailbox: Any, interactive: bool | None = None):
        self.mailbox = mailbox
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

    def _drain(self) -> None:
        while not self._stop.is_set():
            self._print_pending(wait=0.5)

    def _print_pending(self, wait: float = 0.0) -> None:
        import ray

        try:
            events = ray.get(self.mailbox.take.remote(wait))
        except Exception:  # the mailbox is gone (Ray shut down): nothing more to show
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
            self.bar = tqdm(
                total=event["total_steps"],
                initial=event.get("resumed_from", 0),
                unit="step",
                dynamic_ncols=True,
                file=sys.stdout,
            )
        self.bar.update(event["step"] - self.bar.n)
        self.bar.set_postfix_str(
            f"loss {event['loss']:.4f} lr {event['lr']:.2e} pairs/s {event['pairs_per_s']:.1f}"
        )


class EventSender:
    """Worker side: rank 0's events go to the driver's mailbox when there is one, else to the
    `raykit` logger (a Tune trial, or `train_loop_per_worker` used on its own)."""

    def __init__(self, mailbox: Any | None, enabled: bool):
        self.mailbox, self.enabled = mailbox, enabled

    def send(self, kind: str, **fields: Any) -> None:
        if not self.enabled:
            return
        event = {"kind": kind, **fields}
        if self.mailbox is not None:
            import ray

            try:
                ray.get(self.mailbox.put.remote(event), timeout=30)
                return
            except Exception:  # the driver is gone; the run itself carries on
                self.mailbox = None
        logger.info(event_line(event))


class RowProgress:
    """Work done of a total (None: unknown) with rate and ETA: a tqdm bar on a terminal
    (stderr), else one `[raykit]` line every `every` seconds. The one progress helper of every
    command (mine's actors, `raykit score`)."""

    def __init__(
        self,
        total: int | None,
        label: str,
        unit: str = "rows",
        every: float = 30.0,
        mininterval: float = 2.0,
    ):
        from tqdm import tqdm

        self.total, self.label, self.unit, self.every = total, label, unit, every
        self.bar = tqdm(
            total=total,
            unit=unit,
            desc=label,
            file=sys.stderr,
            mininterval=mininterval,
            disable=None,
        )
        self.started = self.last_log = time.time()

    def eta(self, done: int) -> float | None:
        """Seconds left at the rate so far (None while nothing is done or the total unknown)."""
        if not self.total or not done:
            return None
        return (self.total - done) * (time.time() - self.started) / done

    def update(
        self, done: int, postfix: str = "", line: Callable[[float | None], str] | None = None
    ) -> None:
        """`done` so far; `postfix` goes on the bar, `line(eta)` replaces the plain line."""
        self.bar.update(done - self.bar.n)
        if postfix:
            self.bar.set_postfix_str(postfix, refresh=False)
        now = time.time()
        if self.bar.disable and now - self.last_log > self.every:
            if line is None:
                rate = done / max(1e-9, now - self.started)
                logger.info(
                    f"{self.label}: {done}/{self.total} {self.unit} ({rate:.1f}/s), "
                    f"eta {format_eta(self.eta(done))}"
                )
            else:
                logger.info(line(self.eta(done)))
            self.last_log = now

    def close(self) -> None:
        self.bar.close()


def text_table(rows: Sequence[Sequence[str]], first_width: int = 0) -> str:
    """Plain-text columns, left-aligned, two spaces apart (the first at least `first_width`
    wide): the one table printer of the end-of-run tables."""
    if not rows:
        return ""
    columns = max(len(row) for row in rows)
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(columns)]
    widths[0] = max(widths[0], first_width - 2)
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def summary_table(
    before: dict[str, float] | None, after: dict[str, float] | None, rows: list[tuple[str, str]]
) -> str:
    """The end-of-run table: eval before/after per measure, then `rows` as label/value."""
    metrics = list((after or before or {}).keys())
    width = max([len(label) for label, _ in rows] + [len("before training")]) + 2
    evals = [
        [label, *(f"{values[m]:.4f}" for m in metrics)]
        for label, values in (("before training", before), ("after training", after))
        if values
    ]
    parts = [text_table([["", *metrics], *evals], width)] if metrics else []
    parts += [text_table([list(row) for row in rows], width)] if rows else []
    return "\n".join(parts)
