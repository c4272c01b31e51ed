"""Debian packages a test needs (promtool, prometheus, chromium), installed when missing.

Bounded: one deadline for `apt-get install` (tried first: the package lists may be
fresh), `apt-get update` and the install again; the dpkg lock is waited for, as another
test may be installing at the same moment. Root, or `sudo -n`. A test that cannot have
its binary is skipped, saying why."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest


def _find(binary: str) -> str | None:
    if os.path.isabs(binary):
        return binary if os.path.exists(binary) else None
    return shutil.which(binary)


def debian_binary(binary: str, packages: list[str], *, timeout_s: float = 300,
                  recommends: bool = False) -> str:
    """`binary` (a name on PATH, or an absolute path) from `packages`; skips the test
    when it is missing and cannot be installed."""
    found = _find(binary)
    if found:
        return found
    if shutil.which("apt-get") is None:
        pytest.skip(f"no {binary}, and no apt-get to install {' '.join(packages)}")
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None or subprocess.run(
                ["sudo", "-n", "true"], capture_output=True, timeout=10).returncode != 0:
            pytest.skip(f"no {binary}; installing it needs root (or sudo -n)")
        prefix = ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=120"]
    install = [*apt, "install", "-y", *([] if recommends else ["--no-install-recommends"]),
               *packages]
    deadline = time.monotonic() + timeout_s
    why = ""
    for step in (install, [*apt, "update"], install):
        left = deadline - time.monotonic()
        if left <= 0:
            why = "timed out"
            break
        try:
            done = subprocess.run([*prefix, *step], env=env, capture_output=True, timeout=left)
        except subprocess.TimeoutExpired:
            why = f"`{' '.join(step)}` timed out"
            break
        why = done.stderr.decode(errors="replace")[-500:]
        if step is install and done.returncode == 0:
            break
    found = _find(binary)
    if not found:
        pytest.skip(f"the Debian package(s) {' '.join(packages)} could not be installed: {why}")
    return found
