"""Data-parallel finetuning: a 2-process CPU run (torchrun, gloo) gives the metrics of a 1-process run at the same
global batch.

Tolerance: every top-1 on the curve equal, every test and training loss within 1e-4 relative, every final
weight within 1e-5 absolute, and the same picks. The two runs differ only in float summation order (the
global-batch gradient is the mean of two half-batch means instead of one mean), so the gap is rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from test_train import TinyNet, digits
from vecaf.train import ddp, finetune

RUN = dict(mode="full", method="topk_loss", ratio=0.05, loops=2, batch_budget=6, batch_size=8, lr=0.05, seed=1,
           eval_every=2, eval_batch_size=16)

SCRIPT = """
import json, sys
import numpy as np, torch
sys.path.insert(0, {here!r})
torch.set_num_threads(1)
from test_train import TinyNet
from vecaf.train import finetune, init_distributed, destroy_distributed
ctx = init_distributed()
d = np.load({data!r})
torch.manual_seed(3)
model = TinyNet(num_classes=10)
result = finetune(model, (torch.from_numpy(d["xtr"]), d["ytr"]), (torch.from_numpy(d["xte"]), d["yte"]), **{run!r})
if ctx.is_main:
    torch.save({{k: v for k, v in result.model.state_dict().items()}}, {out!r} + ".pt")
    json.dump({{"world": ctx.world_size, "backend": ctx.backend, "result": result.to_dict()}}, open({out!r} + ".json", "w"))
destroy_distributed()
"""


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_context_without_torchrun_is_one_process():
    ctx = ddp.init_distributed()
    assert (ctx.rank, ctx.world_size, ctx.distributed, ctx.is_main) == (0, 1, False, True)
    block = ddp.row_block(10, ddp.DistContext(rank=1, world_size=3))
    assert (block.start, block.stop) == (3, 7)
    blocks = [ddp.row_block(10, ddp.DistContext(rank=r, world_size=3)) for r in range(3)]
    assert [b.stop - b.start for b in blocks] == [3, 4, 3] and blocks[-1].stop == 10


def test_batch_size_must_split_evenly_over_processes(monkeypatch):
    data = digits(n_train=60, n_test=20)
    monkeypatch.setattr(ddp, "current_context", lambda: ddp.DistContext(rank=0, world_size=2, backend="gloo"))
    with pytest.raises(ValueError, match="divisible"):
        finetune(None, data["train_feats"], data["test_feats"], method="random", budget=5, batch_budget=3, batch_size=7)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    here = str(Path(__file__).parent)
    data = digits(n_train=160, n_test=48)
    np.savez(tmp_path / "data.npz", xtr=data["train_images"][0].numpy(), ytr=data["train_images"][1],
             xte=data["test_images"][0].numpy(), yte=data["test_images"][1])
    script = tmp_path / "run.py"
    out = str(tmp_path / "two")
    script.write_text(textwrap.dedent(SCRIPT.format(here=here, data=str(tmp_path / "data.npz"), run=RUN, out=out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    two = json.loads(Path(out + ".json").read_text())
    assert two["world"] == 2 and two["backend"] == "gloo"

    torch.manual_seed(3)
    single = finetune(TinyNet(num_classes=10), data["train_images"], data["test_images"], **RUN)
    one = single.to_dict()
    for a, b in zip(one["loops"], two["result"]["loops"], strict=True):
        assert a["picks"] == b["picks"]
    assert [p["batches"] for p in one["curve"]] == [p["batches"] for p in two["result"]["curve"]]
    for a, b in zip(one["curve"], two["result"]["curve"], strict=True):
        assert a["top1"] == b["top1"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    for (_, a), (_, b) in zip(one["train_curve"], two["result"]["train_curve"], strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    weights_one = single.model.state_dict()
    weights_two = torch.load(out + ".pt", weights_only=True)
    for key, value in weights_one.items():
        torch.testing.assert_close(weights_two[key], value, rtol=0, atol=1e-5)
