"""DDP with 2 gloo processes on the CPU trains the same model as one process on the same global batch."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from kt_core.distill import ddp
from kt_core.distill.loop import DictDataset, fit
from kt_core.distill.mixkd import DistillConfig, MixableModule, make_objective

torch.set_num_threads(1)
N, LOCAL_BATCH, WORLD = 48, 8, 2


class Small(MixableModule):
    """No dropout, no batch statistics: its gradient is a plain mean over the batch, so averaging
    two half-batches' gradients (DDP) equals the full batch's."""

    def __init__(self, seed: int, width: int = 16):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(12, width)
        self.hidden = torch.nn.Linear(width, width)
        self.out = torch.nn.Linear(width, 3)

    def embed(self, batch):
        return {"words": self.emb(batch["input_ids"])}

    def classify(self, embedded, batch):
        m = batch["attention_mask"].float().unsqueeze(-1)
        pooled = (embedded["words"] * m).sum(1) / m.sum(1)
        return self.out(torch.tanh(self.hidden(pooled)))


def data() -> DictDataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 12, (N, 7), generator=g)
    return DictDataset({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "labels": (ids[:, 0] % 3).long()})


def config(batch_size: int) -> DistillConfig:
    # plain KD: deterministic given the batches (MixKD draws pairs within each process's batch)
    return DistillConfig(method="kd", epochs=2, batch_size=batch_size, lr=0.01, warmup=0.0, device="cpu", seed=3)


def train(rank: int, world: int, batch_size: int, wrap=None) -> Small:
    student, teacher = Small(seed=1), Small(seed=2)
    fit(student, data(), make_objective(config(batch_size)), teacher=teacher, rank=rank, world_size=world,
        ddp_wrap=wrap, progress=False, bucket_by_length=False)
    return student


def _worker(out: str) -> None:
    torch.set_num_threads(1)
    ctx = ddp.DistContext.from_env()
    device = ddp.setup(ctx, "cpu")
    try:
        student = train(ctx.rank, ctx.world_size, LOCAL_BATCH, ddp.wrapper(ctx, device))
        save_file({k: v.contiguous() for k, v in student.state_dict().items()}, f"{out}.rank{ctx.rank}")
    finally:
        ddp.teardown()


def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path):
    single = train(0, 1, LOCAL_BATCH * WORLD)
    initial = Small(seed=1).state_dict()
    # fork: the children skip re-importing torch (this test never touches CUDA)
    ddp.spawn(_worker, WORLD, args=(str(tmp_path / "ddp"),), start_method="fork")
    ranks = [load_file(str(tmp_path / f"ddp.rank{r}")) for r in range(WORLD)]
    for name, expected in single.state_dict().items():
        assert not torch.equal(expected, initial[name]), f"{name} did not train"
        for r, state in enumerate(ranks):
            torch.testing.assert_close(state[name], expected, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"rank {r}, {name}: {m}")


def test_context_from_env():
    assert ddp.DistContext.from_env({}) == ddp.DistContext()
    ctx = ddp.DistContext.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                                    "MASTER_PORT": "29500"})
    assert ctx.distributed and not ctx.is_main and ctx.master_port == 29500
    with pytest.raises(ddp.DistributedSetupError, match="MASTER_ADDR"):
        ddp.DistContext.from_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"})
    with pytest.raises(ddp.DistributedSetupError, match="RANK: 2 is not in"):
        ddp.DistContext.from_env({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1"})
    with pytest.raises(ddp.DistributedSetupError, match="WORLD_SIZE: not an integer"):
        ddp.DistContext.from_env({"WORLD_SIZE": "two"})


def test_backend_follows_the_device():
    assert ddp.backend_for(torch.device("cpu")) == "gloo"
    assert ddp.backend_for(torch.device("cuda", 0)) == "nccl"
