"""The monitors under DDP (2 gloo processes on the CPU): rank 0 scores, and when its scoring raises (NaN features,
a full disk, ...) every rank raises with it, at once, instead of the other ranks waiting at a barrier for a rank 0
that stopped (until the process group's timeout)."""

import os
from datetime import timedelta
from types import SimpleNamespace

import torch.distributed as tdist

from helpers import run_ranks

NAN = "the backbone's output is not finite (NaN or inf) for 3 of 48 images of demo:val (first: 7)"


def _worker(rank, port, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # 30 s: before the fix, rank 1 waited this long at the barrier, then failed with gloo's timeout
    tdist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=30))
    from simsiam_kit.engine.hooks import KNNMonitor
    from simsiam_kit.engine.online_probe import OnlineProbeMonitor
    from simsiam_kit.errors import UserError

    def nan_features():
        raise UserError(NAN)

    def out_of_memory():
        raise MemoryError("no room for the bank")

    def fine():
        return 42.5

    said = []
    trainer = SimpleNamespace(start_epoch=0, epoch=1, epochs=1, epoch_metrics={})
    runs = [
        ("knn before_train", lambda: KNNMonitor(nan_features, 1, log=said.append).before_train(trainer)),
        ("knn after_epoch", lambda: KNNMonitor(nan_features, 1).after_epoch(trainer)),
        ("probe after_epoch", lambda: OnlineProbeMonitor(out_of_memory).after_epoch(trainer)),
        ("knn fine", lambda: KNNMonitor(fine, 1, log=said.append).before_train(trainer)),
        ("probe fine", lambda: OnlineProbeMonitor(fine).after_epoch(trainer)),
    ]
    out = {}
    for name, call in runs:
        try:
            call()
            got = None
        except BaseException as e:
            got = (type(e).__name__, str(e))
        out[name] = got
    q.put((rank, out, said, dict(trainer.epoch_metrics)))
    tdist.barrier()
    tdist.destroy_process_group()


def test_a_monitor_error_on_rank_0_stops_every_rank_at_once():
    res = run_ranks(_worker)
    for rank in (0, 1):
        out, said, metrics = res[rank]
        # the NaN error: the same UserError (one line from the command) on both ranks; a rank left waiting would
        # have failed with gloo's timeout error instead, after 30 s
        assert out["knn before_train"] == ("UserError", NAN), (rank, out)
        assert out["knn after_epoch"] == ("UserError", NAN), (rank, out)
        # another error: rank 0 raises its own, the other ranks say which one stopped rank 0
        want = (
            ("MemoryError", "no room for the bank")
            if rank == 0
            else (
                "RuntimeError",
                "rank 0 failed: MemoryError: no room for the bank",
            )
        )
        assert out["probe after_epoch"] == want, (rank, out)
        assert out["knn fine"] is None and out["probe fine"] is None
        # rank 0 scores, records and says; the other ranks only wait for it
        if rank == 0:
            assert said == ["epoch 0/1 (initial weights): kNN top-1 42.50 %"]
            assert metrics == {"online_probe_top1": 42.5}
        else:
            assert said == [] and metrics == {}
