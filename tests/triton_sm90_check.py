"""Compile every pdmd_kernels Triton kernel for sm_90 (H100/H200) without a GPU, outside the interpreter.

Run by tests/test_kernels_api.py in a fresh process (TRITON_INTERPRET unset): it catches code the
interpreter accepts but the compiler rejects, and reads the PTX for 16-byte vector accesses of the
latent tensors. Prints one JSON line per kernel: name, dtype, and counts of global loads/stores.
"""
import json
import os
import re
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels"))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import pdmd_kernels.triton_backend as T  # noqa: E402

FP32_POINTERS = {"grad", "partial", "part_abs", "part_sq", "loss", "norm", "as_ptr", "ss_ptr", "at_ptr", "st_ptr",
                 "w_ptr", "a_ptr", "s_ptr", "c_ptr", "scale_ptr"}
FLOATS = {"clamp_max", "scale", "min_norm"}
KERNELS = {  # kernel: constexprs (a launch the ops make)
    "_subinterval_fwd": {"PRED": 0, "BLOCK": T.BLOCK},
    "_subinterval_bwd": {"PRED": 1, "NEED_P": True, "NEED_X": True, "NEED_N": False, "BLOCK": T.BLOCK},
    "_subinterval_train": {"PRED": 0, "NEED_P": True, "NEED_X": False, "NEED_N": False, "BLOCK": T.BLOCK},
    "_dmd_theory_fwd": {"HAS_UNCOND": True, "BLOCK": T.BLOCK},
    "_dmd_theory_train": {"HAS_UNCOND": True, "BLOCK": T.BLOCK},
    "_dmd_theory_bwd": {"HAS_UNCOND": False, "BLOCK": T.BLOCK},
    "_dmd_normalized_fwd": {"HAS_UNCOND": True, "BLOCK": T.BLOCK},
    "_dmd_normalized_finish": {"P_POW2": 1024},
    "_dmd_normalized_bwd": {"HAS_UNCOND": True, "BLOCK": T.BLOCK},
    "_renoise": {"BLOCK": T.BLOCK},
    "_scale_rows": {"BLOCK": T.BLOCK},
}


def compile_kernel(name, constexprs, dtype):
    fn = getattr(T, name)
    signature, attrs = {}, {}
    for i, (arg, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            signature[arg] = "constexpr"
            continue
        signature[arg] = ("*fp32" if arg in FP32_POINTERS else "fp32" if arg in FLOATS
                          else "i32" if arg[0] in "NPs" and len(arg) <= 2 else f"*{dtype}")
        if arg not in FLOATS and arg != "P":  # pointers, sizes and strides: 16-divisible, as at real latent sizes
            attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": T.WARPS})
    ptx = kernel.asm["ptx"]
    count = lambda pattern: len(re.findall(pattern, ptx))  # noqa: E731
    return {"kernel": name, "dtype": dtype, "ld": count(r"ld\.global"), "ld_v4": count(r"ld\.global[^\n]*\.v4"),
            "st": count(r"st\.global"), "st_v4": count(r"st\.global[^\n]*\.v4")}


if __name__ == "__main__":
    for dtype in sys.argv[1:] or ["bf16"]:
        for name, constexprs in KERNELS.items():
            print(json.dumps(compile_kernel(name, constexprs, dtype)), flush=True)
