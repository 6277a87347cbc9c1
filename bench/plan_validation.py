"""Planner vs measured bytes on tiny diffusers models (CPU tensor accounting); prints a markdown table.

    PYTHONPATH=.:kernels python bench/plan_validation.py
"""
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "kernels")]
from pdmd.tools.planner import Arch, make_plan, measure_activations, measure_layout  # noqa: E402

CASES = [
    # arch, latent (frames, hw) for the layout step, activation case (batch, hw, frames, text tokens)
    (Arch("tiny-wan", "wan", 3, 3, 32, 160, 32, in_channels=4, out_channels=4, freq_dim=32), (2, 4), (2, 16, 3, 8)),
    (Arch("tiny-qwen", "qwen", 3, 3, 32, 384, 24, in_channels=16, out_channels=4), (1, 16), (1, 64, 1, 16)),
]


def main():
    print("| model | component | predicted bytes | measured bytes | predicted / measured |")
    print("|---|---|---:|---:|---:|")
    for arch, (lf, hw), (b, ahw, af, tt) in CASES:
        pix = dict(frames=4 * (lf - 1) + 1 if arch.family == "wan" else 1, height=8 * hw, width=8 * hw)
        plan = make_plan(arch, lora_rank=4, experts=2, **pix)
        pred = {k.split(" (")[0]: v for k, v in plan.ours.items() if not k.startswith("FSDP")}
        meas = measure_layout(arch, lora_rank=4, experts=2)
        rows = [(k, pred[k], meas[k]) for k in pred]
        for ck in (False, True):
            m, e = measure_activations(arch, b, ahw, af, tt, checkpointing=ck)
            rows.append((f"activations ({'checkpointing, forward-saved' if ck else 'no checkpointing'})", e, m))
        for k, p, m in rows:
            print(f"| {arch.name} | {k} | {p} | {m} | {p / m:.3f} |")


if __name__ == "__main__":
    main()
