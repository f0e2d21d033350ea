"""The local profile as a benchmark's subject: `pusa-serve serve_config.local.yaml` in a scratch folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
URL = "http://127.0.0.1:8000"


def start_service(folder: Path) -> subprocess.Popen:
    """`pusa-serve` on the local profile, with its data under `folder`; returns once it is ready."""
    log = folder / "pusa-serve.log"
    with open(log, "w") as out:
        service = subprocess.Popen([str(Path(sys.executable).with_name("pusa-serve")),
                                    str(ROOT / "serve_config.local.yaml")],
                                   cwd=folder, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    while "ready at" not in log.read_text():
        if service.poll() is not None:
            raise RuntimeError(f"pusa-serve exited before it was ready:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return service


def stop_service(service: subprocess.Popen) -> None:
    """Ctrl-C for `pusa-serve` (it shuts Serve down); its whole process group if that takes too long."""
    service.send_signal(signal.SIGINT)
    try:
        service.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(service.pid, signal.SIGKILL)
        service.wait()


def router_process() -> psutil.Process:
    for proc in psutil.process_iter(["cmdline"]):
        if any("ServeReplica:pusa:Router" in part for part in proc.info["cmdline"] or []):
            return proc
    raise RuntimeError("no Router replica process")
