"""Shared fixtures: the freestanding test guest (tests/guest/build.sh) and console helpers."""

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Callable, List

import pytest

import forkvm

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def guest() -> str:
    """The test guest's ELF: $FORKVM_TEST_GUEST, else built (cached) by its script."""
    path = os.environ.get("FORKVM_TEST_GUEST")
    if not path:
        out = subprocess.run(["bash", str(REPO / "tests/guest/build.sh")], check=True, capture_output=True, text=True)
        path = out.stdout.strip()
    return path


def wait_until(what: str, done: Callable[[], bool], timeout: float = 10.0) -> None:
    """Polls `done` until it holds, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


def lines(buffer: forkvm.ConsoleBuffer) -> List[str]:
    """The console's complete lines (a line still being written is left out)."""
    text = buffer.text()
    return text[: text.rfind("\n") + 1].splitlines()


def generation_lines(buffer: forkvm.ConsoleBuffer) -> List[tuple]:
    """(generation, id) of each complete `generation G id 0x...` line."""
    found = []
    for line in lines(buffer):
        m = re.fullmatch(r"generation (\d+) id 0x([0-9a-f]+)", line)
        if m:
            found.append((int(m.group(1)), int(m.group(2), 16)))
    return found


def counter_address(buffer: forkvm.ConsoleBuffer) -> int:
    """The address the spinning guest printed, once it did."""
    for line in lines(buffer):
        m = re.fullmatch(r"spinning, counter at 0x([0-9a-f]+)", line)
        if m:
            return int(m.group(1), 16)
    return 0


def resources() -> tuple:
    """This process's thread and open fd counts, once what closed VMs let go of is released."""
    assert forkvm.wait_for_releases(60)
    return len(os.listdir("/proc/self/task")), len(os.listdir("/proc/self/fd"))
