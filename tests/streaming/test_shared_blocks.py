"""A node's shared memory is named after its process; the blocks of a process that died without unlinking
them (its whole group SIGKILLed, the resource tracker with it) are removed by the next sweep, and nothing
else is: a live process's block, another name, a block of a pid that exists."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from streaming.node.workers.shared_blocks import PREFIX, SHM_DIR, create_block, owner_pid, sweep_dead

# A node killed with its resource tracker: the block is made, its tracker forgets it, then SIGKILL.
DIES_HOLDING = """
import os, signal, sys
from multiprocessing import resource_tracker
from streaming.node.workers.shared_blocks import create_block
block = create_block(1 << 20)
resource_tracker.unregister(block._name, "shared_memory")
print(block.name, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_dead_nodes_block_is_swept_and_a_live_ones_kept() -> None:
    child = subprocess.run(
        [sys.executable, "-c", DIES_HOLDING], capture_output=True, text=True, timeout=60, cwd=Path.cwd()
    )
    assert child.returncode == -9, child.stderr
    dead = SHM_DIR / child.stdout.strip().lstrip("/")
    assert dead.exists() and owner_pid(dead.name) is not None
    mine = create_block(4096)
    try:
        swept = sweep_dead()
        assert not dead.exists()
        assert swept.blocks >= 1 and swept.bytes >= 1 << 20
        assert (SHM_DIR / mine.name.lstrip("/")).exists()  # this process is alive: kept
    finally:
        mine.close()
        mine.unlink()
        if dead.exists():
            dead.unlink()


def test_only_our_names_of_dead_pids_are_removed(tmp_path: Path) -> None:
    # a pid above the kernel's limit never exists; pid 1 always does
    limit = int(Path("/proc/sys/kernel/pid_max").read_text())
    names = {
        f"{PREFIX}{limit + 1}-abc": False,  # ours, its process gone: removed
        f"{PREFIX}1-abc": True,  # ours, its process exists: kept
        f"{PREFIX}{os.getpid()}-abc": True,
        f"{PREFIX}x-abc": True,  # not a name we make
        f"psm_{limit + 1}": True,  # someone else's
    }
    for name in names:
        (tmp_path / name).write_bytes(b"12345")
    swept = sweep_dead(tmp_path)
    assert {n: (tmp_path / n).exists() for n in names} == names
    assert (swept.blocks, swept.bytes) == (1, 5)
    assert sweep_dead(tmp_path / "absent").blocks == 0
