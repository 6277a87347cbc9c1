"""Run by ``torchrun --nproc_per_node 2`` from tests/test_parallel.py (gloo, CPU).

Trains the tiny toy config straight through, then again with a stop, a sharded checkpoint and a
resume, then the VARIANTS straight, then the 8-bit optimizer (``pdmd.runtime.optim.AdamW8bitV``, per-rank state)
straight and resumed; rank 0 writes the gathered final weights to OUT/straight.pt, OUT/resumed.pt,
OUT/variants.pt and OUT/eight_bit.pt.
"""
import sys
from pathlib import Path

import torch

import pdmd.core.phase as phase_mod
from pdmd.runtime import parallel
from pdmd.runtime.optim import AdamW8bitV
from pdmd.demos.toy import ToyData
from pdmd.core.trainer import PhasedDMDTrainer
from trainer_helpers import tiny_cfg, tiny_teacher

CFG = dict(max_steps=4, batch_size=8, fake_updates=2, pool_size=16)


# a LoRA fake score (re-initialised whole, then sharded); DMD (gradient through every step: several
# forwards of the sharded module before one backward); gradient accumulation
VARIANTS = {"lora_fake": dict(fake_kind="lora", fake_lora_rank=4), "dmd": dict(method="dmd"),
            "grad_accum": dict(grad_accum=2)}


def weights(trainer) -> dict:
    out = {f"experts.{k}": v for k, v in parallel.full_state(trainer.experts.module).items() if "lora_" in k}
    if trainer.fake_module is not None:
        out.update({f"fake.{k}": v for k, v in parallel.full_state(trainer.fake_module).items()})
    return out


def main(out: Path, stop_at: int) -> None:
    torch.set_num_threads(1)
    par = parallel.from_env()
    try:
        run(par, out, stop_at)
    except BaseException:
        parallel.shutdown(barrier=False)  # the other rank may never reach a barrier
        raise
    parallel.shutdown()  # both ranks done: barrier, then close the process group


def run(par, out: Path, stop_at: int) -> None:
    assert par.world == 2, par.world
    cfg = tiny_cfg(**CFG)
    a = PhasedDMDTrainer(cfg, tiny_teacher(), ToyData(), out / "straight", progress=False, parallel=par)
    a.train()
    w = weights(a)
    if par.is_main:
        torch.save(w, out / "straight.pt")
    b = PhasedDMDTrainer(cfg, tiny_teacher(), ToyData(), out / "resumed", progress=False, parallel=par)
    b.train(stop_at=stop_at)
    c = PhasedDMDTrainer(cfg, tiny_teacher(), ToyData(), out / "continued", progress=False, parallel=par)
    c.load(out / "resumed" / parallel.DCP_DIR)  # kept: the test also resumes it on one rank
    assert c.step == stop_at, c.step
    c.train()
    w = weights(c)
    if par.is_main:
        torch.save(w, out / "resumed.pt")
    ws = {}
    for name, kw in VARIANTS.items():
        d = PhasedDMDTrainer(tiny_cfg(**CFG, **kw), tiny_teacher(), ToyData(), out / name, progress=False, parallel=par)
        d.train()
        ws[name] = weights(d)
    if par.is_main:
        torch.save(ws, out / "variants.pt")
    phase_mod.build_optimizer = lambda name, params, lr, betas, weight_decay: AdamW8bitV(
        params, lr=lr, betas=betas, weight_decay=weight_decay, seed=5)
    ws = {}
    for name, stop in (("straight", None), ("stopped", stop_at)):
        e = PhasedDMDTrainer(cfg, tiny_teacher(), ToyData(), out / f"8bit_{name}", progress=False, parallel=par)
        e.train(stop_at=stop)
        ws[name] = weights(e)
    codes = [st["codes"] for st in e.opt_fake.state.values() if "codes" in st]
    assert codes and not any(hasattr(c, "to_local") for c in codes)  # plain per-rank tensors
    f = PhasedDMDTrainer(cfg, tiny_teacher(), ToyData(), out / "8bit_continued", progress=False, parallel=par)
    f.load(out / "8bit_stopped" / parallel.DCP_DIR)
    f.train()
    ws["resumed"] = weights(f)
    if par.is_main:
        torch.save(ws, out / "eight_bit.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
