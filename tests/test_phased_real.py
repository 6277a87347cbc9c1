"""One full phased iteration through PhasedDMDTrainer on tiny real diffusers classes via the pdmd adapters:
r fake updates + one generator update in phase 1, then phase 2 from the frozen expert 1's boundary pool."""
import pytest
import torch

from pdmd.core.experts import base_state
from pdmd.models import QwenImageDenoiser, WanDenoiser
from pdmd.core.trainer import PhasedDMDTrainer

from tiny_models import tiny_qwen, tiny_wan
from trainer_helpers import tiny_cfg


pytestmark = pytest.mark.usefixtures("one_thread")


class PromptTask:
    """Conditions as the prompt cache builds them: a dict with the negative prompt beside the prompt."""

    def __init__(self, latent_shape, text_dim, n_prompts=3, length=5):
        g = torch.Generator().manual_seed(1)
        self.latent_shape = latent_shape
        self.embeds = torch.randn(n_prompts, length, text_dim, generator=g)
        self.neg = torch.randn(1, length, text_dim, generator=g)

    def sample_cond(self, n, generator=None):
        idx = torch.randint(0, self.embeds.shape[0], (n,), generator=generator)
        ones = torch.ones(n, self.embeds.shape[1], dtype=torch.long)
        return {"embeds": self.embeds[idx], "mask": ones, "neg_embeds": self.neg.expand(n, -1, -1).clone(), "neg_mask": ones}


class EmbedTask:
    """Conditions as a bare embedding tensor (the digits demo's class tokens; null = zeros)."""

    def __init__(self, latent_shape, text_dim):
        self.latent_shape = latent_shape
        self.table = torch.randn(4, 2, text_dim, generator=torch.Generator().manual_seed(2))

    def sample_cond(self, n, generator=None):
        return self.table[torch.randint(0, 4, (n,), generator=generator)]


def _snapshot(tr):
    return {a: {n: p.detach().clone() for n, p in tr.experts.adapter_params(a).items()} for a in tr.experts.adapters}


def _changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[n], after[n]) for n in before)


CASES = {
    "wan": (lambda: WanDenoiser(tiny_wan(), shift=3.0), lambda: PromptTask((4, 1, 4, 4), 16)),
    "qwen-image": (lambda: QwenImageDenoiser(tiny_qwen(), shift=1.5), lambda: EmbedTask((4, 4, 4), 16)),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_one_phased_iteration_per_phase(tmp_path, kind):
    make_model, make_task = CASES[kind]
    cfg = tiny_cfg(max_steps=2, batch_size=4, fake_updates=2, pool_size=8, lr_generator=1e-2, lr_fake=1e-2)
    tr = PhasedDMDTrainer(cfg, make_model(), make_task(), tmp_path, progress=False)
    assert tr.plan.n_phases == 2
    # LoRA attached to the adapter's listed layers of the real transformer
    targets = type(tr.experts.module).lora_targets
    lora_modules = [n for n, m in tr.experts.module.named_modules() if hasattr(m, "lora_A")]
    assert lora_modules and all(n.endswith(targets) for n in lora_modules)

    base0 = {k: v.clone() for k, v in base_state(tr.experts.module).items()}
    g = torch.Generator().manual_seed(5)
    x = torch.randn((2, *tr.task.latent_shape), generator=g)
    t = torch.tensor([0.9, 0.3])
    c = tr.task.sample_cond(2, g)
    teacher_out = tr.teacher(x, t, c)

    for phase in (0, 1):
        tr.start_phase(phase)
        fake0 = {k: v.clone() for k, v in tr.fake_module.state_dict().items()}
        # a fresh fake score is the teacher at the phase start
        assert all(torch.equal(fake0[k], base0[k]) for k in base0)
        ad0 = _snapshot(tr)
        rec = tr.iteration()
        assert all(torch.isfinite(torch.tensor(v)) for v in rec.values())
        ad1 = _snapshot(tr)
        active, other = f"expert_{phase + 1}", f"expert_{2 - phase}"
        assert _changed(ad0[active], ad1[active]), "the phase's expert LoRA did not move"
        assert not _changed(ad0[other], ad1[other]), "the other expert moved"
        assert any(not torch.equal(fake0[k], v) for k, v in tr.fake_module.state_dict().items()), "fake score did not move"
        base1 = base_state(tr.experts.module)
        assert all(torch.equal(base0[k], base1[k]) for k in base0), "base (teacher) weights changed"
        assert torch.equal(tr.teacher(x, t, c), teacher_out)
    assert tr.step == 2 and tr.nonfinite_total == 0
