"""Helpers of the GPU validation driver (bench/gpu/validate.py): result parsing, step timeouts."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def validate():
    spec = importlib.util.spec_from_file_location("gpu_validate", REPO / "bench" / "gpu" / "validate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module while the class is built
    spec.loader.exec_module(module)
    return module


def test_pytest_results_from_junit_and_closing_line(validate, tmp_path):
    """A real pytest run (one pass, one failure, one skip): junit counts and failure line, closing-line counts."""
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok():\n    assert True\n"
        "def test_bad():\n    assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='not here')\ndef test_skip():\n    pass\n"
    )
    junit = tmp_path / "out.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                           "test_sample.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:]
    res = validate.parse_junit(junit)
    assert {k: res[k] for k in ("tests", "passed", "failed", "errors", "skipped")} == {
        "tests": 3, "passed": 1, "failed": 1, "errors": 0, "skipped": 1}
    assert len(res["failure_summaries"]) == 1
    assert "test_bad" in res["failure_summaries"][0] and "one is not two" in res["failure_summaries"][0]
    assert validate.parse_pytest_summary(proc.stdout) == {"passed": 1, "failed": 1, "skipped": 1}


def test_collected_count(validate):
    assert validate.parse_collected("116/238 tests collected (122 deselected) in 2.50s") == {
        "collected": 116, "collected_of": 238}
    assert validate.parse_collected("1 test collected in 0.1s") == {"collected": 1}
    assert validate.parse_collected("no tests ran") == {}


def test_sweep_summary_ratios_and_agreement(validate):
    rows = [
        {"op": "jagged", "L": 1024, "provider": "triton", "mode": "fwd", "tflops": 300.0},
        {"op": "jagged", "L": 1024, "provider": "sdpa_flash", "mode": "fwd", "tflops": 400.0},
        {"op": "jagged", "L": 1024, "provider": "triton", "mode": "fwd_bwd", "error": "RuntimeError: boom"},
        {"op": "jagged", "L": 1024, "agreement_vs_sdpa": {"out": 0.004, "dq": 0.2}},
    ]
    table = {(r["op"], r["L"], r["mode"]): r for r in validate.sweep_summary({"rows": rows})}
    assert table["jagged", 1024, "fwd"]["ours_over_sdpa"] == 0.75
    assert table["jagged", 1024, "fwd_bwd"]["triton"] == "RuntimeError: boom"
    assert table["jagged", 1024, "agreement"] == {"op": "jagged", "L": 1024, "mode": "agreement",
                                                   "max_rel_diff_vs_sdpa": 0.2, "agrees": False}
    assert validate.has_errors({"rows": rows})
    assert not validate.has_errors({"rows": rows[:2]})


def test_step_timeout_and_deadline(validate, tmp_path, monkeypatch):
    """A step past its timeout is stopped and recorded as such; one with no time left is not started."""
    import time

    monkeypatch.setattr(validate, "MIN_STEP_S", 0.5)
    result = {"steps": {}}
    sleeper = validate.Step("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], budget_s=1.0)
    t0 = time.perf_counter()
    validate.run_step(sleeper, tmp_path, result, t_start=time.perf_counter(), deadline_s=100.0)
    assert time.perf_counter() - t0 < 30
    assert result["steps"]["sleeper"]["status"] == "timeout"
    late = validate.Step("late", [sys.executable, "-c", "pass"], budget_s=10.0)
    validate.run_step(late, tmp_path, result, t_start=time.perf_counter() - 100.0, deadline_s=100.2)
    assert result["steps"]["late"]["status"] == "skipped" and "out of time" in result["steps"]["late"]["skipped"]


def test_autotune_spaces_parse(validate):
    """The pinned test tiles and the sweep space are valid RECSYS_TRITON_CONFIGS values."""
    from kernels.triton_attention_common import parse_config_space

    for spec in [*validate.TEST_TILES, validate.SWEEP_SPACE]:
        assert parse_config_space(spec)


def test_cpu_dry_run_passes_every_step(tmp_path):
    """``bench/gpu/validate.sh --dry-run`` end to end (~30 s): a GPU window is short, so every step that can run
    without CUDA must already run here (a bench importing a kernel helper that was removed broke two steps once)."""
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu" / "validate.sh"), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = json.loads((tmp_path / "gpu_validate.json").read_text())["steps"]
    bad = {name: step.get("status") for name, step in steps.items() if step.get("status") not in ("ok", "skipped")}
    assert not bad, f"dry-run steps not ok: {bad}\n{proc.stdout[-3000:]}"
    assert steps["kernel_tests_interpreter"]["status"] == "ok" and steps["train_throughput"]["status"] == "ok"
