"""Suite-wide test setup.

Without CUDA, Triton kernels can only run under the Triton interpreter, and Triton decides
that when a kernel is *decorated* (at import of ``kernels.triton_*``). Any test module may be
the first to import them (directly or through torchrec/fbgemm pulling in triton first), so the
flag is set here, in the root conftest that pytest loads before collecting any test module.
``torch.cuda.is_available`` does not create a CUDA context.

Order of the files: ``scripts/test.sh`` runs ``pytest -n <cores> --dist loadfile --no-loadscope-reorder``,
so xdist hands whole files to the workers in collection order, and the wall time is that of the
busiest worker. xdist's default reorder (most tests first) put files of one or two tests that run
for a minute or more (a crash-and-resume chain, the wheel install) last, where one worker ran them
alone while the other had finished. Longest first instead (LPT scheduling): the files of
``SLOWEST_FIRST`` lead, slowest first, and every other file keeps its place after them, so the
short files fill in at the end. The order only balances the workers: a stale entry costs time, never
a result. Refresh it from ``bash scripts/test.sh --durations=0`` (sum the seconds per file).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SLOWEST_FIRST = (
    "tests/dist/test_distributed_cli.py",
    "tests/dist/test_distributed_resume_cli.py",
    "tests/dist/test_pipeline.py",
    "tests/serving/test_distributed_job.py",
    "tests/kernels/test_attention_properties.py",
    "tests/dist/test_distributed_training.py",
    "tests/kernels/test_candidate_prefix_attention.py",
    "tests/reliability/test_train_crash.py",
    "tests/reliability/test_hostile_outputs.py",
    "tests/baselines/test_baselines_train.py",
    "tests/serving/test_cascade.py",
    "tests/test_packaging.py",
    "tests/train/test_train.py",
    "tests/kernels/test_attention_dispatch.py",
    "tests/kernels/test_jagged_causal_attention.py",
    "tests/reliability/test_hostile_reader.py",
    "tests/dist/test_meta_init.py",
    "tests/serving/test_ranking.py",
    "tests/evaluate/test_evaluate.py",
    "tests/serving/test_job.py",
    "tests/reliability/test_hostile_entry_points.py",
)
"""Test files of 8 s or more, slowest first (``bash scripts/test.sh --durations=0`` on 2 cores, seconds summed per
file)."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(SLOWEST_FIRST)}
    root = config.rootpath

    def file_rank(item: pytest.Item) -> int:
        return rank.get(item.path.relative_to(root).as_posix(), len(rank))

    items.sort(key=file_rank)  # stable: the tests of a file, and the other files, keep their order
