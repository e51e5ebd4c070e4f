"""The end of scripts/gpu_check.sh: read what the steps wrote, check it, print and save a summary.

    python scripts/gpu_check_summary.py OUT STEPS_TSV MODE [PROBE_JSON]

OUT holds the steps' files (junit.xml, bench_*.json); STEPS_TSV has one "name<TAB>rc<TAB>seconds" line per
step ("skipped" / "no time" instead of an exit code when a step did not run); MODE is "gpu" or "cpu".
Writes OUT/summary.txt and OUT/summary.json; exits 1 when a check fails. Checks are about correctness
(tests passed and none skipped for want of CUDA, Triton rows within tolerance, the backend each fit asked
for is the one it used); the speed targets (docs/vicreg-kernel.md section 8) are reported as met / not met,
never as failures.
"""
from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET

# Bench errors are against the public formula in float64 (embcache/bench/kernels.py), at sizes up to 8192 x 8192: the
# self-check's tolerances (kernels/vicreg.py), ~10x what correct kernels give, far below what a bug gives.
TRITON_TOLERANCE = {"fp32": 1e-4, "tf32": 3e-3, "bf16": 3e-2}
MAX_FILES_BACK = 8  # what the device tool returns from $OUT


def _load(path: str):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _steps(path: str) -> dict[str, dict]:
    steps = {}
    with open(path) as fh:
        for line in fh:
            if line.strip():
                name, rc, seconds = line.rstrip("\n").split("\t")
                steps[name] = {"rc": rc, "seconds": float(seconds)}
    return steps


def check_pytest(out: str, mode: str) -> tuple[list[str], dict]:
    path = os.path.join(out, "junit.xml")
    if not os.path.exists(path):
        return ["pytest: no junit.xml"], {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    problems = []
    if counts["failures"] or counts["errors"]:
        failed = [f"{c.get('name')}" for s in suites for c in s.iter("testcase")
                  if c.find("failure") is not None or c.find("error") is not None]
        problems.append(f"pytest: {counts['failures']} failed, {counts['errors']} errors: {failed[:10]}")
    # On a GPU run only the tests that need the interpreter may be skipped; a CUDA test skipped means the
    # kernels were not tested on the device.
    skips = [(c.get("name"), (c.find("skipped").get("message") or "")) for s in suites for c in s.iter("testcase")
             if c.find("skipped") is not None]
    not_on_device = [name for name, why in skips if "CUDA" in why or "TRITON_INTERPRET" in why
                     or "gpu_check" in why or "triton not installed" in why]
    counts["skipped_needing_cuda"] = len(not_on_device)
    if mode == "gpu" and not_on_device:
        problems.append(f"pytest: {len(not_on_device)} CUDA tests skipped on a GPU run: {not_on_device[:10]}")
    if counts["tests"] == 0:
        problems.append("pytest: no tests ran")
    return problems, counts


def check_kernels(out: str, mode: str) -> tuple[list[str], list[str], dict]:
    data = _load(os.path.join(out, "bench_kernels.json"))
    if data is None:
        return ["bench kernels: no bench_kernels.json"], [], {}
    rows = data["results"]
    problems, lines = [], []
    timed = {(r["variant"], r["n"], r["d"], r["dtype"]): r for r in rows}
    for r in rows:
        if r["variant"] != "triton" or mode != "gpu":
            continue
        if r["median_ms"] is None:
            problems.append(f"bench kernels: triton ({r['n']}, {r['d']}, {r['dtype']}) did not run: {r['note']}")
        elif not r["max_rel_err"] <= TRITON_TOLERANCE[r["dtype"]]:
            problems.append(f"bench kernels: triton ({r['n']}, {r['d']}, {r['dtype']}) error {r['max_rel_err']:.1e}"
                            f" > {TRITON_TOLERANCE[r['dtype']]:.0e}")
    for (variant, n, d, dtype), r in timed.items():
        if variant != "triton" or r["median_ms"] is None:
            continue
        eager = timed.get(("eager_reference", n, d, dtype), {}).get("median_ms")
        compiled = timed.get(("compiled_reference", n, d, dtype), {}).get("median_ms")
        closed = timed.get(("closed_form_torch", n, d, dtype), {}).get("median_ms")
        parts = [f"triton {r['median_ms']:.3f} ms, {r['peak_extra_mib'] or 0:.1f} MiB extra"]
        # the targets where N < D (docs/vicreg-kernel.md section 8): >= 10x eager, >= 3x torch.compile
        for name, ref, target in (("eager", eager, 10.0), ("compile", compiled, 3.0),
                                  ("closed-form torch", closed, None)):
            if ref:
                speed = ref / r["median_ms"]
                flag = ""
                if target is not None and n < d:
                    flag = f" (target >= {target:g}x: {'met' if speed >= target else 'NOT met'})"
                parts.append(f"{speed:.1f}x vs {name}{flag}")
        lines.append(f"  ({n}, {d}) {dtype}: " + ", ".join(parts))
    return problems, lines, data.get("environment", {})


def check_fit(out: str, name: str, expected: str | None, mode: str) -> tuple[list[str], str]:
    data = _load(os.path.join(out, f"{name}.json"))
    if data is None:
        return [f"{name}: no {name}.json"], ""
    problems = []
    used = data.get("vicreg_backend_used")
    if expected and used != expected:
        problems.append(f"{name}: asked for the {expected} VICReg backend, the fit used {used!r}")
    target = f" (target < 1 s on the H200: {'met' if data['fit_seconds'] < 1 else 'not met'})" if mode == "gpu" else ""
    line = (f"  {name}: {data['epochs']} epochs in {data['fit_seconds']:.2f} s{target}, pure compute "
            f"{data['compute_seconds']:.2f} s, "
            f"overhead {data['overhead']:.2f}x; VICReg {data.get('vicreg_backend')} -> {used} "
            f"(precision {data.get('vicreg_precision')}, check {data.get('vicreg_check_seconds', 0):.2f} s)")
    return problems, line


def main(out: str, steps_tsv: str, mode: str, probe_json: str | None = None) -> int:
    steps = _steps(steps_tsv)
    problems, lines = [], []
    for name, s in steps.items():
        if s["rc"] not in ("0", "skipped"):
            problems.append(f"step {name}: {'exit ' + s['rc'] if s['rc'].isdigit() else s['rc']}"
                            + (" (killed at its time limit)" if s["rc"] in ("124", "137") else ""))
    summary = {"mode": mode, "steps": steps}
    probe = _load(probe_json) if probe_json else None
    if probe:
        summary["tf32_probe"] = probe
    lines.append(f"gpu_check ({mode}): steps")
    lines += [f"  {n:<18} {s['rc']:>8}  {s['seconds']:7.1f} s" for n, s in steps.items()]
    if probe:
        lines.append("TF32 probe: " + ", ".join(f"{k} {v}" for k, v in probe.items()))
    if steps.get("pytest", {}).get("rc") != "skipped":
        p, counts = check_pytest(out, mode)
        problems += p
        summary["pytest"] = counts
        lines.append(f"kernel tests: {counts}")
    if steps.get("bench_kernels", {}).get("rc") != "skipped":
        p, kl, env = check_kernels(out, mode)
        problems += p
        summary["bench_kernels_environment"] = env
        lines.append("bench kernels (triton against the other variants):" if kl else "bench kernels: no triton rows")
        lines += kl
    for name, expected in (("bench_fit_torch", "torch"), ("bench_fit_triton", "triton" if mode == "gpu" else None)):
        if steps.get(name, {}).get("rc") != "skipped":
            p, line = check_fit(out, name, expected, mode)
            problems += p
            if line:
                lines.append(line)
    if steps.get("bench_extract", {}).get("rc") != "skipped":
        data = _load(os.path.join(out, "bench_extract.json"))
        if data is None:
            problems.append("bench_extract: no bench_extract.json")
        else:
            lines.append(f"  bench_extract: {data['samples']} samples, pipeline {data['pipeline_samples_per_s']} "
                         f"samples/s, encoders alone {data['pure_forward_samples_per_s']} samples/s, ratio "
                         f"{data['ratio']} ({data['encoders']})")
    files = {os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs}
    files |= {"summary.txt", "summary.json"}
    if len(files) > MAX_FILES_BACK:
        problems.append(f"$OUT holds {len(files)} files with the summary; only {MAX_FILES_BACK} come back")
    summary["problems"] = problems
    lines.append("PROBLEMS:" if problems else "all checks passed")
    lines += [f"  - {p}" for p in problems]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(out, "summary.txt"), "w") as fh:
        fh.write(text + "\n")
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
