"""Phases of a ``PhasedDMDTrainer``: which phase a step belongs to, and what a phase starts with.

Phase k (0-based here, 1-based in logs) trains expert k+1 against a fake score made fresh from the teacher on
(b_{k+1}, 1], with fresh optimisers and fresh boundary pools (one per resolution, made when first drawn).
"""
from __future__ import annotations

from pdmd.core.experts import DenoiserView, base_state, expert_name, parts_above
from pdmd.core.pool import BoundaryPool
from pdmd.runtime.optim import build_optimizer

__all__ = ["PhaseMixin", "split_steps"]


def split_steps(total: int, parts: int) -> list[int]:
    """Generator updates per phase: ``total`` split as evenly as possible, earlier phases first."""
    return [total // parts + (1 if p < total % parts else 0) for p in range(parts)]


class PhaseMixin:
    """Phase set-up of ``PhasedDMDTrainer`` (uses its ``cfg``, ``plan``, ``experts``, ``par``, ``gens``)."""

    def phase_of(self, step: int) -> int:
        acc = 0
        for p, n in enumerate(self.phase_lengths):
            acc += n
            if step < acc:
                return p
        return self.plan.n_phases - 1

    def start_phase(self, p: int) -> None:
        """Phase p (0-based): expert p+1 trainable, a fresh fake score from the teacher, fresh optimisers."""
        d = self.cfg.distill
        self.phase = p
        s = self.plan.boundaries[p + 1]
        lora_fake = self.cfg.fake.kind == "lora"
        # the fake score is the teacher at phase start on all of (s, 1] and is trained on all of it: the parts of the
        # teacher it runs there (Wan 2.2 A14B's last phase: both transformers) are the parts it trains
        gen_params = self.experts.train_only([expert_name(p + 1)] + (["fake"] if lora_fake else []), phase=p + 1,
                                             fake_above=s if lora_fake else None)
        if lora_fake:
            self.par.reset_adapter(self.experts, "fake", seed=self.cfg.seed * 1000 + p)  # B = 0 on every part
            fake_params = list(self.experts.adapter_params("fake", above=s).values())
            gen_params = [q for q in gen_params if all(q is not f for f in fake_params)]
            self.fake = self.experts.view("fake")
        else:
            # with fp8_base the base holds FP8 copies: the fake score starts from the bf16 source weights instead
            source = getattr(self, "fake_source", None)
            self.fake_module.load_state_dict(source if source is not None else base_state(self.experts.module))
            self.fake_module.requires_grad_(False)
            fake_params = [q for part in parts_above(self.fake_module, s) for q in part.parameters()]
            for q in fake_params:
                q.requires_grad_(True)
            self.fake = DenoiserView(self.fake_module, self.prediction, self.schedule, self.experts.null_cond,
                                     self._autocast)
        self.gen_params, self.fake_params = gen_params, fake_params
        g, f = self.cfg.generator, self.cfg.fake
        self.opt_gen = self._optimizer(g.optimizer, gen_params, g.lr, p)
        self.opt_fake = self._optimizer(f.optimizer, fake_params, f.lr, p)
        if "step_in_backward" in getattr(self, "memory", ()):  # updates during backward (pdmd.runtime.memory)
            for h in getattr(self, "_fake_hooks", []):
                h.remove()
            self._fake_hooks = self.opt_fake.step_in_backward(skip_nonfinite=True)
        self.pools = {}  # resolution index -> BoundaryPool, made when first drawn
        self.boundary = self.plan.boundaries[p + 1]

    def _optimizer(self, name: str, params, lr: float, phase: int):
        g = self.cfg.generator
        kw = {"seed": self.cfg.seed * 1000 + phase} if name == "adamw8bit-v" else {}  # its rounding bits
        return build_optimizer(name, params, lr, g.betas, g.weight_decay, **kw)

    @property
    def fake_owner(self):
        """The module holding the fake score's parameters: the full copy, or the shared one (LoRA fake)."""
        return self.fake_module if self.fake_module is not None else self.experts.module

    # ------------------------------------------------------------------ pools
    @property
    def pool(self) -> BoundaryPool:
        """The boundary pool of the current phase and resolution."""
        return self._pool(self.shape_index)

    def _pool(self, i: int) -> BoundaryPool:
        """Resolution ``i``'s boundary pool of the current phase, made when first asked for."""
        if i not in self.pools:
            d = self.cfg.distill
            draw = lambda n, gen: self._draw(n, gen, self.shapes[i])  # noqa: E731
            self.pools[i] = BoundaryPool(draw, self._prefix(self.phase), d.pool_size if self.phase > 0 else d.batch_size,
                                         d.batch_size, self.gens["pool"], self.par.world)
        return self.pools[i]

    def pool_states(self) -> dict[str, dict]:
        """What a checkpoint stores of the pools: each one's fill RNG state and cursor, by resolution index."""
        return {str(i): pool.state() for i, pool in self.pools.items()}

    def restore_pools(self, states: dict[str, dict]) -> None:
        """The pools of ``pool_states`` back: each refilled from its stored RNG state (the same samples)."""
        self.pools = {}
        for i, st in sorted(states.items(), key=lambda kv: int(kv[0])):
            self._pool(int(i)).restore(st["fill_state"], st["cursor"])
