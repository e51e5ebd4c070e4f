"""Does TF32 round or truncate its fp32 inputs, on this machine? (docs/vicreg-kernel.md section 5)

Multiplies a matrix filled with 1 + 3 * 2^-12 by the identity: a TF32 path that rounds its inputs to
nearest returns 1 + 2^-10, one that truncates them returns 1.0, an exact fp32 path returns the input.
Checked for cuBLAS (torch.matmul with TF32 allowed), for Triton's tl.dot(input_precision="tf32") on raw
operands, and for the VICReg kernels' own rounding (vicreg_triton._round_tf32 before the dot). Prints one
JSON object. On the CPU only the Triton parts run, and only under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import json
import sys

import torch

VALUE = 1 + 3 * 2**-12

try:  # module level: Triton resolves a kernel's helpers from its module's globals
    import triton
    import triton.language as tl

    from embcache.kernels.vicreg_triton import INTERPRET, _round_tf32

    @triton.jit
    def _dot_kernel(a_ptr, b_ptr, c_ptr, PRE_ROUND: tl.constexpr):
        r = tl.arange(0, 32)
        offs = r[:, None] * 32 + r[None, :]
        a = tl.load(a_ptr + offs)
        b = tl.load(b_ptr + offs)
        if PRE_ROUND:
            a = _round_tf32(a)
            b = _round_tf32(b)
        tl.store(c_ptr + offs, tl.dot(a, b, input_precision="tf32"))

    _IMPORT_ERROR = None
except Exception as exc:  # noqa: BLE001 - a probe reports, it does not fail the import
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def classify(v: float) -> str:
    return {1 + 2**-10: "rounds", 1.0: "truncates", VALUE: "exact fp32"}.get(v, f"other ({v!r})")


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {"device": device, "float32_matmul_precision": torch.get_float32_matmul_precision(),
           "cuda.matmul.allow_tf32_default": torch.backends.cuda.matmul.allow_tf32}
    if device == "cuda":
        a = torch.full((1024, 1024), VALUE, device=device)
        eye = torch.eye(1024, device=device)
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            out["cublas_tf32"] = classify((a @ eye)[0, 0].item())
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    if _IMPORT_ERROR:
        out["triton_error"] = _IMPORT_ERROR
    else:
        out["triton"], out["triton_interpreter"] = triton.__version__, INTERPRET
        try:
            a = torch.full((32, 32), VALUE, device=device)
            eye = torch.eye(32, device=device)
            for name, pre in (("triton_dot_tf32", False), ("triton_dot_tf32_after_round_tf32", True)):
                c = torch.empty_like(a)
                _dot_kernel[(1,)](a, eye, c, PRE_ROUND=pre)
                out[name] = classify(c[0, 0].item())
        except Exception as exc:  # noqa: BLE001
            out["triton_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    print(json.dumps(out))
    return 1 if "triton_error" in out else 0


if __name__ == "__main__":
    sys.exit(main())
