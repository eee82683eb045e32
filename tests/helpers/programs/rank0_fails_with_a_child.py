"""Rank 0 raises while a child rank still runs: the launcher kills the child, and rank 0 must live on.

    python rank0_fails_with_a_child.py

Lightning's process observer (polling every 5 s) SIGKILLs the main process when a child it watches
exits non-zero; a child our launcher killed must not count. Prints ``survived`` and exits 0 on success.
"""

from __future__ import annotations

import subprocess
import sys
import time

from lightning.fabric.plugins.environments import LightningEnvironment

from lightning_gpupar.ddp.launcher import HydraAwareScriptLauncher


class OneSleepingChild(HydraAwareScriptLauncher):
    def _call_children_scripts(self) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])]


def fail() -> None:
    raise ValueError("rank 0 failed")


if __name__ == "__main__":
    try:
        OneSleepingChild(LightningEnvironment(), 2, 1).launch(fail)
    except ValueError as error:
        print(f"caught: {error}", flush=True)
    time.sleep(7)  # longer than the observer's 5 s poll
    print("survived", flush=True)
