"""scripts/gpu_check.sh: its CPU dry run, and the checks of its summary on made-up GPU results (issue 12)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _summary_module():
    spec = importlib.util.spec_from_file_location("gpu_check_summary", ROOT / "scripts" / "gpu_check_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _junit(path: Path, skipped_message: str | None = None, failed: bool = False):
    cases = ['<testcase classname="t" name="test_ok"/>']
    if skipped_message:
        cases.append(f'<testcase classname="t" name="test_cuda_sizes"><skipped message="{skipped_message}"/></testcase>')
    cases.append('<testcase classname="t" name="test_cpu_only"><skipped message="emulates TF32 in the Triton '
                 'interpreter"/></testcase>')
    if failed:
        cases.append('<testcase classname="t" name="test_bad"><failure message="boom"/></testcase>')
    path.write_text(f'<testsuites><testsuite tests="{len(cases)}" failures="{int(failed)}" errors="0" '
                    f'skipped="{1 + bool(skipped_message)}">{"".join(cases)}</testsuite></testsuites>')


def _kernel_row(variant, ms, err=1e-6, dtype="fp32", n=256, d=768, note=""):
    return {"variant": variant, "n": n, "d": d, "dtype": dtype, "device": "cuda", "median_ms": ms,
            "peak_extra_mib": 1.0, "max_rel_err": err, "note": note}


def _fit(path: Path, requested: str, used: str, seconds: float = 0.8):
    path.write_text(json.dumps({"epochs": 20, "fit_seconds": seconds, "compute_seconds": 0.5, "overhead": 1.6,
                                "vicreg_backend": requested, "vicreg_backend_used": used,
                                "vicreg_precision": "tf32", "vicreg_check_seconds": 3.0}))


def _gpu_results(out: Path, *, skipped=None, triton_err=1e-6, triton_note="", fit_used="triton"):
    out.mkdir()
    _junit(out / "junit.xml", skipped)
    rows = [_kernel_row("eager_reference", 2.5), _kernel_row("compiled_reference", 0.9),
            _kernel_row("closed_form_torch", 0.3),
            _kernel_row("triton", None if triton_note else 0.05, triton_err, note=triton_note)]
    (out / "bench_kernels.json").write_text(json.dumps({"environment": {"gpu": "H200"}, "results": rows}))
    _fit(out / "bench_fit_torch.json", "torch", "torch", 2.0)
    _fit(out / "bench_fit_triton.json", "triton", fit_used)
    (out / "bench_extract.json").write_text(json.dumps({
        "samples": 300, "pipeline_samples_per_s": 900.0, "pure_forward_samples_per_s": 1000.0, "ratio": 0.9,
        "encoders": {"image": "timm:efficientnet_lite0", "text": "hf:/tmp/minilm-random"}}))
    steps = out.parent / "steps.tsv"
    steps.write_text("".join(f"{name}\t0\t10\n" for name in
                             ("setup", "env", "pytest", "bench_fit_torch", "bench_fit_triton", "bench_extract",
                              "bench_kernels")))
    return steps


def test_summary_passes_good_gpu_results(tmp_path, capsys):
    steps = _gpu_results(tmp_path / "out")
    assert _summary_module().main(str(tmp_path / "out"), str(steps), "gpu") == 0
    text = capsys.readouterr().out
    assert "all checks passed" in text
    assert "50.0x vs eager (target >= 10x: met)" in text and "18.0x vs compile (target >= 3x: met)" in text
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["problems"] == [] and summary["pytest"]["skipped_needing_cuda"] == 0
    assert len(os.listdir(tmp_path / "out")) == 7  # + logs.txt from the script itself = 8


@pytest.mark.parametrize("bad, expected", [
    (dict(skipped="GPU-size check, needs CUDA"), "CUDA tests skipped on a GPU run"),
    (dict(triton_err=5e-3), "error 5.0e-03 > 1e-04"),
    (dict(triton_note="failed: RuntimeError: backend='triton': ... self-check"), "did not run"),
    (dict(fit_used="torch"), "asked for the triton VICReg backend, the fit used 'torch'"),
])
def test_summary_flags_bad_gpu_results(tmp_path, bad, expected):
    steps = _gpu_results(tmp_path / "out", **bad)
    assert _summary_module().main(str(tmp_path / "out"), str(steps), "gpu") == 1
    problems = json.loads((tmp_path / "out" / "summary.json").read_text())["problems"]
    assert any(expected in p for p in problems), problems


def test_summary_flags_failed_and_timed_out_steps(tmp_path):
    steps = _gpu_results(tmp_path / "out")
    steps.write_text("setup\t0\t5\npytest\t124\t170\nbench_kernels\tno time\t0\nbench_extract\tskipped\t0\n")
    assert _summary_module().main(str(tmp_path / "out"), str(steps), "gpu") == 1
    problems = json.loads((tmp_path / "out" / "summary.json").read_text())["problems"]
    assert "step pytest: exit 124 (killed at its time limit)" in problems
    assert "step bench_kernels: no time" in problems
    assert not any("bench_extract" in p for p in problems)  # skipped on purpose: not checked


def test_cpu_dry_run_of_the_gpu_check(tmp_path):
    """The script's plumbing on the CPU: setup (this tree as embcache), env (+ the TF32 probe in the
    interpreter), bench kernels at a tiny size, and the checked summary; 8 files at most in $OUT."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "STEPS": "setup env bench_kernels", "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {k: v["rc"] for k, v in summary["steps"].items()} == {
        "setup": "0", "env": "0", "pytest": "skipped", "bench_fit_torch": "skipped", "bench_fit_triton": "skipped",
        "bench_extract": "skipped", "bench_kernels": "0"}
    assert summary["tf32_probe"]["triton_dot_tf32_after_round_tf32"] == "rounds"
    assert "embcache from /tmp/gpu_check." in (out / "logs.txt").read_text()  # the copy of this tree
    assert sorted(os.listdir(out)) == ["bench_kernels.json", "logs.txt", "summary.json", "summary.txt"]
