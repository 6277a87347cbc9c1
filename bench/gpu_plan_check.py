"""GPU check of the memory planner: torch.cuda.max_memory_allocated of our layout vs `pdmd plan`.

Builds the diffusers transformer with random weights (default Wan 2.1 1.3B), our layout (bf16 base with
2 LoRA rank-64 experts, bf16 fake-score copy with AdamW8bitV), runs one fake-score step and one expert
step, and compares each component and the peak with the planner's prediction for the same shape:
(a) 81 frames 480x832 with activation checkpointing, (b) 17 frames 480x832 without.
Writes JSON to $OUT/gpu_plan_check.json (default ./gpu_out). About a minute on an H100.

    python bench/gpu_plan_check.py               # on a CUDA machine
    python bench/gpu_plan_check.py --cpu-smoke   # tiny model on CPU (checks the script; no peak figure)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "kernels")]
from pdmd.tools.planner import ARCHS, Arch, make_plan, measure_layout  # noqa: E402

MiB = 2**20
TINY = Arch("tiny-wan", "wan", 2, 2, 32, 128, 32, in_channels=16, out_channels=16, freq_dim=32)


def check(arch, device, frames, height, width, checkpointing, lora_rank, text_tokens):
    plan = make_plan(arch, gpus=1, batch=1, frames=frames, height=height, width=width, lora_rank=lora_rank,
                     experts=2, text_tokens=text_tokens)
    latent = ((frames - 1) // 4 + 1, height // 8, width // 8)
    t = time.perf_counter()
    meas = measure_layout(arch, lora_rank=lora_rank, experts=2, device=device, latent=latent,
                          text_tokens=text_tokens, checkpointing=checkpointing)
    seconds = time.perf_counter() - t
    pred = {k.split(" (")[0]: v for k, v in plan.ours.items() if not k.startswith("FSDP")}
    rows = {k: {"predicted_MiB": pred[k] / MiB, "measured_MiB": meas[k] / MiB} for k in pred}
    total = plan.total("ours", checkpointing)
    out = {"frames": frames, "height": height, "width": width, "tokens": plan.tokens, "checkpointing": checkpointing,
           "components": rows, "predicted_total_MiB": total / MiB, "seconds": round(seconds, 1)}
    if "peak allocated" in meas:
        out["peak_allocated_MiB"] = meas["peak allocated"] / MiB
        out["predicted_over_peak"] = total / meas["peak allocated"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="wan2.1-1.3b", choices=sorted(ARCHS))
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        device, arch, cases, rank, text = "cpu", TINY, [(5, 64, 64, True), (5, 64, 64, False)], 4, 8
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: use --cpu-smoke")
        device, arch, rank, text = "cuda", ARCHS[args.model], 64, 512
        cases = [(81, 480, 832, True), (17, 480, 832, False)]
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "model": arch.name,
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cases": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for frames, h, w, ck in cases:
        try:
            r = check(arch, device, frames, h, w, ck, rank, text)
        except Exception as e:  # e.g. out of memory: report and keep the rest
            results["cases"].append({"frames": frames, "checkpointing": ck, "error": f"{type(e).__name__}: {e}"})
            print(results["cases"][-1], flush=True)
            continue
        finally:
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        results["cases"].append(r)
        (out / "gpu_plan_check.json").write_text(json.dumps(results, indent=2))
        peak = f", peak {r['peak_allocated_MiB']:.2f} MiB (predicted/peak {r['predicted_over_peak']:.3f})" if "peak_allocated_MiB" in r else ""
        print(f"{frames}x{h}x{w} checkpointing={ck}: predicted {r['predicted_total_MiB']:.2f} MiB{peak}, {r['seconds']} s")
        for k, v in r["components"].items():
            print(f"  {k:<20} predicted {v['predicted_MiB']:10.2f}  measured {v['measured_MiB']:10.2f} MiB")
    (out / "gpu_plan_check.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'gpu_plan_check.json'}")


if __name__ == "__main__":
    main()
