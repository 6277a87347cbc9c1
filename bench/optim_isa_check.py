"""Bits of the native optimizer step under one library build: a hash of 5 multi-tensor steps and of the
step's exp2/log2 on 2M inputs. Builds for different instruction sets (and thread counts) must print the
same hash (see bench/RESULTS.md, "multi-tensor AdamW8bitV step"). Loads the library given, not the package:

    cmake -S . -B /tmp/b_v1 -DCMAKE_PREFIX_PATH=$(python -c "import torch,os;print(os.path.dirname(torch.__file__))")/share/cmake \
        -DPDMD_NATIVE_ARCH=x86-64 -DPDMD_NATIVE_OUTPUT_DIR=/tmp/lib_v1 && cmake --build /tmp/b_v1
    python bench/optim_isa_check.py /tmp/lib_v1/_pdmd_native.so
"""
import hashlib
import math
import sys

import torch


def new_state(n):  # optim_step.new_state, without importing pdmd_kernels (which loads its own library)
    nb = max(1, math.ceil(n / 256))
    return torch.zeros(nb * 256, dtype=torch.uint8), torch.zeros(nb, 2)


torch.ops.load_library(sys.argv[1])
print(torch.ops.pdmd_native.build_info(), torch.get_num_threads(), "thread(s):", end=" ")
gen = torch.Generator().manual_seed(0)
sizes = [0, 1, 255, 257, 5000, 70001, 300000]
ps = [torch.randn(n, generator=gen).to([torch.bfloat16, torch.float32, torch.float16][i % 3]) for i, n in enumerate(sizes)]
st = [new_state(n) for n in sizes]
h = hashlib.sha256()
for t in range(1, 6):
    gs = [torch.randn(n, generator=gen) * torch.exp(3 * torch.randn(n, generator=gen)) for n in sizes]
    for sr in (True, False):
        torch.ops.pdmd_native.adamw8bitv_multi_step(ps, gs, [c for c, _ in st], [s for _, s in st], list(range(7)),
                                                    [1 - 0.999**t] * 7, 1e-3, 0.999, 1e-8, 0.1, sr, sr)
for x in ps + [c for c, _ in st] + [s for _, s in st]:
    h.update(x.contiguous().view(torch.uint8).numpy().tobytes())
x = torch.randint(1, 0x7F800000, (1 << 20,), generator=gen, dtype=torch.int64).to(torch.int32).view(torch.float32)
for y in torch.ops.pdmd_native._optim_exp2_log2(x) + torch.ops.pdmd_native._optim_exp2_log2(torch.rand(1 << 20, generator=gen) * 300 - 160):
    h.update(y.view(torch.uint8).numpy().tobytes())
print(h.hexdigest()[:16])
