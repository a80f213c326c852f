"""fastopt.torch under torch.distributed: two processes, gloo, 127.0.0.1 (the ranks are
tests/torch_dist_worker.py), against one process on the full batch."""

import os
import socket
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastopt.torch")
if not torch.distributed.is_available():
    pytest.skip("torch without torch.distributed", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import torch_dist_worker as worker  # noqa: E402

WORLD = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(mode, tmp_path, dtype="float64"):
    out = str(tmp_path / f"{mode}.pt")
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "torch_dist_worker.py"),
                               mode, str(rank), str(WORLD), str(port), out, dtype],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for rank in range(WORLD)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=180)[0].decode())
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    if dtype == "bfloat16":
        return [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(WORLD)]
    return torch.load(out, weights_only=True)


def _single_process(steps, dtype=torch.float64, **options):
    model, x, y = worker.model_and_batch(dtype)
    opt = ft.AdamW(model.parameters(), lr=worker.LR, **options)
    for _ in range(steps):
        opt.zero_grad()
        worker.loss_of(model, x, y).backward()
        opt.step()
    return list(model.parameters()), model, opt


def test_ddp_equals_full_batch(tmp_path):
    got = _run("ddp", tmp_path)["params"]
    for p, q in zip(got, _single_process(worker.STEPS)[0]):
        torch.testing.assert_close(p, q.detach(), rtol=0, atol=1e-12)


def test_zero_redundancy_optimizer(tmp_path):
    """ZeroRedundancyOptimizer builds fastopt.torch.AdamW per rank; its consolidated state
    dict loads into torch.optim.AdamW, whose next step continues the same run."""
    saved = _run("zero", tmp_path)
    state = saved["state_dict"]["state"]
    assert len(state) == 4 and all(entry["step"].item() == worker.STEPS
                                   for entry in state.values())
    for p, q in zip(saved["params"], _single_process(worker.STEPS + 1)[0]):
        torch.testing.assert_close(p, q.detach(), rtol=0, atol=1e-12)


def test_fsdp2(tmp_path):
    """fully_shard: the kernels run on the local shards (one of them empty), the state is
    DTensors, so Distributed Checkpoint's full state dicts are the single process's; the
    clipping norm is all-reduced (clip_grad_norm_ of the whole model); a fresh optimizer
    loaded from the full optimizer state dict continues the run."""
    saved = _run("fsdp", tmp_path)
    _, model, opt = _single_process(worker.STEPS, max_grad_norm=worker.MAX_NORM)
    assert opt.last_grad_norm > worker.MAX_NORM
    assert saved["norm"] == pytest.approx(opt.last_grad_norm, rel=1e-12)
    state = opt.state_dict()["state"]
    for i, (name, p) in enumerate(model.named_parameters()):
        torch.testing.assert_close(saved["model"][name], p.detach(), rtol=0, atol=1e-12)
        assert saved["optim"]["state"][name].keys() == state[i].keys()
        for key, value in state[i].items():
            torch.testing.assert_close(saved["optim"]["state"][name][key], value,
                                       rtol=0, atol=1e-12)
    params, model, _ = _single_process(worker.STEPS + 1, max_grad_norm=worker.MAX_NORM)
    for name, p in model.named_parameters():
        torch.testing.assert_close(saved["resumed"][name], p.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["ddp", "zero", "fsdp"])
def test_bfloat16(mode, tmp_path):
    """bfloat16 parameters, rounded stochastically: the random bits depend on the seed, the
    parameter, the step and the element, not on the process, so DDP's and ZeRO's replicas
    stay bit-identical; every mode stays within bfloat16 rounding of one process on the full
    batch (whose gradients were summed in another order)."""
    ranks = _run(mode, tmp_path, "bfloat16")
    for p, q in zip(*ranks):
        assert torch.equal(p, q)
    options = dict(max_grad_norm=worker.MAX_NORM) if mode == "fsdp" else {}
    want, _, _ = _single_process(worker.STEPS, torch.bfloat16, **options)
    for p, q in zip(ranks[0], want):
        torch.testing.assert_close(p.float(), q.detach().float(), rtol=0, atol=2e-2)
