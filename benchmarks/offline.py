"""What ``make gpu-check`` needs installed, checked before anything runs, and how to bring what is missing
to a GPU machine that has no package index: a small wheelhouse made on a connected machine.

Nothing here installs anything; it prints the commands.
"""

from __future__ import annotations

import importlib
import platform
import sys
from dataclasses import dataclass

#: module -> distribution. Without these, nothing can run.
REQUIRED = {"torch": "torch", "lightning": "lightning", "pytest": "pytest", "torchmetrics": "torchmetrics"}
#: module -> distribution. Without these, the tests that need them skip (Hydra: the example app's tests).
OPTIONAL = {
    "hydra": "hydra-core",
    "omegaconf": "omegaconf",
    "antlr4": "antlr4-python3-runtime",
    "yaml": "PyYAML",
    "pynvml": "nvidia-ml-py",
    "transformers": "transformers",
    "peft": "peft",
}
#: The versions ``make test`` resolves (constraints.txt pins hydra-core; the other two are its dependencies).
PINS = {"hydra-core": "1.3.8", "omegaconf": "2.3.1", "antlr4-python3-runtime": "4.9.3", "PyYAML": "6.0.4"}
#: Pure Python: one wheel fits every platform. antlr4-python3-runtime 4.9.3 is published only as a source
#: archive, so it is built into a wheel (``pip wheel``) on the connected machine.
PURE = {"hydra-core", "omegaconf"}
BUILT = {"antlr4-python3-runtime"}
WHEELHOUSE = "gpu-check-wheels"


@dataclass(frozen=True)
class Missing:
    module: str
    distribution: str
    required: bool
    error: str


def missing_packages() -> list[Missing]:
    """The required and optional packages that do not import here (without importing torch twice)."""
    found = []
    for table, required in ((REQUIRED, True), (OPTIONAL, False)):
        for module, distribution in table.items():
            try:
                importlib.import_module(module)
            except Exception as err:  # an ImportError, or a broken install that raises something else
                found.append(Missing(module, distribution, required, f"{type(err).__name__}: {err}"))
    return found


def _spec(distribution: str) -> str:
    return f"{distribution}=={PINS[distribution]}" if distribution in PINS else distribution


def wheelhouse_instructions(missing: list[Missing], python: str = sys.executable) -> str:
    """The commands that make a wheelhouse of ``missing`` on a connected machine, and the install line for
    this (offline) machine."""
    names = list(dict.fromkeys(m.distribution for m in missing))
    pure = [_spec(n) for n in names if n in PURE]
    built = [_spec(n) for n in names if n in BUILT]
    binary = [_spec(n) for n in names if n not in PURE and n not in BUILT]
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    lines = [
        "On a machine with the package index, run:",
        f"    mkdir -p {WHEELHOUSE}",
    ]
    if pure:
        lines.append(
            f"    python3 -m pip download --no-deps --only-binary=:all: -d {WHEELHOUSE} {' '.join(pure)}"
        )
    if built:
        lines.append(f"    python3 -m pip wheel --no-deps -w {WHEELHOUSE} {' '.join(built)}")
    if binary:
        lines.append(
            f"    python3 -m pip download --no-deps --only-binary=:all: --python-version {version} "
            f"--platform manylinux2014_{platform.machine()} -d {WHEELHOUSE} {' '.join(binary)}"
        )
    small = set(names) <= PURE | BUILT | {"PyYAML"}
    size = " (well under 1 MiB)" if small else ""
    lines += [
        f"copy {WHEELHOUSE}/{size} to this machine, and here run:",
        f"    {python} -m pip install --no-index --find-links {WHEELHOUSE} {' '.join(names)}",
    ]
    return "\n".join(lines)


def describe(missing: list[Missing]) -> str:
    """A few lines: what is missing and what that costs."""
    lines = []
    for m in missing:
        effect = "gpu-check cannot run" if m.required else "the tests that need it are skipped"
        lines.append(f"  missing {m.distribution} (import {m.module}: {m.error.splitlines()[0]}): {effect}")
    return "\n".join(lines)
