"""The one parallel configuration: a mesh, the batch split and the per-step choices. The solver
prices it (`autoplan.costmodels.pipeline`), a Plan is one plus its layer placement, a runner-up
is one plus why it lost, and the bench reports one per candidate.

    >>> config = ParallelConfig(mesh={"dp": 2, "pp": 2, "tp": 4}, micro_batch_size=1, num_micro_batches=8)
    >>> config.mesh, config.world_size, config.num_stages
    ({'dp': 2, 'pp': 2, 'tp': 4}, 16, 2)
    >>> config.replace(zero_stage=1).zero_stage
    1

`layout_stages` is the one place that says which blocks each pipeline stage holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from autoplan.schema.constraints import Schedule

MESH_AXES = ("dp", "pp", "tp")
Item = TypeVar("Item")


class ParallelConfig(BaseModel):
    """Everything of a plan but the layer placement; `dp`, `tp`, `pp` read the mesh."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mesh: dict[str, int]
    """{"dp": .., "pp": .., "tp": ..}; the product is the world size."""
    micro_batch_size: int
    """Sequences per micro-batch per data-parallel rank."""
    num_micro_batches: int
    """Micro-batches per step per data-parallel rank: global batch / (dp * micro_batch_size)."""
    schedule: Schedule = "1f1b"
    virtual_stages: int = 1
    zero_stage: int = 0
    sequence_parallel: bool = False
    param_dtype: str = "float32"
    grad_reduce_dtype: str = "float32"

    @property
    def dp(self) -> int:
        return self.mesh["dp"]

    @property
    def tp(self) -> int:
        return self.mesh["tp"]

    @property
    def pp(self) -> int:
        return self.mesh["pp"]

    @property
    def world_size(self) -> int:
        return self.mesh["dp"] * self.mesh["pp"] * self.mesh["tp"]

    @property
    def num_stages(self) -> int:
        """Pipeline stages: pp * virtual_stages; stage s runs on pipeline rank s % pp."""
        return self.mesh["pp"] * self.virtual_stages

    def replace(self, **changes: Any) -> ParallelConfig:
        """A validated copy with `changes`."""
        return ParallelConfig(**{**self.parallel_fields(), **changes})

    def parallel_fields(self) -> dict[str, Any]:
        """This configuration's own fields (a Plan's or a runner-up's, without their others)."""
        return {name: getattr(self, name) for name in ParallelConfig.model_fields}

    def parallel_config(self) -> ParallelConfig:
        """The ParallelConfig alone (of a Plan: without its placement)."""
        return ParallelConfig(**self.parallel_fields())


def layout_stages(
    blocks: Sequence[Item],
    rank_counts: Sequence[int],
    virtual_stages: int,
    head: Sequence[Item] = (),
    tail: Sequence[Item] = (),
) -> list[list[Item]]:
    """The pp * v stages in model order: pipeline rank r holds `rank_counts[r]` of `blocks`,
    split into v chunks as evenly as possible (the first chunks one longer); stage s is chunk
    s // pp of rank s % pp; `head` opens stage 0 and `tail` closes the last stage.

    >>> layout_stages(["b0", "b1", "b2", "b3", "b4"], [3, 2], 1, head=["emb"], tail=["out"])
    [['emb', 'b0', 'b1', 'b2'], ['b3', 'b4', 'out']]
    >>> layout_stages(list(range(8)), [4, 4], 2)
    [[0, 1], [2, 3], [4, 5], [6, 7]]
    """
    pp = len(rank_counts)
    if sum(rank_counts) != len(blocks):
        raise ValueError(f"rank_counts {list(rank_counts)} sum to {sum(rank_counts)}, not the {len(blocks)} blocks")
    chunks = [even_counts(count, virtual_stages) for count in rank_counts]
    stages: list[list[Item]] = []
    start = 0
    for stage in range(pp * virtual_stages):
        count = chunks[stage % pp][stage // pp]
        stages.append(list(blocks[start : start + count]))
        start += count
    stages[0][:0] = head
    stages[-1].extend(tail)
    return stages


def even_counts(num_blocks: int, parts: int) -> list[int]:
    """`num_blocks` over `parts` as evenly as possible, the first parts one longer.

    >>> even_counts(10, 4)
    [3, 3, 2, 2]
    """
    return [num_blocks // parts + (index < num_blocks % parts) for index in range(parts)]
