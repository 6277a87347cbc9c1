"""Exact evaluation and the toy data: checked on samples whose answer is known."""
import math

import pytest
import torch

from pdmd.core.analytic import GaussianMixture
from pdmd.demos.evaluate import energy_distance, expected_precision, mode_stats, over_seeds, pairwise_diversity, precision
from pdmd.demos.toy import PROMPTS, ToyData, sample_teacher

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
            from pdmd.core.schedules import get_schedule
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


# ---------------------------------------------------------------------- precision (issue 11 item 4)
def test_precision_counts_each_sample_against_every_mode_in_its_own_std():
    """Known shares: min over modes of ||x - m_i|| / std_i <= k, each mode in its own std."""
    mix = GaussianMixture([[0.0, 0.0], [5.0, 0.0]], [0.5, 0.5], [0.1, 1.0])
    x = torch.tensor([
        [0.29, 0.0],   # 2.9 std of mode 0: in
        [0.0, -0.31],  # 3.1 std of mode 0, 4.7+ of mode 1: out
        [2.4, 0.0],    # nearer mode 0 (24 of its std) but 2.6 std of mode 1: in
        [7.9, 0.0],    # 2.9 std of mode 1: in
        [5.0, 3.2],    # 3.2 std of mode 1: out
    ])
    assert precision(mix, x) == pytest.approx(3 / 5)
    assert precision(mix, x, k=2.0) == pytest.approx(0.0)  # 2.4 -> 2.6 std, 7.9 -> 2.9 std: all beyond 2
    assert precision(mix, x, k=3.15) == pytest.approx(4 / 5)  # (0, -0.31) at 3.1 std now in, (5, 3.2) still out
    assert precision(mix, x, k=10.0) == pytest.approx(1.0)


def test_expected_precision_closed_form_and_exact_samples():
    """P(chi^2_d <= k^2): 1 - exp(-k^2/2) in 2-D, erf(k/sqrt 2) in 1-D; exact samples land on it within
    the binomial error of n draws (5 standard errors: a false failure has probability < 1e-6)."""
    assert expected_precision() == pytest.approx(1 - math.exp(-4.5), rel=1e-12)
    assert expected_precision(2.0) == pytest.approx(1 - math.exp(-2.0), rel=1e-12)
    assert expected_precision(3.0, dim=1) == pytest.approx(math.erf(3 / math.sqrt(2)), rel=1e-12)
    n = 20000
    for seed, mix in enumerate([MIX, *ToyData().mixtures]):
        for k in (1.0, 3.0):
            p = expected_precision(k)
            got = precision(mix, mix.sample(n, torch.Generator().manual_seed(40 + seed)).float(), k)
            assert abs(got - p) <= 5 * math.sqrt(p * (1 - p) / n), (seed, k, got, p)


def test_evaluate_run_measures_each_prompt_against_its_own_mixture():
    """A sampler that returns the exact data of the requested prompt has the data's precision per prompt."""
    from pdmd.demos.distill import evaluate_run
    from tests.trainer_helpers import tiny_cfg

    cfg = tiny_cfg()
    cfg.eval.samples_per_prompt = 1000
    data = ToyData()
    gen = torch.Generator().manual_seed(6)
    exact = lambda z, c: data.sample(c, gen)
    ev = evaluate_run(cfg, data, {"teacher": exact, "generator": exact})
    p, n = expected_precision(), cfg.eval.samples_per_prompt
    assert ev["data"]["mean"]["precision"] == p
    for name in data.names:
        got = ev["generator"]["per_prompt"][name]["precision"]
        assert abs(got - p) <= 5 * math.sqrt(p * (1 - p) / n), name
    assert ev["generator"]["mean"]["precision"] == pytest.approx(
        sum(v["precision"] for v in ev["generator"]["per_prompt"].values()) / data.n_prompts)


def test_over_seeds_mean_and_sample_std():
    runs = [{"a": {"x": 1.0, "n": 15, "mass": [0.1], "name": "s"}}, {"a": {"x": 2.0, "n": 13}},
            {"a": {"x": 6.0, "n": 14}}]
    s = over_seeds(runs)
    assert set(s["a"]) == {"x", "n"}  # lists, strings and keys one seed lacks are left out
    assert s["a"]["x"]["mean"] == pytest.approx(3.0) and s["a"]["x"]["values"] == [1.0, 2.0, 6.0]
    assert s["a"]["x"]["std"] == pytest.approx(math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2))
    assert (s["a"]["x"]["min"], s["a"]["x"]["max"]) == (1.0, 6.0) and s["a"]["n"]["mean"] == pytest.approx(14.0)
    assert over_seeds(runs[:1])["a"]["x"]["std"] == 0.0
