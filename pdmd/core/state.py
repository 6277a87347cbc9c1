"""The whole state of a ``PhasedDMDTrainer`` as one ``state_dict()`` / ``load_state_dict()`` pair (in the spirit of
torchtitan's ``Stateful``), and saving/loading it through ``pdmd.runtime.checkpoint``, which sees only the dict.

The state (a nested dict of tensors and plain values)::

    step, phase                    int: generator updates taken; the phase in progress (-1: none started)
    config                         the run's config (``RunConfig.to_dict``), checked on resume
    nonfinite: total, run          skipped updates, in all and in a row
    rng: main, rollout, pool       the trainer's generators; torch (CPU); cuda (the device's, on CUDA)
    adapter: {name: tensor}        every LoRA adapter (experts; the LoRA fake score), by its name in the peft model
    fake: {name: tensor}           the full fake score (fake.kind: full), once a phase started
    optim: generator, fake         the optimisers' own state dicts (by parameter name under FSDP2)
    pools: {resolution: ...}       each boundary pool's fill RNG state and global cursor

Module and optimiser states come from ``Parallel.model_state``/``optim_state``: plain tensors in one process,
DTensor shards under FSDP2 (written by DCP, resharded on load).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from pdmd.core.resume import check_config, latest_path
from pdmd.runtime import checkpoint
from pdmd.runtime.checkpoint import CheckpointError, save_tensors
from pdmd.runtime.parallel import gathered
from pdmd.runtime.rundir import candidates, warn

__all__ = ["StateMixin"]


class StateMixin:
    """``state_dict``/``load_state_dict``, ``save``/``load`` and ``export_experts`` of ``PhasedDMDTrainer``."""

    def state_dict(self) -> dict:
        """Everything the next step depends on (see the module docstring); tensors are references, not copies."""
        rng = {k: g.get_state() for k, g in self.gens.items()}
        rng["torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {"step": self.step, "phase": self.phase, "config": self.cfg.to_dict(),
                 "nonfinite": {"total": self.nonfinite_total, "run": self.nonfinite_run}, "rng": rng,
                 "adapter": self._adapter_state()}
        if self.phase >= 0:
            if self.fake_module is not None:
                state["fake"] = self.par.model_state(self.fake_module)
            state["optim"] = {"generator": self.par.optim_state(self.experts.module, self.opt_gen),
                              "fake": self.par.optim_state(self.fake_owner, self.opt_fake)}
            state["pools"] = self.pool_states()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Make this trainer continue exactly where the one that gave ``state`` was (same config: ``check_config``).
        Values are copied in; ``state`` is not kept. ValueError for another run's state (``check_config``)."""
        self.check_config(state["config"], "the given state", state["step"])
        phase = state["phase"]
        if phase >= 0 and phase != self.phase:
            self.start_phase(phase)  # the phase's trainable set, fake score and optimisers, then their values
        mine = set(self._adapter_state())
        if set(state["adapter"]) != mine:
            raise ValueError(f"state adapter weights {sorted(set(state['adapter']) ^ mine)} differ from this trainer's")
        self.par.load_model_state(self.experts.peft, state["adapter"], strict=False)
        if phase >= 0:
            if self.fake_module is not None:
                self.par.load_model_state(self.fake_module, state["fake"])
            self.par.load_optim_state(self.experts.module, self.opt_gen, state["optim"]["generator"])
            self.par.load_optim_state(self.fake_owner, self.opt_fake, state["optim"]["fake"])
            self.restore_pools(state["pools"])  # refilled by the loaded experts, from the stored pool RNG states
        rng = state["rng"]
        for k, g in self.gens.items():  # after the pools: their refills moved the pool generator
            g.set_state(rng[k])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.step, self.phase = state["step"], phase
        self.nonfinite_total, self.nonfinite_run = state["nonfinite"]["total"], state["nonfinite"]["run"]

    def _adapter_state(self) -> dict:
        # the peft model's names (``base_model.model.<module>.lora_A.expert_1.weight``), as the files always had
        return {k: v for k, v in self.par.model_state(self.experts.peft).items() if "lora_" in k}

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        """``checkpoint.safetensors``, or the sharded ``checkpoint.dcp`` directory with more than one process.
        The ``distill.keep_checkpoints - 1`` before it are ``checkpoint.step_<step>.safetensors`` (``.dcp``)."""
        return latest_path(self.out, self.par.distributed)

    def save(self, path: str | Path | None = None) -> Path:
        """Atomic checkpoint of ``state_dict()``; the one it replaces is kept under its step name
        (``pdmd.runtime.rundir.install``) up to ``distill.keep_checkpoints``."""
        path = checkpoint.save(path or self.checkpoint_path, self.state_dict(),
                               keep=self.cfg.distill.keep_checkpoints, par=self.par)
        self._saved = (self.step, path)
        return path

    def load(self, path: str | Path | None = None) -> Path:
        """Restore a checkpoint written by ``save`` with the same configuration (see ``check_config``).

        With no ``path``, the newest usable one of this run directory: a truncated or corrupt newest checkpoint
        gives a warning naming it and the one used instead. Returns the path loaded."""
        if path is not None:
            self._load(Path(path))
            return Path(path)
        found = candidates(self.checkpoint_path)
        if not found:
            raise ValueError(f"no checkpoint in {self.out} (looked for {self.checkpoint_path.name} and "
                             "checkpoint.step_*)")
        for i, p in enumerate(found):
            try:
                self._load(p)
                return p
            except CheckpointError as e:
                if i + 1 == len(found):
                    raise CheckpointError(f"no usable checkpoint in {self.out}: the last one tried failed: {e}") from None
                warn(f"{e}; resuming from {found[i + 1]} instead")

    def _load(self, path: Path) -> None:
        def prepare(plain: dict) -> dict:
            """Refuse another run's checkpoint, then take its phase: our state dict is then the template of its."""
            self.check_config(plain["config"], path, plain["step"])
            if plain["phase"] >= 0 and plain["phase"] != self.phase:
                self.start_phase(plain["phase"])
            return self.state_dict()
        self.load_state_dict(checkpoint.load(path, par=self.par, prepare=prepare))
        self._saved = (self.step, path)

    def check_config(self, stored: dict, path, step: int | None = None) -> str | None:
        """``check_config`` for this trainer's config."""
        return check_config(self.cfg, stored, path, step)

    def export_experts(self, path: str | Path) -> None:
        """The distilled generator alone: every expert's LoRA weights (safetensors)."""
        tensors = {n: gathered(p) for name in self.experts.adapters if name != "fake"
                   for n, p in self.experts.adapter_params(name).items()}
        if self.par.is_main:
            save_tensors(path, tensors, {"config": json.dumps(self.cfg.to_dict())})
