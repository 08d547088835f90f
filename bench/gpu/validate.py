"""Driver of bench/gpu/validate.sh: runs the GPU validation steps, each in its own process with its
own timeout, and writes one JSON (see bench/gpu/README.md).

    python bench/gpu/validate.py [--dry-run] [--site DIR] [--wheels-log FILE]

A step that fails, crashes or times out is recorded and the next one runs. Step timeouts are
capped by a deadline for the whole run (``--deadline-s``), so the run ends in time even when every
step uses its full budget; a step with too little time left is recorded as skipped. The JSON is
rewritten after every step; its path is the last line printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Packages the GPU image lacks (some come from .whl/): their versions or import errors are recorded.
OPTIONAL = ["fbgemm_gpu", "torchrec", "tensordict", "hydra", "omegaconf", "polars"]
# The tests that skip without CUDA: compiled Triton on CUDA, and the torch backend on CUDA.
CUDA_TESTS = ["tests/kernels", "-k", "cuda"]
# Autotune spaces (RECSYS_TRITON_CONFIGS, BLOCK_MxBLOCK_NxWARPSxSTAGES): one pinned config per test
# pass (every config of every kernel compiles on first use: the full 24-config space would compile
# for ~20 minutes over the test shapes), a short list for the sweep.
TEST_TILES = ["64x64x4x2", "128x64x8x2"]
SWEEP_SPACE = "128x64x4x3,128x64x8x3,64x128x4x3,64x64x4x3,128x128x8x2"
# Ours vs SDPA, max |diff| / max |SDPA| over output and gradients, above which a sweep row is flagged
# (bf16: the kernel tests allow 2e-2 of the tensor's scale against an fp32 reference).
AGREE_TOL = 0.05
DRY_INTERPRETER_TESTS = ["tests/kernels", "-k", "triton_interpreter_fp32 and (zero_and_one or one_candidate)"]

MIN_STEP_S = 15.0  # a step given less time than this by the deadline is skipped, not started

PROBE = r"""
import importlib, json, os, platform, sys
out = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform()}
for name in ("torch", "triton", "numpy", "pyarrow", "pytest", "hypothesis", "xdist", "pytest_timeout"):
    try:
        out[name] = getattr(importlib.import_module(name), "__version__", "present")
    except Exception as e:
        out[name] = f"missing: {type(e).__name__}: {e}"[:200]
import torch
out["torch_cuda"] = torch.version.cuda
out["cuda_available"] = torch.cuda.is_available()
if out["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    out["device_name"] = p.name
    out["capability"] = f"{p.major}.{p.minor}"
    out["device_memory_gib"] = round(p.total_memory / 2**30, 1)
    out["device_count"] = torch.cuda.device_count()
else:
    out["device_name"] = "cpu (" + (platform.processor() or platform.machine()) + ")"
out["cpu_count"] = os.cpu_count()
# optional packages in a child process, one line each as it goes: a crash while loading a native
# library (FBGEMM's CPU build against this torch) must not lose the versions above
import subprocess
child = (
    "import importlib, os, sys\n"
    "for name in sys.argv[1:]:\n"
    "    print('importing', name, flush=True)\n"
    "    try:\n"
    "        m = importlib.import_module(name)\n"
    "        print('ok', name, getattr(m, '__version__', 'present'), os.path.dirname(m.__file__), flush=True)\n"
    "    except BaseException as e:\n"
    "        print('no', name, f'{type(e).__name__}: {e}'.replace(chr(10), ' ')[:300], flush=True)\n"
)
names = json.loads(sys.argv[1])
opt = {}
try:
    proc = subprocess.run([sys.executable, "-c", child, *names], capture_output=True, text=True, timeout=60)
    lines, rc = proc.stdout.splitlines(), proc.returncode
except subprocess.TimeoutExpired as e:
    lines, rc = (e.stdout or b"").decode(errors="replace").splitlines(), "timeout"
for line in lines:
    kind, name, *rest = line.split(" ", 2) + [""]
    if kind == "ok":
        opt[name] = rest[0].strip()
    elif kind == "no":
        opt[name] = "not importable: " + rest[0].strip()
    elif kind == "importing":
        opt[name] = f"the import did not return (rc={rc})"
out["optional"] = opt
print(json.dumps(out))
"""


@dataclass
class Step:
    name: str
    argv: list[str]
    budget_s: float
    env: dict[str, str] = field(default_factory=dict)
    parse: str = "none"  # how to read the step's results: pytest | collect | json | probe | none
    artifact: Path | None = None  # junit XML or JSON the step writes
    skip: str = ""  # recorded as skipped with this reason, not run


def run_process(step: Step, timeout_s: float, log: Path) -> tuple[int | None, bool, float]:
    """Run ``step`` in its own process group; on timeout send SIGINT (pytest then writes its report),
    then SIGKILL 20 s later. Returns (rc, timed_out, wall seconds)."""
    env = {**os.environ, **step.env}
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(step.argv, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
            return rc, False, time.perf_counter() - t0
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
            return proc.returncode, True, time.perf_counter() - t0


def _signal_group(pid: int, sig: int) -> None:
    """Signal the step's process group (pytest-xdist workers included); it may have just ended."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def tail(path: Path, chars: int = 1500) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


def parse_junit(path: Path, max_failures: int = 40) -> dict:
    """Counts and the failures' one-line summaries from a pytest junit XML."""
    root = ET.parse(path).getroot()
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in root.iter("testcase"):
        counts["tests"] += 1
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), None)
        if kind is None:
            counts["passed"] += 1
            continue
        counts[{"failure": "failed", "error": "errors", "skipped": "skipped"}[kind]] += 1
        if kind != "skipped" and len(failures) < max_failures:
            node = next(c for c in case if c.tag == kind)
            message = (node.get("message") or node.text or "").strip().splitlines()
            failures.append(f"{case.get('classname', '')}::{case.get('name', '')}: {(message or [''])[0][:300]}")
    return {**counts, "failure_summaries": failures}


def parse_pytest_summary(text: str) -> dict:
    """Counts from pytest's closing line (``3 passed, 1 failed, 2 skipped in 4.5s``), when there is no XML."""
    counts = {}
    lines = [ln for ln in text.splitlines() if re.search(r"\b(passed|failed|error|errors|skipped|deselected)\b", ln)]
    for num, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", lines[-1] if lines else ""):
        counts[{"error": "errors"}.get(word, word)] = int(num)
    return counts


def parse_collected(text: str) -> dict:
    m = re.search(r"(\d+)(?:/(\d+))? tests? collected", text)
    if not m:
        return {}
    return {"collected": int(m.group(1)), **({"collected_of": int(m.group(2))} if m.group(2) else {})}


def read_results(step: Step, log: Path) -> dict:
    text = log.read_text(errors="replace") if log.exists() else ""
    if step.parse == "pytest":
        if step.artifact and step.artifact.exists() and step.artifact.stat().st_size:
            try:
                return parse_junit(step.artifact)
            except ET.ParseError as e:
                return {"junit_error": str(e), **parse_pytest_summary(text)}
        return parse_pytest_summary(text)
    if step.parse == "collect":
        return parse_collected(text)
    if step.parse == "probe":
        line = next((ln for ln in reversed(text.splitlines()) if ln.startswith("{")), "{}")
        return json.loads(line)
    if step.parse == "json" and step.artifact and step.artifact.exists():
        return json.loads(step.artifact.read_text())
    return {}


def has_errors(results: dict) -> bool:
    """An ``error`` at the top of a step's JSON, in a sweep row or in a sweep agreement check."""
    rows = results.get("rows", [])
    return "error" in results or any("error" in r or "error" in r.get("agreement_vs_sdpa", {}) for r in rows)


def status_of(step: Step, rc: int | None, timed_out: bool, results: dict) -> str:
    if timed_out:
        return "timeout"
    if step.parse == "json" and "skipped" in results:
        return "skipped"
    if step.parse == "json" and has_errors(results):
        return "failed"
    if step.parse == "pytest" and rc == 5:  # no test selected
        return "failed"
    return "ok" if rc == 0 else "failed"


def sweep_summary(sweep: dict) -> list[dict]:
    """One line per (op, L, mode): each provider's TFLOP/s and ours / SDPA."""
    table: dict[tuple, dict] = {}
    for r in sweep.get("rows", []):
        if "mode" not in r:
            continue
        key = (r["op"], r["L"], r["mode"])
        table.setdefault(key, {"op": r["op"], "L": r["L"], "mode": r["mode"]})[r["provider"]] = r.get(
            "tflops", r.get("error", "?"))
    for r in sweep.get("rows", []):
        diffs = r.get("agreement_vs_sdpa")
        if diffs is not None:
            worst = max((v for v in diffs.values() if isinstance(v, float)), default=None)
            row = table.setdefault((r["op"], r["L"], "agreement"), {"op": r["op"], "L": r["L"], "mode": "agreement"})
            row.update(max_rel_diff_vs_sdpa=worst, agrees=worst is not None and worst <= AGREE_TOL)
    out = []
    for row in table.values():
        ours = next((row[p] for p in ("triton", "torch") if p in row), None)
        ref = row.get("sdpa_flash")
        if isinstance(ours, float) and isinstance(ref, float) and ref > 0:
            row["ours_over_sdpa"] = round(ours / ref, 3)
        out.append(row)
    return out


# ----------------------------------------------------------------------------------------------
# the steps
# ----------------------------------------------------------------------------------------------
def site_pythonpath(site: str) -> str:
    """PYTHONPATH for the steps that may use the .whl/ wheels: the repository, the wheel folder, the rest."""
    return os.pathsep.join(p for p in (str(REPO), site, os.environ.get("PYTHONPATH", "")) if p)


def pytest_argv(py: str, selection: list[str], junit: Path, gpu: bool, workers: int) -> list[str]:
    argv = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--timeout=180", f"--junitxml={junit}",
            *selection]
    return argv + (["-n", str(workers)] if gpu and workers > 1 else [])


def build_steps(args, py: str, work: Path, versions: dict) -> list[Step]:
    """In order: kernel tests (pinned tiles), sweep, train, score, kernel tests with other tiles (last:
    the first thing dropped when time runs out). The dry run collects the CUDA tests instead of
    running them, runs a few interpreter tests, and shrinks every shape."""
    gpu = not args.dry_run
    interp = {"TRITON_INTERPRET": "0" if gpu else "1"}
    has_xdist = not str(versions.get("xdist", "missing")).startswith("missing")
    workers = min(8, max(1, (os.cpu_count() or 2) // 2)) if has_xdist else 1

    def kernel_tests(name: str, tiles: str, budget: float) -> Step:
        env = {**interp, "RECSYS_TRITON_CONFIGS": tiles}
        if not gpu:
            return Step(name, [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", *CUDA_TESTS],
                        60, env, "collect")
        junit = work / f"{name}.xml"
        return Step(name, pytest_argv(py, CUDA_TESTS, junit, True, workers), budget, env, "pytest", junit)

    steps = [kernel_tests("kernel_tests", TEST_TILES[0], 150)]
    if not gpu:
        junit = work / "kernel_tests_interpreter.xml"
        steps.append(Step("kernel_tests_interpreter", pytest_argv(py, DRY_INTERPRETER_TESTS, junit, False, 1), 90,
                          {**interp, "RECSYS_TRITON_CONFIGS": TEST_TILES[0]}, "pytest", junit))
    sweep_json = work / "attention_vs_sdpa.json"
    small = ["--lengths", "128,256", "--tokens", "512", "--heads", "2", "--dh", "32", "--candidates", "8",
             "--ns-tokens", "4"]
    steps.append(Step("attention_sweep", [py, "bench/gpu/attention_vs_sdpa.py", "--out", str(sweep_json),
                                          *([] if gpu else small)],
                      170 if gpu else 90, {**interp, "RECSYS_TRITON_CONFIGS": SWEEP_SPACE}, "json", sweep_json))
    # the model steps alone see the wheels of .whl/ (torchrec, FBGEMM's CPU build): the kernel steps
    # must not depend on them
    env = {**interp, "RECSYS_TRITON_CONFIGS": SWEEP_SPACE, "PYTHONPATH": site_pythonpath(args.site)}
    tiny = {"train": ["--requests", "8", "--max-len", "64", "--median-history", "20", "--repeats", "2"],
            "score": ["--length", "128", "--candidates", "64", "--repeats", "2"]}
    for what in ("train", "score"):
        out = work / f"{what}.json"
        steps.append(Step(f"{what}_throughput", [py, "bench/gpu/model_throughput.py", what, "--out", str(out),
                                                 *(["--repeats", "5"] if gpu else tiny[what])],
                          75 if gpu else 60, env, "json", out))
    for tiles in TEST_TILES[1:]:
        steps.append(kernel_tests(f"kernel_tests_{tiles}", tiles, 100) if gpu else
                     Step(f"kernel_tests_{tiles}", [], 0, skip="dry run: the same collection as kernel_tests"))
    return steps


def nvidia_smi() -> str:
    """The GPU's name, driver, memory and max SM clock as nvidia-smi reports them ("" without it)."""
    if not shutil.which("nvidia-smi"):
        return ""
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi failed: {e}"
    return smi.stdout.strip() or smi.stderr.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU: every step that needs no CUDA, tiny shapes")
    ap.add_argument("--site", default="", help="folder the .whl/ wheels were installed into (model steps only)")
    ap.add_argument("--wheels-log", default="", help="log of the wheel install (recorded in the JSON)")
    ap.add_argument("--wheels-rc", default="", help="exit status of the wheel install")
    ap.add_argument("--deadline-s", type=float, default=450.0, help="all steps end within this many seconds")
    ap.add_argument("--stamp", default=datetime.now().strftime("%Y%m%d-%H%M%S"), help="names the JSON without $OUT")
    ap.add_argument("--work", type=Path, default=None, help="folder of the step logs and artefacts")
    args = ap.parse_args()
    t_start = time.perf_counter()
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    results_dir = REPO / "bench" / "results"
    json_path = out / "gpu_validate.json" if out else results_dir / f"gpu_validate_{args.stamp}.json"
    work = args.work or (Path("/tmp/gpu_validate_work") if out else results_dir / f"gpu_validate_{args.stamp}_logs")
    work.mkdir(parents=True, exist_ok=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    result = {"mode": "dry-run" if args.dry_run else "gpu", "when": datetime.now().isoformat(timespec="seconds"),
              "json_path": str(json_path), "logs": str(out / "gpu_validate_logs.tar.gz") if out else str(work),
              "loadavg_start": os.getloadavg(), "steps": {}}
    if args.wheels_log:
        result["wheels"] = {"rc": args.wheels_rc, "site": args.site, "log_tail": tail(Path(args.wheels_log), 1500)}

    def save() -> None:
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        result["loadavg_end"] = os.getloadavg()
        json_path.write_text(json.dumps(result, indent=2))
        if out:  # $OUT returns at most 8 files: the logs travel as one archive
            with tarfile.open(out / "gpu_validate_logs.tar.gz", "w:gz") as tar:
                tar.add(work, arcname="gpu_validate_logs")

    setup = Step("setup", [py, "-c", PROBE, json.dumps(OPTIONAL)], 60, {"PYTHONPATH": site_pythonpath(args.site)},
                 "probe")
    versions = run_step(setup, work, result, t_start, args.deadline_s)
    result.update(versions=versions, device=versions.get("device_name", "?"), nvidia_smi=nvidia_smi())
    print(json.dumps(versions, indent=1), flush=True)
    if not args.dry_run and not versions.get("cuda_available"):
        result["error"] = "no CUDA device visible to torch: run with --dry-run on a CPU machine"
        save()
        print(result["error"], file=sys.stderr)
        print(json_path)
        return 2
    save()
    for step in build_steps(args, py, work, versions):
        run_step(step, work, result, t_start, args.deadline_s)
        save()
    save()
    print_table(result)
    print(json_path)
    return 0 if all(s["status"] in ("ok", "skipped") for s in result["steps"].values()) else 1


def print_table(result: dict) -> None:
    """The closing summary: one line per step, then the sweep's TFLOP/s table."""
    print(f"\n== gpu_validate ({result['mode']}, {result.get('device', '?')}, {result['wall_s']} s) ==")
    for name, rec in result["steps"].items():
        res = rec.get("results", {})
        if "tests" in res:
            what = f"{res['passed']} passed, {res['failed']} failed, {res['errors']} errors, {res['skipped']} skipped"
        elif "collected" in res:
            what = f"{res['collected']} collected"
        elif "rows" in res:
            rows = res["rows"]
            errors = sum("error" in r or "error" in r.get("agreement_vs_sdpa", {}) for r in rows)
            what = f"{len(rows)} rows, {errors} errors, ceiling {res.get('ceiling_tflops')} TFLOP/s"
        elif name == "setup":
            what = f"torch {res.get('torch')} (CUDA {res.get('torch_cuda')}), triton {res.get('triton')}, python {res.get('python')}"
        elif "candidates_per_s" in res:
            what = f"{res['candidates_per_s']:.0f} candidates/s ({res.get('scope', '')[:40]})"
        else:
            what = str(rec.get("skipped") or res.get("skipped") or res.get("error") or "")[:90]
        print(f"{name:28s} {rec['status']:8s} {rec.get('wall_s', 0):6.1f} s  {what}")
    summary = result["steps"].get("attention_sweep", {}).get("summary", [])
    ceiling = result["steps"].get("attention_sweep", {}).get("results", {}).get("ceiling_tflops", {})
    if summary:
        print(f"attention TFLOP/s (ceiling {ceiling}):")
        for row in summary:
            cells = {k: v for k, v in row.items() if k not in ("op", "L", "mode")}
            print(f"  {row['op']:10s} L={row['L']:<5d} {row['mode']:9s} {json.dumps(cells)}")


def run_step(step: Step, work: Path, result: dict, t_start: float, deadline_s: float) -> dict:
    """Run one step within the deadline, record it in ``result["steps"]``; returns its parsed results."""
    left = deadline_s - (time.perf_counter() - t_start)
    timeout = min(step.budget_s, left)
    cmd = " ".join(step.argv[:2] + ["<probe>"]) if step.parse == "probe" else " ".join(step.argv)
    rec = {"cmd": cmd, "env": step.env, "budget_s": step.budget_s, "loadavg_start": os.getloadavg()}
    if step.skip or timeout < MIN_STEP_S:
        rec.update(status="skipped",
                   skipped=step.skip or f"out of time: {left:.0f} s left of the {deadline_s:.0f} s deadline")
        result["steps"][step.name] = rec
        print(f"[{step.name}] skipped: {rec['skipped']}", flush=True)
        return {}
    log = work / f"{step.name}.log"
    print(f"[{step.name}] running (timeout {timeout:.0f} s): {rec['cmd'][:200]}", flush=True)
    rc, timed_out, wall = run_process(step, timeout, log)
    try:
        results = read_results(step, log)
    except Exception as e:  # a crashed step may leave a truncated artefact
        results = {"parse_error": f"{type(e).__name__}: {e}"}
    rec.update(rc=rc, timeout_s=round(timeout), wall_s=round(wall, 1), log=str(log),
               status=status_of(step, rc, timed_out, results), results=results)
    if step.name == "attention_sweep" and results:
        rec["summary"] = sweep_summary(results)
    if rec["status"] not in ("ok", "skipped"):
        rec["log_tail"] = tail(log)
    result["steps"][step.name] = rec
    brief = {k: v for k, v in results.items() if isinstance(v, (int, float, str)) and k != "executable"}
    print(f"[{step.name}] {rec['status']} in {wall:.1f} s: {json.dumps(brief)[:400]}", flush=True)
    return results


if __name__ == "__main__":
    sys.exit(main())
