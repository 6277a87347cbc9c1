"""Exact evaluation and the toy data: checked on samples whose answer is known."""
import math

import pytest
import torch

from pdmd.analytic import GaussianMixture
from pdmd.evaluate import energy_distance, mode_stats, pairwise_diversity
from pdmd.toy import PROMPTS, ToyData, sample_teacher

MIX = GaussianMixture([[-2.0, 0.0], [2.0, 0.0], [0.0, 3.0]], [0.5, 0.3, 0.2], 0.1)


def test_mode_stats_on_exact_samples():
    x = MIX.sample(20000, torch.Generator().manual_seed(0))
    m = mode_stats(MIX, x)
    assert m["covered"] == 3 and m["outliers"] < 1e-3
    assert m["mass_tv"] < 0.01
    assert m["mass"] == pytest.approx([0.5, 0.3, 0.2], abs=0.01)


def test_mode_stats_sees_a_dropped_mode_and_outliers():
    x = MIX.sample(4000, torch.Generator().manual_seed(1))
    keep = x[:, 1] < 1.5  # drop the third mode (true mass 0.2)
    x = torch.cat([x[keep], torch.full((100, 2), 10.0)])  # and add far-away outliers
    m = mode_stats(MIX, x)
    assert m["covered"] == 2
    n = x.shape[0]
    # by hand: a sample belongs to a mode within 4 std (0.4); the rest, the 100 and a few tails, are outliers
    counts = torch.tensor([((x - torch.tensor(mu)).norm(dim=1) <= 0.4).sum().item() for mu in MIX.means.tolist()])
    outliers = 1 - float(counts.sum()) / n
    assert m["outliers"] == pytest.approx(outliers) and 100 / n <= outliers < 100 / n + 0.002
    by_hand = 0.5 * (float((counts.double() / n - MIX.weights).abs().sum()) + outliers)
    assert m["mass_tv"] == pytest.approx(by_hand, abs=1e-9)


def test_energy_distance_known_values():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3000, 2, generator=g), torch.randn(3000, 2, generator=g)
    assert abs(energy_distance(a, b)) < 0.01
    # 1-D point masses at 0 and d: 2|d| - 0 - 0
    assert energy_distance(torch.zeros(5, 1), torch.full((7, 1), 3.0)) == pytest.approx(6.0)
    assert energy_distance(a, b + torch.tensor([1.0, 0.0])) > 0.3


def test_pairwise_diversity_known_values():
    square = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])
    want = (4 * 1.0 + 2 * math.sqrt(2)) / 6
    assert pairwise_diversity(square) == pytest.approx(want)
    assert pairwise_diversity(torch.zeros(3, 8, 2)) == 0.0


def test_toy_data_samples_each_prompt_from_its_mixture():
    data = ToyData()
    assert data.n_prompts == len(PROMPTS) and data.latent_shape == (2,)
    cond = torch.arange(8000) % data.n_prompts
    x = data.sample(cond, torch.Generator().manual_seed(3))
    for k, mix in enumerate(data.mixtures):
        m = mode_stats(mix, x[cond == k])
        assert m["covered"] == m["modes"] and m["mass_tv"] < 0.04, data.names[k]


def test_teacher_sampler_is_exact_with_the_exact_flow():
    """sample_teacher with the exact psi of one prompt reproduces that prompt's distribution."""
    data = ToyData()
    mix = data.mixtures[2]

    class Exact(torch.nn.Module):
        prediction = "flow"

        def __init__(self):
            super().__init__()
            from pdmd.schedules import get_schedule
            self.schedule = get_schedule("flow")

        def forward(self, x, t, cond):
            return mix.psi(x.double(), self.schedule.alpha(t).double(), self.schedule.sigma(t).double()).float()

        def null_cond(self, cond):
            return cond

    z = torch.randn(3000, 2, generator=torch.Generator().manual_seed(4))
    x = sample_teacher(Exact(), z, torch.zeros(3000, dtype=torch.long), 100, 1.0)
    m = mode_stats(mix, x)
    assert m["covered"] == 4 and m["mass_tv"] < 0.04
    assert energy_distance(x, mix.sample(3000, torch.Generator().manual_seed(5)).float()) < 0.01
