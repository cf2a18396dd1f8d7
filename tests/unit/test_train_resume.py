"""Loop-end checkpoints and ``resume=``: a run killed after loop 1 and resumed ends with exactly the weights of
an uninterrupted run (CPU, deterministic settings), in both modes, with dropout and batch norm in play."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from test_train import TinyNet, digits
from vecaf.train import finetune, latest_checkpoint, load_checkpoint
from vecaf.train.checkpoint import capture_rng_state, restore_rng_state


class _Killed(Exception):
    pass


def _kill_after_first_loop(record):
    if record.loop == 0:
        raise _Killed


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def data():
    return digits(n_train=240, n_test=80)


HEAD_RUN = dict(mode="head", method="vecaf", ratio=0.05, loops=3, batch_budget=12, batch_size=8, lr=0.2, seed=5)
FULL_RUN = dict(mode="full", method="topk_loss", ratio=0.05, loops=3, batch_budget=9, batch_size=8, lr=0.05, seed=2,
                freeze_bn=False)


def _assert_same_run(a, b):
    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    for pa, pb in zip(a.picks, b.picks, strict=True):
        np.testing.assert_array_equal(pa, pb)
    assert [(p.batches, p.top1, p.loss) for p in a.curve] == [(p.batches, p.top1, p.loss) for p in b.curve]
    assert a.train_curve == b.train_curve


def _killed_then_resumed(model_factory, train, test, directory, **run):
    with pytest.raises(_Killed):
        finetune(model_factory(), train, test, checkpoint_dir=directory, callbacks={"on_loop_end": _kill_after_first_loop}, **run)
    assert latest_checkpoint(directory) == directory / "loop-1.pt"
    return finetune(model_factory(), train, test, checkpoint_dir=directory, resume=True, **run)


def test_head_mode_resume_is_bit_exact(data, tmp_path):
    full = finetune(None, data["train_feats"], data["test_feats"], checkpoint_dir=tmp_path / "a", **HEAD_RUN)
    resumed = _killed_then_resumed(lambda: None, data["train_feats"], data["test_feats"], tmp_path / "b", **HEAD_RUN)
    _assert_same_run(full, resumed)
    assert any("resumed from" in n for n in resumed.notes)
    assert [r.loop for r in resumed.loops] == [0, 1, 2]


def test_full_mode_resume_is_bit_exact_with_dropout_and_batch_norm(data, tmp_path):
    def factory():
        torch.manual_seed(11)
        return TinyNet(num_classes=10, drop_rate=0.3, bn=True)

    full = finetune(factory(), data["train_images"], data["test_images"], checkpoint_dir=tmp_path / "a", **FULL_RUN)
    resumed = _killed_then_resumed(factory, data["train_images"], data["test_images"], tmp_path / "b", **FULL_RUN)
    _assert_same_run(full, resumed)
    # dropout draws from torch's RNG: without restoring it the resumed weights would differ
    state = load_checkpoint(tmp_path / "b" / "loop-1.pt")
    assert state["rng"]["torch"].dtype == torch.uint8


def test_resume_after_a_real_sigkill(data, tmp_path):
    """The child process kills itself (SIGKILL) right after the loop-1 checkpoint; the parent resumes."""
    here = Path(__file__).parent
    np.savez(tmp_path / "data.npz", xtr=data["train_images"][0].numpy(), ytr=data["train_images"][1],
             xte=data["test_images"][0].numpy(), yte=data["test_images"][1])
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        import numpy as np, torch
        sys.path.insert(0, {str(here)!r})
        torch.set_num_threads(1)
        from test_train import TinyNet
        from vecaf.train import finetune
        d = np.load({str(tmp_path / 'data.npz')!r})
        torch.manual_seed(11)
        model = TinyNet(num_classes=10, drop_rate=0.3, bn=True)
        def kill(record):
            os.kill(os.getpid(), signal.SIGKILL)
        finetune(model, (torch.from_numpy(d["xtr"]), d["ytr"]), (torch.from_numpy(d["xte"]), d["yte"]),
                 checkpoint_dir={str(tmp_path / 'ck')!r}, callbacks={{"on_loop_end": kill}}, **{FULL_RUN!r})
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert latest_checkpoint(tmp_path / "ck") == tmp_path / "ck" / "loop-1.pt"

    def factory():
        torch.manual_seed(11)
        return TinyNet(num_classes=10, drop_rate=0.3, bn=True)

    resumed = finetune(factory(), data["train_images"], data["test_images"], checkpoint_dir=tmp_path / "ck",
                       resume=True, **FULL_RUN)
    full = finetune(factory(), data["train_images"], data["test_images"], **FULL_RUN)
    _assert_same_run(full, resumed)


def test_checkpoint_holds_everything_the_next_loop_needs(data, tmp_path):
    result = finetune(None, data["train_feats"], data["test_feats"], checkpoint_dir=tmp_path, **HEAD_RUN)
    assert result.checkpoints == [str(tmp_path / f"loop-{i}.pt") for i in (1, 2, 3)]
    state = load_checkpoint(tmp_path / "loop-2.pt")
    assert {"model", "optimizer", "scheduler", "rng", "records", "curve", "fingerprint", "batches"} <= set(state)
    assert state["loop"] == 1 and state["batches"] == 8
    assert state["scheduler"]["last_epoch"] == 8
    assert len(state["records"]) == 2
    np.testing.assert_array_equal(state["records"][1]["picks"].numpy(), result.loops[1].picks)
    assert {"torch", "numpy", "python"} <= set(state["rng"])


def test_resume_refuses_a_checkpoint_from_different_settings(data, tmp_path):
    with pytest.raises(_Killed):
        finetune(None, data["train_feats"], data["test_feats"], checkpoint_dir=tmp_path,
                 callbacks={"on_loop_end": _kill_after_first_loop}, **HEAD_RUN)
    changed = {**HEAD_RUN, "lr": 0.1}
    with pytest.raises(ValueError, match="different settings.*lr"):
        finetune(None, data["train_feats"], data["test_feats"], checkpoint_dir=tmp_path, resume=True, **changed)


def test_resume_with_no_checkpoint_starts_from_scratch(data, tmp_path):
    fresh = finetune(None, data["train_feats"], data["test_feats"], **HEAD_RUN)
    resumed = finetune(None, data["train_feats"], data["test_feats"], checkpoint_dir=tmp_path / "empty",
                       resume=True, **HEAD_RUN)
    _assert_same_run(fresh, resumed)
    assert any("started from scratch" in n for n in resumed.notes)


def test_resume_true_without_a_directory_is_refused(data):
    with pytest.raises(ValueError, match="checkpoint_dir"):
        finetune(None, data["train_feats"], data["test_feats"], resume=True, **HEAD_RUN)


def test_rng_state_round_trip():
    state = capture_rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(state)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert first[2] == second[2]


def test_stop_after_loop_then_resume_loop_by_loop_is_bit_exact(data, tmp_path):
    """One call per loop (what each train-loop task does): stop after loop l, resume from its checkpoint."""
    full = finetune(None, data["train_feats"], data["test_feats"], checkpoint_dir=tmp_path / "a", **HEAD_RUN)
    resume: bool | Path = False
    for loop in range(HEAD_RUN["loops"]):
        last = loop == HEAD_RUN["loops"] - 1
        part = finetune(None, data["train_feats"], data["test_feats"], checkpoint_dir=tmp_path / "b", resume=resume,
                        stop_after_loop=None if last else loop, **HEAD_RUN)  # fmt: skip
        assert [r.loop for r in part.loops] == list(range(loop + 1))
        assert latest_checkpoint(tmp_path / "b") == tmp_path / "b" / f"loop-{loop + 1}.pt"
        resume = tmp_path / "b" / f"loop-{loop + 1}.pt"
    _assert_same_run(full, part)


@pytest.mark.parametrize("value", [-1, 3, 1.0, True])
def test_stop_after_loop_must_be_a_loop_index(data, value):
    with pytest.raises(ValueError, match=r"stop_after_loop must be a loop index in 0..2 or None"):
        finetune(None, data["train_feats"], data["test_feats"], stop_after_loop=value, **HEAD_RUN)
