"""Operator mistakes around output directories, checkpoints and scoring outputs, run as real CLI processes (``cli_runner``).

No data loss (an output dir overlapping an input is refused, ``overwrite=true`` included), no silently
wrong model (retention keeps the newest checkpoint, ``resume=false`` into an old run is refused, a resume
of another run configuration is refused), no exit 0 on a wrong setting (``+train.foo``, ``max_len``), and
clear errors instead of raw crashes (a text file named ``step_5.pt``, a full disk, two jobs in one dir).

Every reported case runs as a real CLI process. The CLI runs are independent, so one module fixture
launches them together (three at a time) and every test
asserts on its own result; the inputs' SHA-256 digests are taken before the batch and compared after it.
Variants of the same checks (other kinds of overlap, the scoring lock, a fresh run, a resume skipping a
bad file) run in-process on the same files, which costs no imports.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hostile_helpers import LOCK_HOLDER, ROOT, assert_refused, file_digests, run_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from recsys.data import prepare_dataset
from recsys.errors import InputError
from recsys.reliability.atomic import OutOfSpaceError, atomic_write_bytes
from recsys.reliability.checkpoint import CheckpointManager, load_checkpoint
from recsys.reliability.rundir import LOCK_NAME, check_output_dir, lock_run_dir
from recsys.reliability.strict_config import unknown_keys
from recsys.serving.config import ScoreConfig
from recsys.serving.config import register_configs as register_score
from recsys.serving.job import resolve_checkpoint, run_scoring
from recsys.testing import torch_threads
from recsys.train.config import RunConfig, register_configs, run_fingerprint
from recsys.train.loop import train

register_configs()
register_score()
CONFIGS = ROOT / "configs"
ARGS = ["model=debug", "model.attention_backend=torch", "data=tiny", "train.progress=false",
        "data.loader.batch_size=16", "train.log_every=1", "train.optim.warmup_steps=2"]
TRAINED_STEPS = 6  # the shared run: checkpoints step_3.pt and step_6.pt


def run_digests(run: Path) -> dict[str, str]:
    """Digests of a run directory without its lock file (each process that takes the lock writes its pid)."""
    return {k: v for k, v in file_digests(run).items() if Path(k).name != LOCK_NAME}


def train_args(data_root: Path, out: Path, *extra: str) -> list[str]:
    return [*ARGS, f"data.root={data_root}", f"output_dir={out}", *extra]


FILE_SIZE_LIMIT = {resource.RLIMIT_FSIZE: 256 * 1024}
"""RLIMIT_FSIZE of 256 KiB in the child, so writing the ~1 MB checkpoint of the debug model fails with EFBIG, a
real failed write as on a full disk (Python ignores SIGXFSZ: the write raises instead of killing the process)."""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A prepared tiny dataset and one trained run (step_3.pt, step_6.pt), shared by every test."""
    tmp = tmp_path_factory.mktemp("hostile_outputs")
    w = {"tmp": tmp, "data_root": tmp / "data", "run": tmp / "run"}
    cfg = train_config(w, w["run"], f"train.max_steps={TRAINED_STEPS}", "train.checkpoint_every=3")
    w["dataset"] = prepare_dataset(cfg.data, progress=False).path
    with torch_threads(1):
        train(cfg)
    return w


def train_config(world: dict[str, Path], out: Path, *extra: str) -> RunConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return OmegaConf.to_object(compose("train", overrides=train_args(world["data_root"], out, *extra)))


def score_config(world: dict[str, Path], out: Path, *extra: str) -> ScoreConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return OmegaConf.to_object(compose("score", overrides=[f"checkpoint={world['run']}", f"output_dir={out}",
                                                               "progress=false", *extra]))


def copy_run(world: dict[str, Path], name: str) -> Path:
    dst = world["tmp"] / name
    shutil.copytree(world["run"], dst)
    return dst


def _commands(w: dict[str, Path]) -> dict[str, tuple[str, list[str]]]:
    """The independent CLI runs of this file, one per reported case: name -> (module, overrides)."""
    tmp, ds, run, root = w["tmp"], w["dataset"], w["run"], w["data_root"]
    (tmp / "junk" / "checkpoints").mkdir(parents=True)
    (tmp / "junk" / "checkpoints" / "step_5.pt").write_text("not a checkpoint\n")
    for name in ("run-resume-false", "run-other-config"):
        copy_run(w, name)
    score = [f"checkpoint={run}", "progress=false"]
    return {
        "score_into_its_input": ("recsys.score", [*score, f"inputs=[{ds / 'test'}]", f"output_dir={ds / 'test'}",
                                                  "overwrite=true"]),
        "score_max_len": ("recsys.score", [*score, f"output_dir={tmp / 'score-max-len'}", "max_len=1000000000"]),
        "score_text_checkpoint": ("recsys.score", [f"checkpoint={tmp / 'junk' / 'checkpoints' / 'step_5.pt'}",
                                                   f"output_dir={tmp / 'score-junk'}", "progress=false"]),
        "train_resume_false": ("recsys.train", train_args(root, tmp / "run-resume-false", "train.resume=false",
                                                          "train.max_steps=2")),
        "train_other_config": ("recsys.train", train_args(root, tmp / "run-other-config", "data.synthetic.seed=5",
                                                          "train.optim.dense_lr=0.01")),
        "train_unknown_key": ("recsys.train", train_args(root, tmp / "run-unknown-key", "+train.foo=1")),
        "train_locked": ("recsys.train", train_args(root, tmp / "run-locked", "train.max_steps=2")),
    }


@pytest.fixture(scope="module")
def cli(world) -> dict[str, subprocess.CompletedProcess | dict]:
    """Runs the disk-full training and every command of :func:`_commands`, three at a time, while another
    process holds the lock of ``run-locked``; inputs' digests are taken before and returned with the results."""
    commands = _commands(world)
    tmp = world["tmp"]
    before = {"data": file_digests(world["data_root"]), "run": run_digests(world["run"]),
              **{name: run_digests(tmp / name) for name in ("run-resume-false", "run-other-config")}}
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp / "run-locked")], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout.readline().strip() == "locked"
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            full = pool.submit(run_cli, "recsys.train", *train_args(world["data_root"], tmp / "run-disk-full",
                                                                   "train.max_steps=2"), rlimits=FILE_SIZE_LIMIT)
            futures = {name: pool.submit(run_cli, module, *args) for name, (module, args) in commands.items()}
            results: dict = {name: f.result() for name, f in futures.items()}
            results["train_disk_full"] = full.result()
    finally:
        holder.kill()
        holder.wait()
    results["holder_pid"] = holder.pid
    results["before"] = before
    return results


# ------------------------------------------------------------------------------------- no data loss
def test_no_command_modified_the_dataset_or_the_trained_run(world, cli):
    assert file_digests(world["data_root"]) == cli["before"]["data"]
    assert run_digests(world["run"]) == cli["before"]["run"]


def test_score_into_its_own_input_split_is_refused(world, cli):
    test_dir = world["dataset"] / "test"
    assert_refused(cli["score_into_its_input"], f"output_dir={test_dir}", "never writes into its inputs")
    assert sorted(p.name for p in test_dir.iterdir()) == ["part-00000.parquet"]  # nothing deleted nor added


def test_score_into_a_symlink_to_the_dataset_is_refused(world, tmp_path):
    """inputs default to the checkpoint's dataset; output_dir is a link to that dataset's root (which holds
    its summary.json): refused, in-process (the CLI path of the same check is the test above)."""
    link = tmp_path / "dataset-link"
    link.symlink_to(world["dataset"], target_is_directory=True)
    before = file_digests(world["dataset"])
    with pytest.raises(InputError, match=f"is the input dataset={world['dataset']}"), torch_threads(1):
        run_scoring(score_config(world, link, "overwrite=true"))
    assert file_digests(world["dataset"]) == before


def test_overwrite_never_deletes_files_no_scoring_job_wrote(world, tmp_path):
    target = tmp_path / "not-an-input"  # a copy of a split: part-00000.parquet, but no input of this job
    shutil.copytree(world["dataset"] / "valid", target)
    before = file_digests(target)
    cfg = score_config(world, target, f"inputs=[{world['dataset'] / 'test'}]", "overwrite=true")
    with pytest.raises(InputError, match=r"part-00000\.parquet but no _job\.json"), torch_threads(1):
        run_scoring(cfg)
    assert run_digests(target) == before  # (plus the job's lock file)


@pytest.mark.parametrize("rel", ["equal", "inside", "contains", "symlink"])
def test_check_output_dir_refuses_every_overlap(tmp_path, rel):
    data = tmp_path / "data"
    (data / "split").mkdir(parents=True)
    (tmp_path / "link").symlink_to(data)
    out = {"equal": data, "inside": data / "split" / "out", "contains": tmp_path,
           "symlink": tmp_path / "link" / "x"}[rel]
    with pytest.raises(InputError, match="never writes into its inputs"):
        check_output_dir(out, [("data.root", data)])
    assert check_output_dir(tmp_path / "elsewhere", [("data.root", data)]) == (tmp_path / "elsewhere").resolve()


# ------------------------------------------------------------------------------ no silently wrong model
def test_resume_false_into_a_run_with_checkpoints_is_refused(world, cli):
    run = world["tmp"] / "run-resume-false"
    assert_refused(cli["train_resume_false"], f"output_dir={run}", "step_6.pt", "train.fresh_run=true")
    assert run_digests(run) == cli["before"]["run-resume-false"]


def test_fresh_run_moves_the_old_run_aside_and_keeps_its_own_newest_checkpoint(world, capsys):
    run = copy_run(world, "run-fresh")
    before = run_digests(run)
    with torch_threads(1):
        train(train_config(world, run, "train.fresh_run=true", "train.max_steps=2", "train.checkpoint_every=1",
                           "train.keep_checkpoints=1"))
    previous = sorted(run.glob("previous-*"))
    assert len(previous) == 1 and f"moved to {previous[0]}" in capsys.readouterr().out
    assert run_digests(previous[0]) == before  # every old file, byte for byte
    assert [p.name for p in CheckpointManager(run / "checkpoints").paths()] == ["step_2.pt"]  # keep=1: the newest
    assert json.loads((run / "report.json").read_text())["steps"] == 2
    assert resolve_checkpoint(run) == (run / "checkpoints" / "step_2.pt").resolve()  # what recsys.score scores


def test_retention_never_deletes_the_checkpoint_just_written(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=1)
    (tmp_path / "step_216.pt").write_bytes(b"a checkpoint numbered above this run's")
    for s in (3, 5):
        mgr.save(s, {"step": s})
    assert sorted(p.name for p in mgr.paths()) == ["step_216.pt", "step_5.pt"]
    assert load_checkpoint(tmp_path / "step_5.pt")["step"] == 5


def test_resume_of_another_run_configuration_is_refused_naming_the_keys(world, cli):
    run = world["tmp"] / "run-other-config"
    assert_refused(cli["train_other_config"], str(run / "checkpoints" / "step_6.pt"),
                   "data.synthetic.seed: checkpoint 0 != now 5", "train.optim.dense_lr")
    assert run_digests(run) == cli["before"]["run-other-config"]
    assert sorted(p.name for p in world["data_root"].iterdir()) == [world["dataset"].name]  # no seed-5 dataset


def test_fingerprint_ignores_length_and_logging_but_not_the_model(world):
    state = load_checkpoint(world["run"] / "checkpoints" / "step_6.pt")
    base = state["config"]
    assert state["config_fingerprint"] == run_fingerprint(base)
    longer = json.loads(json.dumps(base))
    longer["train"].update(max_steps=100, epochs=9, log_every=7, progress=True)
    longer["output_dir"] = "/elsewhere"
    assert run_fingerprint(longer) == run_fingerprint(base)
    wider = json.loads(json.dumps(base))
    wider["model"]["d_model"] = 64
    assert run_fingerprint(wider) != run_fingerprint(base)


# ------------------------------------------------------------------------------- no exit 0 on wrong input
def test_unknown_key_added_with_plus_is_refused(world, cli):
    assert_refused(cli["train_unknown_key"], "train.foo", "unknown config key")
    assert not (world["tmp"] / "run-unknown-key").exists()  # refused before anything is created


def test_unknown_keys_are_found_at_any_depth(world):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[*ARGS, "+train.optim.foo=1", "+data.loader.bar=2", "train.seed=3"])
        score = compose("score", overrides=["checkpoint=x", "output_dir=y", "+cache.bogus=1"])
    assert unknown_keys(cfg) == ["data.loader.bar", "train.optim.foo"]
    assert unknown_keys(score) == ["cache.bogus"]


def test_score_max_len_other_than_trained_is_refused(world, cli):
    assert_refused(cli["score_max_len"], "max_len=1000000000", "above the trained data.loader.max_len=32")
    assert not (world["tmp"] / "score-max-len").exists()


@pytest.mark.parametrize("value", ["2.5", "0", "-3"])
def test_score_max_len_must_be_a_positive_integer(value):
    from hydra.errors import ConfigCompositionException

    with pytest.raises((InputError, ConfigCompositionException), match="max_len|integer|Integer"):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            OmegaConf.to_object(compose("score", overrides=["checkpoint=x", "output_dir=y", f"max_len={value}"]))


# ---------------------------------------------------------------------------------- no raw crashes
def test_scoring_a_text_file_named_like_a_checkpoint_is_refused(world, cli):
    junk = world["tmp"] / "junk" / "checkpoints" / "step_5.pt"
    assert_refused(cli["score_text_checkpoint"], str(junk), "not a readable torch checkpoint")


def test_resume_skips_an_unreadable_newest_checkpoint(world, capsys):
    run = copy_run(world, "run-junk")
    junk = run / "checkpoints" / "step_99.pt"
    junk.write_text("not a checkpoint either\n")
    with torch_threads(1):
        report = json.loads(train(train_config(world, run, f"train.max_steps={TRAINED_STEPS}")).read_text())
    out = capsys.readouterr().out
    assert f"skipping unusable {junk}: CheckpointError: checkpoint {junk} is not a readable torch checkpoint" in out
    assert report["resumed_from"] == str(run / "checkpoints" / "step_6.pt") and report["steps"] == TRAINED_STEPS
    assert junk.read_text() == "not a checkpoint either\n"  # reported and skipped, never deleted


def test_a_run_dir_whose_checkpoints_all_fail_to_load_is_refused(world, tmp_path, capsys):
    junk = tmp_path / "run" / "checkpoints" / "step_5.pt"
    junk.parent.mkdir(parents=True)
    junk.write_text("not a checkpoint\n")
    with pytest.raises(InputError, match=r"holds checkpoints but none can be resumed \(step_5\.pt"):
        train(train_config(world, tmp_path / "run"))
    assert f"skipping unusable {junk}" in capsys.readouterr().out
    assert junk.read_text() == "not a checkpoint\n"


def test_disk_full_during_a_checkpoint_names_the_file_and_leaves_no_temp(world, cli):
    ckpts = world["tmp"] / "run-disk-full" / "checkpoints"
    assert_refused(cli["train_disk_full"], str(ckpts / "step_2.pt"), "no space left")
    assert not list(ckpts.glob(".step_*")) and not list(ckpts.glob("step_*"))


def test_a_second_process_on_a_locked_run_dir_is_refused(world, cli, tmp_path):
    run = world["tmp"] / "run-locked"
    assert_refused(cli["train_locked"], f"output_dir={run}", f"pid {cli['holder_pid']}", "in use by another process")
    assert not (run / "checkpoints").exists()
    with lock_run_dir(run):  # the holder was SIGKILLed: the kernel released its flock
        pass
    # recsys.score's output dir is locked the same way (in-process job, another process holding the lock)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path / "score")], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = score_config(world, tmp_path / "score")
        with pytest.raises(InputError, match=f"pid {holder.pid}"), torch_threads(1):
            run_scoring(cfg)
        assert not (tmp_path / "score" / "_job.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_checkpoint_error_is_an_input_error_naming_the_file(tmp_path):
    path = tmp_path / "step_1.pt"
    torch.save(torch.zeros(2), path)  # a valid torch file that is not a checkpoint dict
    with pytest.raises(InputError, match=f"checkpoint {path} holds a Tensor"):
        load_checkpoint(path)


def test_atomic_write_out_of_space_names_the_file_and_leaves_no_temp(tmp_path):
    """The helper behind partitions, _job.json, summaries and report.json: a real EFBIG from a file-size limit
    set on this process for the duration of the write."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(OutOfSpaceError, match=f"could not write {tmp_path / 'part-00000.parquet'}: no space left"):
            atomic_write_bytes(tmp_path / "part-00000.parquet", b"x" * 200_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert list(tmp_path.iterdir()) == []
