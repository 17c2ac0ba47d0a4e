"""The lr sweep of the linear probe: each head's update is exactly torch.optim.SGD with its own lr and weight
decay, the choice never looks at the test set, and the CLI path writes the sweep and the chosen head."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from simsiam_kit.cli import app
from simsiam_kit.evaluation.linear_sweep import SWEEP_LRS, HeadBank, SweepSGD, run_sweep, split_holdout

runner = CliRunner()


def _separable(n: int, seed: int, d: int = 16, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, d, generator=g) * 0.3
    x[torch.arange(n), y] += 3.0
    return x, y


def test_each_head_updates_like_torch_sgd():
    torch.manual_seed(0)
    x, y = _separable(64, 0)
    lrs, wds = torch.tensor([0.5, 0.05, 2.0]), torch.tensor([0.0, 1e-2, 1e-4])
    bank = HeadBank(3, 16, 4)
    refs = [bank.head(h) for h in range(3)]  # the same initial weights
    opts = [
        torch.optim.SGD(refs[h].parameters(), lr=float(lrs[h]), momentum=0.9, weight_decay=float(wds[h]))
        for h in range(3)
    ]
    opt = SweepSGD(bank, lrs, wds, momentum=0.9)
    for step in range(5):
        xb, yb = x[step * 12 : (step + 1) * 12], y[step * 12 : (step + 1) * 12]
        factor = 0.5 * (1 + torch.cos(torch.tensor(step / 5 * 3.14159))).item()  # a changing schedule
        opt.param_groups[0]["lr"] = factor
        logits = bank(xb)
        loss = sum(F.cross_entropy(logits[h], yb) for h in range(3))
        opt.zero_grad()
        loss.backward()
        opt.step()
        for h in range(3):
            for g in opts[h].param_groups:
                g["lr"] = float(lrs[h]) * factor
            opts[h].zero_grad()
            F.cross_entropy(refs[h](xb), yb).backward()
            opts[h].step()
    for h in range(3):
        assert torch.allclose(bank.weight[h], refs[h].weight, atol=1e-6)
        assert torch.allclose(bank.bias[h], refs[h].bias, atol=1e-6)


def test_holdout_split_is_disjoint_and_seeded():
    a, b = split_holdout(50, 0.1, seed=3)
    assert len(b) == 5 and len(a) == 45 and not set(a.tolist()) & set(b.tolist())
    assert torch.equal(split_holdout(50, 0.1, seed=3)[1], b)
    assert split_holdout(2, 0.9, 0)[0].numel() == 1  # at least one image on each side


def test_sweep_selects_on_training_data_only():
    x, y = _separable(400, 1)
    res = run_sweep(x, y, 4, epochs=3, batch_size=64, device=torch.device("cpu"), seed=0)
    assert len(res.grid) == 2 * len(SWEEP_LRS)
    chosen = res.grid[res.selected]
    assert chosen["holdout_top1"] == max(r["holdout_top1"] for r in res.grid)
    # tiny rates barely move from the N(0, 0.01) init within 3 epochs; the chosen one separates the classes
    assert chosen["holdout_top1"] == 100.0 and chosen["lr"] > SWEEP_LRS[0]
    # nothing about the test set is an input of the choice: the same training data give the same choice
    res2 = run_sweep(x, y, 4, epochs=3, batch_size=64, device=torch.device("cpu"), seed=0)
    assert res2.selected == res.selected and res2.grid == res.grid


def test_cli_lr_sweep(tmp_path, tiny_npz):
    out = tmp_path / "lin"
    base = [
        "eval",
        "linear",
        "--weights",
        "random",
        "--arch",
        "resnet18",
        "--stem",
        "cifar",
        "--train-data",
        str(tiny_npz),
        "--test-data",
        str(tiny_npz),
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--no-progress",
        "-o",
        str(out),
    ]
    res = runner.invoke(app, base + ["--lr-sweep"])
    assert res.exit_code == 2 and "--cached-features" in res.output
    res = runner.invoke(app, base + ["--lr-sweep", "--cached-features"])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "results.json").read_text())
    assert len(r["sweep"]) == 20 and r["selected"]["lr"] in SWEEP_LRS
    assert r["top1"] == r["selected"]["test_top1"] and (out / "plots" / "lr_sweep.png").is_file()
    head = torch.load(out / "head.pt", weights_only=True)
    assert head["lr"] == r["selected"]["lr"] and head["state_dict"]["weight"].shape == (3, 512)
    assert "selected on held-out training images" in res.output
