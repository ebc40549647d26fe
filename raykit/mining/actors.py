"""Running a model over many rows on a pool of Ray Data actors (embedding, filtering)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from raykit.config import MineConfig
from raykit.runtime.console import ACTOR_ARGS_NOTICE, RowProgress, dropped_stderr_lines

ROWS_PER_BLOCK = 256  # unit of work of an embedding or filter actor


def map_on_actors(columns: dict[str, list], actor: type, cfg: MineConfig, output: str) -> list:
    """Run `actor` over the rows on a Ray Data actor pool; its `output` column, in row order."""
    n = len(next(iter(columns.values())))
    table = pa.table({"row": np.arange(n), **columns})
    blocks = [table.slice(i, ROWS_PER_BLOCK) for i in range(0, n, ROWS_PER_BLOCK)]
    dataset = ray.data.from_arrow(blocks).map_batches(
        actor,
        batch_size=ROWS_PER_BLOCK,
        batch_format="numpy",
        fn_constructor_kwargs={"cfg": cfg},
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=1 if cfg.use_gpu else 0,
    )
    values: list = [None] * n
    progress, done = RowProgress(n, f"mine: {actor.__name__}"), 0
    with dropped_stderr_lines(ACTOR_ARGS_NOTICE):
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for row, value in zip(batch["row"], batch[output], strict=True):
                values[int(row)] = value
            done += len(batch["row"])
            progress.update(done)
    progress.close()
    return values
