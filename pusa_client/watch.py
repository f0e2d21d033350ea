"""Follow a job to its end on its event stream: a progress bar of its steps (step k of N) on stderr, the
phase (queued, encoding, denoising, decoding), the window of a long video and retries beside it. A dropped connection is resumed
after the last event seen (``Last-Event-ID``), so no step is missed or counted twice."""

from __future__ import annotations

import time

from tqdm import tqdm

from .http import Api, Unreachable

TERMINAL = ("completed", "failed", "cancelled")
RECONNECTS = 5  # attempts in a row to reach the stream again before giving up
RECONNECT_DELAY_S = 1.0


def show(bar: tqdm, event: dict) -> None:
    """Move the bar to what `event` says."""
    kind, data = event["event"], event["data"]
    if kind == "step":
        bar.total, bar.n = data["total"], data["step"]
        window = f" window {data['segment'] + 1}" if "segment" in data else ""
        bar.set_description(f"denoising{window}", refresh=False)
        bar.set_postfix_str("", refresh=False)
    elif kind == "segment":
        bar.set_postfix_str(f"window {data['segment'] + 1} of {data['segments']} done: {data['url']}", refresh=False)
    elif kind == "queued":
        bar.set_description(f"queued #{data['position']}" if data.get("position") else "queued", refresh=False)
    elif kind == "retry":
        bar.set_postfix_str(f"retry {data['attempt']} of {data['stage']}: {data['reason']}", refresh=False)
    else:
        bar.set_description(kind, refresh=False)
    bar.refresh()


def watch(api: Api, video_id: str) -> dict:
    """Show the job's progress until it ends; return its final object."""
    job = api.get(video_id)
    last_id, failures = None, 0
    with tqdm(total=job["pusa"]["steps"] * job["pusa"].get("windows", 1), unit="step", desc=job["status"]) as bar:
        while True:
            try:
                for event in api.events(video_id, last_id):
                    failures = 0
                    last_id = event["id"] or last_id
                    show(bar, event)
                job = api.get(video_id)
                if job["status"] in TERMINAL:
                    return job
            except Unreachable:
                failures += 1
                if failures > RECONNECTS:
                    raise
                time.sleep(RECONNECT_DELAY_S)
