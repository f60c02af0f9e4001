"""Where problems come from: dataset loaders, procedural generators, hard sets.

    from soar_env.data import load_problems
    pool = load_problems("generator:addition,fraction@2-4#200%0")

`load_problems` takes the same source spec a CLI ``--source`` option does (a jsonl path,
``hf:NAME[:SPLIT]`` or ``generator:...``; see `SPEC_HELP`). Everything returns
`soar_env.problems.Problem` lists with final answers only. A hard pool is split into train
(Q_R) and test (the benchmarks) in one place, `split_pool`, through `hard_splits`.
"""

from soar_env.data.generators import FAMILIES, generate, sample_problems
from soar_env.data.hardset import hard_splits, load_hard_pool, split_pool
from soar_env.data.loaders import SPEC_HELP, load_hf_dataset, load_jsonl, load_problems, save_jsonl

__all__ = [
    "FAMILIES",
    "SPEC_HELP",
    "generate",
    "hard_splits",
    "load_hard_pool",
    "load_hf_dataset",
    "load_jsonl",
    "load_problems",
    "sample_problems",
    "save_jsonl",
    "split_pool",
]
