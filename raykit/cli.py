"""The `raykit` command line. Each command's options are generated from its config dataclass.

FlagEmbedding/HF habits are accepted as they are: `--fp16`, `--fp16 True`, `--fp16=false`,
`--train_data a.jsonl b.jsonl`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import typer

from raykit.config import (
    RENAMED_KEYS,
    Adapters,
    CompileCache,
    ConfigError,
    Console,
    EvaluateConfig,
    FinetuneConfig,
    ForwardBudget,
    Metrics,
    MineConfig,
    MixConfig,
    ModelLoading,
    Precision,
    RetrieveConfig,
    ScoreConfig,
    ServeConfig,
    TokenLimits,
    Tracking,
    TuneConfig,
    field_type,
    load_config,
)
from raykit.errors import DataError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune, sweep, score and serve cross-encoder rerankers on Ray; mine; mix.",
)
COMMAND_CONFIGS: dict[str, type] = {}
# When the user launched this process (set by `main`): start-up times count from there.
LAUNCHED_AT: float | None = None
SHARED_GROUPS = (
    CompileCache,
    ModelLoading,
    Precision,
    TokenLimits,
    ForwardBudget,
    Metrics,
    Tracking,
    Adapters,
    Console,
)
_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """Rewrite HF-style `--flag True` and `--list a b` into the click forms."""
    argv = list(argv)
    cls = COMMAND_CONFIGS.get(argv[0]) if argv else None
    if cls is None:
        return argv
    kinds = {f.name: field_type(cls, f.name) for f in dataclasses.fields(cls)}
    out, i = [argv[0]], 1
    while i < len(argv):
        token = argv[i]
        name, _, inline = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        if name in RENAMED_KEYS and RENAMED_KEYS[name] in kinds:
            typer.echo(f"[raykit] warning: --{name} is now --{RENAMED_KEYS[name]}", err=True)
            name = RENAMED_KEYS[name]
            token = f"--{name}" + (f"={inline}" if inline else "")
        kind = kinds.get(name)
        if kind is bool:
            value = inline or (argv[i + 1] if i + 1 < len(argv) else "")
            consumed = not inline and value.lower() in _TRUE | _FALSE
            out.append(f"--no-{name}" if value.lower() in _FALSE else f"--{name}")
            i += 2 if consumed else 1
        elif kind is list:
            values = [inline] if inline else []
            i += 1
            while not inline and i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            for value in values:
                out += [f"--{name}", value]
        else:
            out.append(token)
            i += 1
    return out


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def help_panel(cls: type, name: str) -> str:
    """The --help section of a field: the option group's (Precision, Token limits, ...) for a
    shared one, "Options" for the command's own."""
    for group in SHARED_GROUPS:
        if issubclass(cls, group) and name in {f.name for f in dataclasses.fields(group)}:
            return group.panel
    return "Options"


def config_command(
    name: str,
    cls: type,
    help: str,
    prepare: Callable[[Any], None] | None = None,
    beside_checks: Callable[[Any, bool], None] | None = None,
) -> Callable:
    """Register a command whose options are `--config` plus one flag per field of `cls`.

    `prepare(cfg)` (the command's imports and checks) runs while Ray starts, for a command whose
    config says it needs Ray (`ray_cpus`): on a 2-core laptop that is 2 s off every start.
    `beside_checks(cfg, local)` runs once Ray is up, while `prepare` may still run (see
    `init_ray_beside`).
    """

    def decorator(run: Callable[[Any], None]) -> Callable:
        params = [
            inspect.Parameter(
                "config",
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(
                    None, "--config", help="YAML file with any of the keys below."
                ),
                annotation=Optional[Path],  # noqa: UP045 (typer reads runtime annotations)
            )
        ]
        for f in dataclasses.fields(cls):
            kind = field_type(cls, f.name)
            names = [f"--{f.name}/--no-{f.name}"] if kind is bool else [f"--{f.name}"]
            option = typer.Option(
                None,
                *names,
                help=f.metadata.get("help", ""),
                rich_help_panel=help_panel(cls, f.name),
            )
            annotation: Any = Optional[list[str] if kind is list else kind]  # noqa: UP045
            params.append(
                inspect.Parameter(
                    f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation
                )
            )

        def command(**kwargs: Any) -> None:
            config_path = kwargs.pop("config")
            try:  # options, and the light checks of the files they name: usage errors
                cfg = load_config(cls, config_path, **kwargs)
                cfg.check_files()
            except (ConfigError, DataError, OSError) as exc:
                _fail(str(exc), code=2)
            from raykit.runtime.console import setup_console

            setup_console(cfg.verbose)
            try:
                if prepare is not None and (cpus := cfg.ray_cpus()) is not None:
                    from raykit.runtime.cluster import init_ray_beside

                    then = beside_checks and (lambda local: beside_checks(cfg, local))
                    init_ray_beside(lambda: prepare(cfg), cpus, then)
                run(cfg)
            except (ConfigError, DataError, FileNotFoundError, OSError) as exc:
                _fail(str(exc))

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__name__ = name
        command.__doc__ = help
        COMMAND_CONFIGS[name] = cls
        app.command(name, help=help)(command)
        return run

    return decorator


def _prepare_finetune(cfg: FinetuneConfig) -> None:
    from raykit.training.launch import check_inputs

    check_inputs(cfg)


@config_command(
    "finetune",
    FinetuneConfig,
    "Fine-tune a cross-encoder with Ray Train.",
    prepare=_prepare_finetune,
)
def finetune_command(cfg: FinetuneConfig) -> None:
    from raykit.training.launch import finetune

    result = finetune(cfg, launched_at=LAUNCHED_AT)
    typer.echo(finetune_table(cfg, result))


def finetune_table(cfg: FinetuneConfig, result: Any) -> str:
    """The end-of-run table: eval before and after, best step, throughput, where things went."""
    from raykit.runtime.console import summary_table

    summary, best = result.summary, result.best_metrics
    evals = summary.get("eval") or []
    after = {k: v for k, v in evals[-1].items() if k != "step"} if evals else None
    rows = []
    if evals:
        metric = cfg.metric_for_best_model
        rows.append(("best step", f"{best.get('step')} ({metric} {best.get(metric, 0):.4f})"))
    seconds, pairs = summary.get("train_seconds") or 0, summary.get("pairs_trained") or 0
    rows.append(
        (
            "throughput",
            f"{pairs / max(seconds, 1e-9):.1f} pairs/s ({pairs} pairs, "
            f"{summary.get('steps')} steps in {seconds:.1f} s)",
        )
    )
    first = summary.get("time_to_first_step_s")
    if first is not None:
        rows.append(("first step", f"{first:.1f} s after launch"))
    rows.append(("model", result.output_dir))
    if "tensorboard" in cfg.backends:
        rows.append(("tensorboard", f"tensorboard --logdir {result.logging_dir}"))
    return summary_table(summary.get("eval_before"), after, rows)


def _prepare_tune(cfg: TuneConfig) -> None:
    import raykit.training.tune  # noqa: F401  (its checks write output_dir: they run after)


@config_command(
    "tune",
    TuneConfig,
    "Sweep finetune settings with Ray Tune; best model to OUTPUT/best.",
    prepare=_prepare_tune,
)
def tune_command(cfg: TuneConfig) -> None:
    from raykit.training.tune import run_sweep

    run_sweep(cfg)


@config_command(
    "evaluate", EvaluateConfig, "Measure a model on groups, or a TREC run against qrels."
)
def evaluate_command(cfg: EvaluateConfig) -> None:
    from raykit.scoring.evaluate import run_evaluate

    metrics = run_evaluate(cfg)
    typer.echo(json.dumps({k: round(v, 4) for k, v in metrics.items()}))


def _prepare_score(cfg: ScoreConfig) -> None:
    from raykit.scoring.pipeline import check_inputs

    if not cfg.run:  # a TREC run is checked as it is read
        check_inputs(cfg)


@config_command(
    "score",
    ScoreConfig,
    "Rescore (query, passage) pairs, groups or a TREC run with Ray Data.",
    prepare=_prepare_score,
)
def score_command(cfg: ScoreConfig) -> None:
    from raykit.scoring.pipeline import ScoreError, run_score
    from raykit.scoring.trec import run_score_trec

    try:
        run_score_trec(cfg) if cfg.run else run_score(cfg, launched_at=LAUNCHED_AT)
    except ScoreError as exc:
        _fail(str(exc))


@config_command("bm25", RetrieveConfig, "First-stage BM25 run (TREC) over BEIR queries/corpus.")
def bm25_command(cfg: RetrieveConfig) -> None:
    from raykit.mining.bm25 import run_bm25

    run_bm25(cfg)


def _prepare_serve(cfg: ServeConfig) -> None:
    from raykit.serving.app import check_inputs

    check_inputs(cfg)


def _start_serve(cfg: ServeConfig, local: bool) -> None:
    """Serve's controller and proxy (seconds of process starts) while the checks run; only on
    this command's own local instance, which a failed check shuts down with them."""
    if local:
        from raykit.serving.app import start_serve

        start_serve(cfg)


@config_command(
    "serve",
    ServeConfig,
    "Serve a reranking HTTP API on Ray Serve until Ctrl-C.",
    prepare=_prepare_serve,
    beside_checks=_start_serve,
)
def serve_command(cfg: ServeConfig) -> None:
    if cfg.rollout:  # switch the running app to new checkpoints, in place
        from raykit.serving.rollout import run_rollout

        run_rollout(cfg)
        return
    from raykit.serving.app import run_serve

    run_serve(cfg, launched_at=LAUNCHED_AT)


@config_command("mine", MineConfig, "Mine hard negatives (BM25 or dense) into training groups.")
def mine_command(cfg: MineConfig) -> None:
    from raykit.mining.mine import run_mine

    run_mine(cfg)


@config_command("mix", MixConfig, "Average models of one architecture (LM-Cocktail merging).")
def mix_command(cfg: MixConfig) -> None:
    from raykit.tools.mix import run_mix

    run_mix(cfg)


def main(argv: Sequence[str] | None = None) -> None:
    """The console script's (and `jobs/*.py`'s) entry point."""
    from raykit.runtime.console import process_started_at

    global LAUNCHED_AT
    LAUNCHED_AT = process_started_at()
    args = normalize_argv(sys.argv[1:] if argv is None else argv)
    app(args=args, prog_name="raykit")


if __name__ == "__main__":
    main()
