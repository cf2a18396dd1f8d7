"""Shared helpers of the speed benchmarks: machine description, timing with repeats, JSON output.

A speed figure from a shared machine is only meaningful next to the plain approach measured in the same
run and next to the machine's state, so every benchmark records :func:`machine_info` (CPU model, cores,
torch version and threads, CUDA device, load average at start and end) and reports ratios
over interleaved repeats (:func:`interleaved`): repeat r runs the approaches in the given order when r is
even and in reverse order when r is odd, so a slow spell of the machine hits both.

A rate is r = n / t (items per second); the median of k values is the middle one (k odd) or the mean of
the two middle ones (k even).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"


def setup_path() -> None:
    """Put the repository root first on ``sys.path`` and keep model hubs offline (scripts run from anywhere)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def positive_int(text: str) -> int:
    """argparse type: a positive integer, else an error naming the value."""
    import argparse

    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from exc
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a positive finite float, else an error naming the value."""
    import argparse

    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from exc
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def device_name(text: str) -> str:
    """argparse type: 'auto', 'cpu', 'cuda' or 'cuda:N', else an error naming the value."""
    import argparse
    import re

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {text!r}")
    return text


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or None where the OS does not report them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def cpu_generation() -> dict[str, Any]:
    """``/proc/cpuinfo``'s cpu family and model numbers (``family``, ``model_number``) and whether AVX-512 is there: CPUs of one model name
    (e.g. "AMD EPYC") but another generation run other float kernels, so a float32 run (an SGD head at a
    large learning rate, an ODS selection) can end elsewhere for the same seed. Empty where unreadable."""
    info: dict[str, Any] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                name = {"cpu family": "family", "model": "model_number"}.get(key)
                if name and name not in info:
                    info[name] = value.strip()
                elif key == "flags":
                    info["avx512"] = "avx512f" in value.split()
                    break
    except OSError:
        pass
    return info


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(*, at: str = "start") -> dict[str, Any]:
    """What the figures were measured on: call it before the measurements (``at="start"``) or, where the run
    describes itself once it is over, after them (``at="end"``); ``at`` names the load-average key.

    Returns:
        ``cpu`` (model name), ``cpu_generation`` (:func:`cpu_generation`), ``cpu_count`` (logical CPUs),
        ``cpus_usable`` (this process's affinity), ``torch``, ``torch_threads``, ``cuda`` (device name or None),
        ``selection_precision`` (what ODS's ``precision="auto"`` resolves to here: bfloat16 refreshes where they
        are native, so the same seed's picks differ from a float32 machine's), ``python``, ``platform``,
        ``load_average_at_<at>``.
    """
    import torch

    from vecaf.selection import ods

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    cuda = torch.cuda.is_available()
    return {
        "cpu": cpu_model(),
        "cpu_generation": cpu_generation(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if cuda else None,
        "selection_precision": ods.resolve_precision("auto", "cuda" if cuda else "cpu"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        f"load_average_at_{at}": load_average(),
    }


def median(values: Sequence[float]) -> float:
    """The median of a non-empty sequence (mean of the two middle values when its length is even).

    Raises:
        ValueError: the sequence is empty.
    """
    ordered = sorted(float(v) for v in values)
    if not ordered:
        raise ValueError("median of an empty sequence")
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2.0


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously), so a wall-clock timer is honest."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of one call of ``fn``."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def interleaved(
    approaches: dict[str, Callable[[], Any]], *, repeats: int
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Time each approach ``repeats`` times, alternating their order from one repeat to the next.

    Args:
        approaches: name -> a call doing the whole measured work once.
        repeats: number of rounds, >= 1; round r runs the names in order (r even) or reversed (r odd).

    Returns:
        (name -> list of seconds per round, name -> result of the first round).

    Raises:
        ValueError: no approaches or ``repeats`` < 1.
    """
    if not approaches:
        raise ValueError("no approaches to time")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    names = list(approaches)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    first: dict[str, Any] = {}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            took, result = timed(approaches[name])
            seconds[name].append(took)
            if r == 0:
                first[name] = result
    return seconds, first


def rate_summary(n: int, seconds: Sequence[float]) -> dict[str, Any]:
    """Rates r = n / t of each run and their median; ``per_s`` is the median rate."""
    rates = [n / t for t in seconds]
    return {"per_s": median(rates), "per_s_runs": rates, "seconds_runs": [float(t) for t in seconds]}


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``report`` as indented JSON to ``path`` (parent folders created); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    return out


def save_npz(path: str | os.PathLike, **arrays: Any) -> Path:
    """Write ``arrays`` to the ``.npz`` file ``path`` atomically: a temporary file named for this process, then a rename.

    Benchmark caches are shared by the processes run side by side (one per seed); with a plain ``np.savez``
    two of them writing the same cache at once could leave a mixed file for the next reader.
    """
    import numpy as np

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def run_and_report(
    parse_args: Callable[[list[str] | None], Any],
    run: Callable[[Any], dict[str, Any]],
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """A benchmark's entry point: parse options, run, print the JSON report and write it to ``--out``."""
    args = parse_args(argv)
    report = run(args)
    path = write_json(report, args.out)
    print(json.dumps(report, indent=1))
    print(f"wrote {path}", file=sys.stderr)
    return report
