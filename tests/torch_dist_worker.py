"""One rank of the distributed tests of fastopt.torch (tests/test_torch_distributed.py):
``python torch_dist_worker.py MODE RANK WORLD PORT OUT DTYPE``, gloo on 127.0.0.1.

MODE ``ddp``: DistributedDataParallel with fastopt.torch.AdamW, each rank on its half of
the batch. MODE ``zero``: the same under ZeroRedundancyOptimizer; rank 0 consolidates the
state, loads it into torch.optim.AdamW and takes one more step with it. MODE ``fsdp``:
FSDP2 (fully_shard) with fastopt.torch.AdamW clipping the gradient norm; the full state
dicts of Distributed Checkpoint, then a fresh optimizer loaded from the full optimizer
state dict takes one more step. Rank 0 saves the parameters (and the state dicts) to OUT;
with DTYPE bfloat16 every rank also saves its parameters to OUT.RANK.
"""

import copy
import gc
import sys
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

import fastopt.torch as ft

STEPS = 5
LR = 0.01
MAX_NORM = 0.05  # below the gradients' norms: the fsdp mode clips at every step


def model_and_batch(dtype=torch.float64):
    """The model and the full batch every run starts from (the test's single process too)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 3)).to(dtype)
    x = torch.randn(16, 6, dtype=torch.float64).to(dtype)
    y = torch.randn(16, 3, dtype=torch.float64).to(dtype)
    return model, x, y


def loss_of(model, x, y):
    return (model(x) - y).square().mean()


def main(mode, rank, world, port, out, dtype):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    model, x, y = model_and_batch(getattr(torch, dtype))
    part = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    if mode == "fsdp":
        saved = fsdp(model, x[part], y[part], world)
        if rank == 0:
            torch.save(saved, out)
        if dtype == "bfloat16":
            torch.save([p.full_tensor() for p in model.parameters()], f"{out}.{rank}")
        dist.barrier()
        dist.destroy_process_group()
        return
    ddp = DistributedDataParallel(model)
    if mode == "zero":
        opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=ft.AdamW, lr=LR)
    else:
        opt = ft.AdamW(ddp.parameters(), lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        loss_of(ddp, x[part], y[part]).backward()
        opt.step()
    if dtype == "bfloat16":
        torch.save([p.detach().clone() for p in model.parameters()], f"{out}.{rank}")
    saved = {}
    if mode == "zero":
        opt.consolidate_state_dict(to=0)
        if rank == 0:
            saved["state_dict"] = opt.state_dict()
            theirs = torch.optim.AdamW(model.parameters(), lr=LR, foreach=False)
            # a copy: torch's load shares the tensors, and its step writes them
            theirs.load_state_dict(copy.deepcopy(saved["state_dict"]))
            theirs.zero_grad()
            loss_of(model, x, y).backward()
            theirs.step()
    if rank == 0:
        saved["params"] = [p.detach().clone() for p in model.parameters()]
        torch.save(saved, out)
    # DDP's Reducer holds the process group and is freed with the GIL held: were it the last
    # owner, the group's destructor would join gloo's run loop while that thread waits for
    # the GIL to free the barrier's work (a deadlock in torch). Free it first, so the group
    # is destroyed through its own Python object, which releases the GIL.
    alive = weakref.ref(ddp)
    del ddp, opt
    gc.collect()
    assert alive() is None, "DistributedDataParallel still referenced"
    dist.barrier()
    dist.destroy_process_group()


def fsdp(model, x, y, world):
    """Train under fully_shard; the full model and optimizer state dicts (DCP), and the
    full parameters after one more step of a fresh optimizer loaded from the latter."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = ft.AdamW(model.parameters(), lr=LR, max_grad_norm=MAX_NORM)
    for _ in range(STEPS):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
    full = StateDictOptions(full_state_dict=True)
    saved = {"model": get_model_state_dict(model, options=full),
             "optim": get_optimizer_state_dict(model, opt, options=full),
             "norm": opt.last_grad_norm}
    opt.zero_grad()  # (DCP initializes the new optimizer's state by a step of zero grads)
    resumed = ft.AdamW(model.parameters(), lr=LR, max_grad_norm=MAX_NORM)
    set_optimizer_state_dict(model, resumed, saved["optim"], options=full)
    resumed.zero_grad()
    loss_of(model, x, y).backward()
    resumed.step()
    saved["resumed"] = get_model_state_dict(model, options=full)
    return saved


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5],
         sys.argv[6])
