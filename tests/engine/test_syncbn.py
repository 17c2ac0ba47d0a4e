"""GlooSyncBatchNorm: 2 CPU processes with half a batch each match plain BatchNorm on the full batch."""

import os

import torch
import torch.distributed as dist
import torch.nn as nn

from simsiam_kit.utils.syncbn import GlooSyncBatchNorm, convert_sync_batchnorm

from helpers import run_ranks


def _worker(rank, port, x, w_grad_out, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    bn = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), "cpu")
    assert isinstance(bn[0], GlooSyncBatchNorm)
    xi = x.chunk(2)[rank].clone().requires_grad_(True)
    y = bn(xi)
    (y * w_grad_out.chunk(2)[rank]).sum().backward()
    # numpy copies: tensors would travel through shared memory that dies with this process
    q.put(
        (rank,)
        + tuple(
            t.detach().numpy().copy() for t in (y, xi.grad, bn[0].weight.grad, bn[0].running_mean, bn[0].running_var)
        )
    )
    dist.barrier()
    dist.destroy_process_group()


def test_sync_bn_matches_full_batch():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4) * 3 + 1
    g = torch.randn(8, 3, 4, 4)
    ref = nn.BatchNorm2d(3)
    xr = x.clone().requires_grad_(True)
    yr = ref(xr)
    (yr * g).sum().backward()

    res = {rank: [torch.from_numpy(a) for a in rest] for rank, rest in run_ranks(_worker, (x, g), timeout=120).items()}
    y = torch.cat([res[0][0], res[1][0]])
    gx = torch.cat([res[0][1], res[1][1]])
    assert torch.allclose(y, yr.detach(), atol=1e-5)
    assert torch.allclose(gx, xr.grad, atol=1e-5)
    # each rank's weight grad is its local share; DDP sums (averages) them across ranks
    assert torch.allclose(res[0][2] + res[1][2], ref.weight.grad, atol=1e-4)
    assert torch.allclose(res[0][3], ref.running_mean, atol=1e-5)
    assert torch.allclose(res[0][4], ref.running_var, atol=1e-4)
