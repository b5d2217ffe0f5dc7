"""Check what `make setup-art` needs before it starts, and say everything missing in one message.

    python -m hntitles.art.preflight            # make setup-art runs it first (stdlib only: no venv needed)

`make setup-art` installs openpipe-art[backend]==0.5.18 into .venv-art, then builds ART's vLLM
runtime (art.vllm_runtime.ensure_vllm_runtime): `uv sync` of a locked project that needs
Python 3.12 (uv downloads one from GitHub when none is installed), a vLLM wheel built for
manylinux_2_34 (glibc >= 2.34) from wheels.vllm.ai, torch from download.pytorch.org and the
rest from PyPI. With ART_VLLM_RUNTIME_BIN pointing at an existing runtime server, nothing is
built and only the package install needs the network.

Exit 0 when everything is there, 1 with one message listing each missing piece.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

MIN_GLIBC = (2, 34)  # the runtime's vLLM wheel is manylinux_2_34_x86_64
INSTALL_HOSTS = ("https://pypi.org/simple/", "https://files.pythonhosted.org/")
RUNTIME_HOSTS = ("https://wheels.vllm.ai/", "https://download.pytorch.org/whl/")
PYTHON_DOWNLOAD_HOST = "https://github.com/"  # uv's managed Python builds (python-build-standalone)


@dataclass
class Machine:
    """What the checks read (injectable: tests describe other machines)."""

    glibc: str = field(default_factory=lambda: os.confstr("CS_GNU_LIBC_VERSION") or "")  # e.g. "glibc 2.36"
    nvidia_smi: bool = field(default_factory=lambda: shutil.which("nvidia-smi") is not None)
    python312: bool = field(default_factory=lambda: has_python312())
    runtime_bin: str = field(default_factory=lambda: os.environ.get("ART_VLLM_RUNTIME_BIN", ""))
    reachable: Callable[[str], bool] = field(default=lambda url: reachable(url))


def has_python312() -> bool:
    """A Python 3.12 uv can use without downloading one (on PATH, or one uv already manages)."""
    if shutil.which("python3.12"):
        return True
    uv = shutil.which("uv")
    if not uv:
        return False
    found = subprocess.run([uv, "python", "find", "3.12"], capture_output=True, text=True, timeout=30)
    return found.returncode == 0


def reachable(url: str, timeout: float = 8.0) -> bool:
    """An HTTPS answer of any status within `timeout` (proxies from the environment apply)."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        return True
    except urllib.error.HTTPError:
        return True  # the host answered
    except (OSError, ValueError):
        return False


def glibc_version(text: str) -> tuple[int, ...]:
    """(2, 36) from "glibc 2.36"; () when unknown (musl, or not Linux).

    >>> glibc_version("glibc 2.36"), glibc_version("")
    ((2, 36), ())
    """
    try:
        return tuple(int(x) for x in text.split()[-1].split(".")[:2])
    except (IndexError, ValueError):
        return ()


def problems(machine: Machine) -> list[str]:
    """Everything that would make `make setup-art` fail, each as one short clause."""
    found = []
    if not machine.nvidia_smi:
        found.append("an NVIDIA GPU and driver (nvidia-smi not found)")
    unreachable = [u for u in INSTALL_HOSTS if not machine.reachable(u)]
    if machine.runtime_bin:
        if not os.access(machine.runtime_bin, os.X_OK):
            found.append(f"ART_VLLM_RUNTIME_BIN={machine.runtime_bin} is not an executable file")
    else:
        unreachable += [u for u in RUNTIME_HOSTS if not machine.reachable(u)]
        version = glibc_version(machine.glibc)
        if version and version < MIN_GLIBC:
            found.append(f"glibc >= 2.34 for ART's vLLM runtime wheel (this system has {machine.glibc}: use a newer "
                         "OS image or container, or point ART_VLLM_RUNTIME_BIN at a runtime built elsewhere)")
        elif not version:
            found.append("glibc >= 2.34 (this system's C library is not glibc, or its version is unknown)")
        if not machine.python312 and not machine.reachable(PYTHON_DOWNLOAD_HOST):
            found.append("Python 3.12 for ART's vLLM runtime (none installed, and uv cannot download one: "
                         f"{PYTHON_DOWNLOAD_HOST} is unreachable; install python3.12)")
    if unreachable:
        found.append("internet access to " + ", ".join(unreachable) + " (pip and uv download from there; set "
                     "HTTPS_PROXY if this node reaches the internet through a proxy)")
    return found


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    missing = problems(Machine())
    if missing:
        print("make setup-art cannot work on this machine; it needs: " + "; ".join(missing) + ".", file=sys.stderr)
        return 1
    print("art_preflight: GPU driver, glibc, Python 3.12 and the download hosts are all there")
    return 0


if __name__ == "__main__":
    sys.exit(main())
