"""The CUDA paths: selection, embedding and finetuning on a GPU agree with the CPU; bf16 autocast, torch.compile
and an NCCL process group run. Skipped without a CUDA device (``tests/conftest.py``).

Tolerances: the CUDA matmuls use other summation orders (and bf16 under autocast), so CUDA and CPU agree to
rounding for deterministic paths (embeddings: cosine >= 0.9999 per image) and to the quality of the
optimisation for ODS (objective within 1 % of the CPU run's; most picks shared).
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

import vecaf
from test_train import TinyNet, digits
from vecaf.selection import ods_objective
from vecaf.train import finetune

pytestmark = pytest.mark.gpu


def clustered_pool(n: int = 3000, d: int = 64, clusters: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    e = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, d))
    return e.astype(np.float32), rng.gamma(2.0, 1.0, n).astype(np.float32)


def test_coreset_picks_the_same_samples_on_cuda():
    e, losses = clustered_pool()
    cpu = vecaf.select(e, 40, method="coreset", losses=losses, seed=3, device="cpu")
    gpu = vecaf.select(e, 40, method="coreset", losses=losses, seed=3, device="cuda")
    assert np.array_equal(np.sort(cpu), np.sort(gpu))


@pytest.mark.parametrize("method", ["vecaf", "activeft"])
def test_parametric_selection_on_cuda_matches_the_cpu_objective(method):
    e, losses = clustered_pool()
    cpu = vecaf.select(e, 40, method=method, losses=losses, seed=3, device="cpu")
    gpu = vecaf.select(e, 40, method=method, losses=losses, seed=3, device="cuda")
    assert len(np.unique(gpu)) == 40
    f_cpu = ods_objective(e, e[cpu], losses=losses)
    f_gpu = ods_objective(e, e[gpu], losses=losses)
    assert abs(f_gpu - f_cpu) <= 0.01 * abs(f_cpu)
    assert len(np.intersect1d(cpu, gpu)) >= 30


def test_selection_keeps_exclusions_and_determinism_on_cuda():
    e, losses = clustered_pool()
    exclude = np.arange(0, 3000, 7)
    first = vecaf.select(e, 40, method="vecaf", losses=losses, seed=5, exclude=exclude, device="cuda")
    again = vecaf.select(e, 40, method="vecaf", losses=losses, seed=5, exclude=exclude, device="cuda")
    assert not np.isin(first, exclude).any()
    assert np.array_equal(first, again)


def test_embeddings_on_cuda_match_the_cpu():
    from vecaf.models import embed, load_pvm

    pvm = load_pvm()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8) for _ in range(24)]
    cpu = embed(pvm, images, image_size=96, batch_size=8, device="cpu", progress=False)
    gpu = embed(pvm, images, image_size=96, batch_size=8, device="cuda", progress=False)
    cos = (cpu * gpu).sum(1) / (np.linalg.norm(cpu, axis=1) * np.linalg.norm(gpu, axis=1))
    assert cos.min() >= 0.9999


RUN = dict(mode="full", method="vecaf", ratio=0.1, loops=3, batch_budget=12, batch_size=16, lr=0.05, seed=2,
           eval_every=4, eval_batch_size=64)


def test_full_mode_finetuning_with_bf16_autocast_tracks_float32():
    data = digits(n_train=300, n_test=120)
    torch.manual_seed(0)
    fp32 = finetune(TinyNet(width=16), data["train_images"], data["test_images"], device="cuda", amp=False, **RUN)
    torch.manual_seed(0)
    bf16 = finetune(TinyNet(width=16), data["train_images"], data["test_images"], device="cuda", amp=True, **RUN)
    assert bf16.config["amp"] is True and fp32.config["amp"] is False
    assert all(np.isfinite(p.loss) for p in bf16.curve)
    assert abs(bf16.top1 - fp32.top1) <= 0.1
    for a, b in zip(fp32.curve, bf16.curve, strict=True):
        assert b.loss == pytest.approx(a.loss, rel=0.05)
    assert next(bf16.model.parameters()).dtype == torch.float32


def test_compiled_training_matches_eager_on_cuda():
    data = digits(n_train=300, n_test=120)
    torch.manual_seed(0)
    eager = finetune(TinyNet(width=16), data["train_images"], data["test_images"], device="cuda", amp=False, **RUN)
    torch.manual_seed(0)
    compiled = finetune(TinyNet(width=16), data["train_images"], data["test_images"], device="cuda", amp=False,
                        compile=True, **RUN)
    assert [r.picks.tolist() for r in compiled.loops][0] == [r.picks.tolist() for r in eager.loops][0]
    assert compiled.final.loss == pytest.approx(eager.final.loss, rel=1e-2)


# One GPU cannot hold two NCCL ranks (NCCL refuses two ranks on one device), so the NCCL run is one torchrun
# process whose context is forced to count as distributed: the engine then takes every multi-process code path
# (DistributedDataParallel, row blocks, all-gather of the pool pass, all-reduce of the loss, broadcast of the
# picks) over a real NCCL communicator, and must give the plain run's picks and metrics.
NCCL_SCRIPT = """
import json, sys
import numpy as np, torch
import torch.distributed as dist
sys.path.insert(0, {here!r})
from test_train import TinyNet
from vecaf.train import ddp, finetune, init_distributed, destroy_distributed
torch.cuda.set_device(0)
dist.init_process_group("nccl")
ddp.DistContext.distributed = property(lambda self: self.backend != "none")
ctx = init_distributed()
rows = ddp.all_gather_rows(torch.arange(6.0).view(3, 2), ctx)
mean = float(ddp.all_reduce_mean(torch.tensor(3.0, device="cuda"), ctx))
picked = ddp.broadcast_object([1, 2, 3], ctx)
d = np.load({data!r})
torch.manual_seed(3)
result = finetune(TinyNet(width=16), (torch.from_numpy(d["xtr"]), d["ytr"]), (torch.from_numpy(d["xte"]), d["yte"]),
                  device="cuda", amp=False, **{run!r})
json.dump({{"world": ctx.world_size, "backend": ctx.backend, "rows": rows.tolist(), "mean": mean, "picked": picked,
           "result": result.to_dict()}}, open({out!r}, "w"))
destroy_distributed()
"""


def test_engine_runs_its_data_parallel_paths_over_nccl(tmp_path):
    here = str(Path(__file__).parent)
    data = digits(n_train=300, n_test=120)
    np.savez(tmp_path / "data.npz", xtr=data["train_images"][0].numpy(), ytr=data["train_images"][1],
             xte=data["test_images"][0].numpy(), yte=data["test_images"][1])
    out = str(tmp_path / "nccl.json")
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(NCCL_SCRIPT.format(here=here, data=str(tmp_path / "data.npz"), run=RUN, out=out)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    run = json.loads(Path(out).read_text())
    assert run["backend"] == "nccl" and run["world"] == 1
    assert run["rows"] == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]] and run["mean"] == 3.0 and run["picked"] == [1, 2, 3]
    torch.manual_seed(3)
    plain = finetune(TinyNet(width=16), data["train_images"], data["test_images"], device="cuda", amp=False, **RUN)
    assert [lp["picks"] for lp in run["result"]["loops"]] == [r.picks.tolist() for r in plain.loops]
    assert run["result"]["final"]["top1"] == pytest.approx(plain.top1, abs=0.02)
    assert run["result"]["final"]["loss"] == pytest.approx(plain.final.loss, rel=1e-3)
