"""One checkpoint schema: the trainer's whole state is ``state_dict()``/``load_state_dict()``, and
``pdmd.runtime.checkpoint`` writes and reads such a dict without a trainer (safetensors for one process, DCP for N)."""
import tempfile

import pytest
import torch
from torch import nn

from pdmd.core.trainer import PhasedDMDTrainer
from pdmd.demos.toy import ToyData
from pdmd.models import WanDenoiser
from pdmd.runtime import checkpoint, parallel
from pdmd.runtime.checkpoint import CheckpointError
from test_phased_real import PromptTask
from tiny_models import tiny_wan
from trainer_helpers import tiny_cfg, tiny_teacher

pytestmark = pytest.mark.usefixtures("one_thread")


def same(a, b, where="state") -> None:
    """``a`` and ``b`` are equal: the same nesting, types (tuple is not list), keys, plain values and tensor bits."""
    if torch.is_tensor(a):
        a, b = (x.full_tensor() if hasattr(x, "full_tensor") else x for x in (a, b))
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.cpu(), b.cpu()), where
    elif isinstance(a, dict):  # a module's state dict is an OrderedDict
        assert isinstance(b, dict) and set(a) == set(b), (where, sorted(map(str, a)), sorted(map(str, b)))
        for k in a:
            same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(b) is type(a) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}/{i}")
    else:
        assert type(a) is type(b) and a == b, (where, a, b)


def toy(out, **kw) -> PhasedDMDTrainer:
    return PhasedDMDTrainer(tiny_cfg(method="phased_sgts", max_steps=8, **kw), tiny_teacher(), ToyData(), out,
                            progress=False)


def wan(out, **kw) -> PhasedDMDTrainer:
    cfg = tiny_cfg(**{"max_steps": 4, "batch_size": 4, "fake_updates": 2, "pool_size": 8, "lr_generator": 1e-2,
                      "lr_fake": 1e-2, **kw})
    return PhasedDMDTrainer(cfg, WanDenoiser(tiny_wan(), 3.0), PromptTask((4, 1, 4, 4), 16), out, progress=False)


def trained(tr) -> dict:
    """Every weight that training moves: adapters and the fake score."""
    out = {k: v.clone() for k, v in tr.state_dict()["adapter"].items()}
    if tr.fake_module is not None:
        out.update({f"fake.{k}": v.clone() for k, v in tr.fake_module.state_dict().items()})
    return out


# ---------------------------------------------------------------- the trainer's state dict
@pytest.mark.parametrize("make, stop, kw", [(toy, 5, {}), (toy, 6, {"fake_kind": "lora", "fake_lora_rank": 2}),
                                            (wan, 3, {})], ids=["toy", "toy-lora-fake", "tiny-wan"])
def test_load_state_dict_of_state_dict_continues_bit_identically(tmp_path, make, stop, kw):
    """A fresh trainer given another's ``state_dict()`` (mid phase 2, pools part-used; no files) holds the same
    state and continues exactly as an uninterrupted run."""
    straight = make(tmp_path / "s", **kw)
    straight.train()
    first = make(tmp_path / "a", **kw)
    first.train(stop_at=stop)
    assert first.phase == 1 and 0 < first.pool.cursor
    sd = first.state_dict()
    assert set(sd) == {"step", "phase", "config", "nonfinite", "rng", "adapter", "optim", "pools"} | (
        {"fake"} if first.fake_module is not None else set())
    fresh = make(tmp_path / "b", **kw)
    fresh.load_state_dict(sd)
    same(sd, fresh.state_dict())
    assert fresh.step == stop and fresh.phase == 1 and fresh.pool.cursor == first.pool.cursor
    fresh.train()
    a, b = trained(straight), trained(fresh)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], v) for k, v in trained(first).items())  # the steps after the stop mattered


def test_state_dict_before_any_phase_round_trips(tmp_path):
    tr = toy(tmp_path / "a")
    sd = tr.state_dict()
    assert sd["phase"] == -1 and "optim" not in sd and sd["adapter"]
    fresh = toy(tmp_path / "b")
    fresh.load_state_dict(sd)
    same(sd, fresh.state_dict())


def test_a_state_of_another_run_is_refused(tmp_path):
    sd = toy(tmp_path / "a", fake_kind="lora", fake_lora_rank=2).state_dict()
    with pytest.raises(ValueError, match="fake.kind is 'full' but the checkpoint the given state"):
        toy(tmp_path / "b").load_state_dict(sd)
    sd["config"] = toy(tmp_path / "c").cfg.to_dict()  # the config passes, the adapters still differ
    with pytest.raises(ValueError, match=r"state adapter weights .*fake.* differ"):
        toy(tmp_path / "b").load_state_dict(sd)


def test_the_trainer_state_through_a_file_is_the_same_dict(tmp_path):
    tr = toy(tmp_path)
    tr.train(stop_at=5)
    path = checkpoint.save(tmp_path / "x.safetensors", tr.state_dict())
    same(tr.state_dict(), checkpoint.load(path))


# ---------------------------------------------------------------- the checkpoint module alone
def hand_made(step=7) -> dict:
    lin = nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, betas=(0.0, 0.99))
    lin(torch.randn(4, 3)).square().sum().backward()
    opt.step()
    return {"step": step, "weights": {"w": torch.randn(2, 3), "bf16": torch.randn(4).bfloat16(), "none": None},
            "optim": opt.state_dict(), "ints": {0: "zero", 3: (1, 2.5, "x")}, "list": [torch.arange(3), True, 0.1],
            "rng": torch.Generator().manual_seed(1).get_state()}


def test_a_state_dict_alone_round_trips_through_safetensors(tmp_path):
    state = hand_made()
    path = tmp_path / "c.safetensors"
    assert checkpoint.save(path, state, keep=2) == path
    back = checkpoint.load(path)
    same(state, back)  # int keys, tuples, None, bf16, an optimiser's own state dict: all as given
    seen = []
    checkpoint.load(path, prepare=seen.append)
    assert seen == [{"step": 7, "weights": {"none": None}, "optim": {"state": {0: {}, 1: {}},
                     "param_groups": state["optim"]["param_groups"]}, "ints": state["ints"], "list": [None, True, 0.1]}]
    assert checkpoint.peek(path) == seen[0] and checkpoint.stored_step(path) == 7
    opt = torch.optim.AdamW(nn.Linear(3, 2).parameters(), lr=1.0)
    opt.load_state_dict(back["optim"])  # an optimiser takes it back
    assert opt.param_groups[0]["betas"] == (0.0, 0.99)
    checkpoint.save(path, hand_made(step=9), keep=2)  # rotation: the one replaced keeps its step name
    assert checkpoint.stored_step(path) == 9 and checkpoint.stored_step(tmp_path / "checkpoint.step_000007.safetensors") == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors", "checkpoint.step_000007.safetensors"]


def test_the_checkpoint_module_refuses_what_it_cannot_keep(tmp_path):
    path = tmp_path / "c.safetensors"
    with pytest.raises(ValueError, match="int 'step'"):
        checkpoint.save(path, {"w": torch.ones(1)})
    with pytest.raises(ValueError, match="w.bad is a device"):
        checkpoint.save(path, {"step": 1, "w": {"bad": torch.device("cpu")}})
    with pytest.raises(ValueError, match="non-finite"):
        checkpoint.save(path, {"step": 1, "w": torch.tensor([float("nan")])})
    assert not path.exists()
    checkpoint.save(path, hand_made())
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # a flipped bit in the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fails its CRC-32 check"):
        checkpoint.load(path)
    with pytest.raises(CheckpointError, match="fails its CRC-32 check"):
        checkpoint.peek(path)


def test_a_sharded_state_dict_alone_round_trips_through_dcp(tmp_path):
    """DCP on a one-rank gloo world: FSDP2-sharded weights and optimiser state, plain values and RNG bytes, read
    back into a template through ``prepare`` (which sees the plain values only)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def build(seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
        fully_shard(m, mesh=mesh)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        m(torch.randn(5, 3)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        return m, opt

    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/store", rank=0, world_size=1)
        try:
            mesh = init_device_mesh("cpu", (1,))
            par = parallel.Parallel(mesh)
            m, opt = build(0)
            state = {"step": 4, "model": par.model_state(m), "optim": par.optim_state(m, opt),
                     "rng": torch.Generator().manual_seed(2).get_state(), "note": (1, "a")}
            path = checkpoint.save(tmp_path / checkpoint.DCP_DIR, state, par=par)
            assert checkpoint.verify_manifest(path)["step"] == 4 and checkpoint.stored_step(path) == 4
            plain = {"step": 4, "model": {}, "note": (1, "a")}  # the sharded weights' places are left out
            assert checkpoint.peek(path) == plain
            m2, opt2 = build(1)
            seen = []

            def prepare(plain):
                seen.append(plain)
                return {"step": 0, "model": par.model_state(m2), "optim": par.optim_state(m2, opt2)}
            back = checkpoint.load(path, par=par, prepare=prepare)
            assert seen == [plain]
            same(state, back)
            par.load_model_state(m2, back["model"])
            for a, b in zip(m.parameters(), m2.parameters()):
                assert torch.equal(a.full_tensor(), b.full_tensor())
            with pytest.raises(ValueError, match="pass prepare"):
                checkpoint.load(path, par=par)
        finally:
            dist.destroy_process_group()
