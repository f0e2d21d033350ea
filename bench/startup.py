"""What HTTP clients see while `pusa-serve` starts: the status of every request from the first second.

Starts `pusa-serve` on the local profile (tiny preset, CPU; a free port, a temporary store and job
database) and, from the moment the process starts, polls `GET /v1/models` and `GET /` in turn every
`--interval` seconds with a 2 s timeout, until `--after-ready` seconds after the first 200 of each.
Prints one line per change of state, then the timeline: seconds to the port opening, to the first 503,
to the first 200, to `pusa-serve`'s "ready" line, and the count of each outcome (a status code,
`refused` before the port opens, `hang` for a request past the timeout, `error` for a dropped one).

    .venv/bin/python bench/startup.py [--app-args '{"dit_start_delay_s": 5}'] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(folder: Path, port: int, app_args: dict) -> Path:
    config = yaml.safe_load((ROOT / "serve_config.local.yaml").read_text())
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args.update(store=str(folder / "store"), database=f"sqlite:///{folder / 'jobs.db'}", **app_args)
    path = folder / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def outcome(client: httpx.Client, url: str) -> tuple[str, float, dict]:
    start = time.monotonic()
    try:
        r = client.get(url)
    except httpx.ConnectError:
        return "refused", time.monotonic() - start, {}
    except httpx.TimeoutException:
        return "hang", time.monotonic() - start, {}
    except httpx.HTTPError as exc:
        return "error", time.monotonic() - start, {"error": repr(exc)}
    info = {"retry_after": r.headers.get("retry-after")}
    if r.headers.get("content-type", "").startswith("application/json"):
        try:
            body = r.json()
            info["code"] = (body.get("error") or {}).get("code") if isinstance(body, dict) else None
        except ValueError:
            pass
    else:
        info["text"] = r.text[:80].replace("\n", " ")
    return str(r.status_code), time.monotonic() - start, info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--timeout", type=float, default=2.0, help="a request slower than this is a hang")
    parser.add_argument("--after-ready", type=float, default=3.0)
    parser.add_argument("--max-s", type=float, default=180.0)
    parser.add_argument("--app-args", default="{}", help="JSON merged into the application's args")
    parser.add_argument("--json", type=Path, help="write every poll here")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="pusa-startup-"))
    port = free_port()
    config = write_config(folder, port, json.loads(args.app_args))
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    proc = subprocess.Popen([str(ROOT / ".venv/bin/pusa-serve"), str(config)], cwd=folder, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    ready_at: list[float] = []

    def read_output() -> None:
        for line in proc.stdout:
            if "Pusa service ready" in line and not ready_at:
                ready_at.append(time.monotonic() - t0)
    threading.Thread(target=read_output, daemon=True).start()

    polls: list[dict] = []
    first_200: dict[str, float] = {}
    last: dict[str, str] = {}
    with httpx.Client(timeout=args.timeout) as client:
        while time.monotonic() - t0 < args.max_s:
            for path in ("/v1/models", "/"):
                t = time.monotonic() - t0
                status, latency, info = outcome(client, base + path)
                polls.append({"t": round(t, 2), "path": path, "status": status, "latency": round(latency, 3), **info})
                if status == "200":
                    first_200.setdefault(path, t)
                key = f"{status} {info.get('code') or ''} {info.get('text', '')[:40]}"
                if last.get(path) != key:
                    print(f"{t:6.1f}s {path:11} {status} {latency:.2f}s {info}", flush=True)
                    last[path] = key
            if len(first_200) == 2 and time.monotonic() - t0 > max(first_200.values()) + args.after_ready:
                break
            if proc.poll() is not None:
                print(f"pusa-serve exited with {proc.returncode}", flush=True)
                break
            time.sleep(args.interval)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)

    def first(pred) -> str:
        t = next((p["t"] for p in polls if pred(p)), None)
        return "-" if t is None else f"{t:.1f}"

    print(f"port open: {first(lambda p: p['status'] != 'refused')} s; first 503: "
          f"{first(lambda p: p['status'] == '503')} s; first 200: /v1/models "
          f"{first(lambda p: p['status'] == '200' and p['path'] == '/v1/models')} s, / "
          f"{first(lambda p: p['status'] == '200' and p['path'] == '/')} s; "
          f"'ready' line: {ready_at[0] if ready_at else '-'} s")
    for status in ("404", "hang", "503", "502"):
        times = [p["t"] for p in polls if p["status"] == status]
        if times:
            print(f"{status}: from {times[0]:.1f} s to {times[-1]:.1f} s")
    opened = next((i for i, p in enumerate(polls) if p["status"] != "refused"), len(polls))
    for path in ("/v1/models", "/"):
        counts = Counter(p["status"] for p in polls[opened:] if p["path"] == path)
        slowest = max((p["latency"] for p in polls[opened:] if p["path"] == path), default=0)
        print(f"after the port opened, {path}: {dict(sorted(counts.items()))}; slowest {slowest:.2f} s")
    if args.json:
        args.json.write_text(json.dumps(polls, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
