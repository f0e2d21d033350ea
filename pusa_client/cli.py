"""`pusa client`: the service's HTTP API from the command line.

    pusa client submit --prompt "A cat walks on the grass" --steps 4 --wait -o cat.mp4
    pusa client submit --image start.png --prompt "The camera pans slowly"     # prints the job id
    pusa client submit --model pusa-wan2.2 --prompt "A cat" --guidance-2 3      # Pusa-Wan2.2 (if served)
    pusa client watch ID; pusa client download ID -o out.mp4

Exit status: 0 done (a job completed), 1 the job failed, 3 the job was cancelled, 2 a bad invocation or a
request the API refused (4xx: one line naming the field), 4 the service could not be reached or failed (5xx).
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import os
import sys
from pathlib import Path

from pusa_model.request_options import add_model_option, add_request_options, request_fields

from .http import Api, ApiError, Unreachable, Upload
from .watch import watch

DEFAULT_URL = "http://127.0.0.1:8000"
EXIT = {"completed": 0, "failed": 1, "cancelled": 3}
BAD_REQUEST, UNREACHABLE = 2, 4


class BadInvocation(Exception):
    """The command cannot be sent as given (e.g. a file to upload is missing)."""


def _connection() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--url", default=os.environ.get("PUSA_URL", DEFAULT_URL),
                        help=f"the service (PUSA_URL, default {DEFAULT_URL})")
    parser.add_argument("--api-key", default=os.environ.get("PUSA_API_KEY"),
                        help="sent as a bearer token (PUSA_API_KEY)")
    return parser


# Fields the extension endpoint takes from the video it continues; the command sends files itself.
EXTENSION_FIXED = ("task", "images", "video", "v2v_mode", "video_anchor")
SENT_AS_FILES = ("images", "video")


def _generation(skip: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """The request's fields (`pusa_model.request_options`) and the API's own; left out, the service's
    defaults apply."""
    parser = argparse.ArgumentParser(add_help=False)
    add_request_options(parser, skip=skip)
    add_model_option(parser, "the model (the API's model; default: pusa-v1, or for extend the model of the "
                             "video it continues)")
    parser.add_argument("--seconds", type=float, help="duration (frames = seconds x fps, rounded to 4k+1)")
    parser.add_argument("--webhook-url", help="receives the job's ending (video.completed, ...)")
    parser.add_argument("--idempotency-key", help="a retried request with the same key returns the same job")
    parser.add_argument("--wait", action="store_true", help="watch the job until it ends")
    parser.add_argument("-o", "--output", type=Path, help="with --wait: download the video here")
    parser.add_argument("--json", action="store_true", help="print the job object (the final one with --wait)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pusa client", description="the Pusa service's HTTP API")
    sub = parser.add_subparsers(dest="command", required=True)
    conn = _connection()

    submit = sub.add_parser("submit", parents=[conn, _generation()], help="queue a video; print its id",
                            epilog="--task defaults to v2v with --video, multi_frame with 2+ images, i2v with one, "
                                   "else t2v; --video is a video file or the id of a completed video")
    submit.set_defaults(run=_submit)

    extend = sub.add_parser("extend", parents=[conn, _generation(skip=EXTENSION_FIXED)],
                            help="continue a completed video")
    extend.add_argument("video_id")
    extend.set_defaults(run=_extend)

    for name, run, text in (("watch", _watch, "show a job's progress until it ends"),
                            ("get", _get, "print a job object"),
                            ("cancel", _cancel, "cancel a queued or running job"),
                            ("delete", _delete, "delete a job and its files")):
        command = sub.add_parser(name, parents=[conn], help=text)
        command.add_argument("video_id")
        command.set_defaults(run=run)
    sub.choices["watch"].add_argument("--json", action="store_true", help="print the final job object")

    download = sub.add_parser("download", parents=[conn], help="save a completed job's video or thumbnail")
    download.add_argument("video_id")
    download.add_argument("--variant", choices=("video", "thumbnail"), default="video")
    download.add_argument("--segment", type=int, help="a finished window of a long video (0 is the first)")
    download.add_argument("-o", "--output", type=Path, help="default: ID.mp4 (ID.webp for the thumbnail)")
    download.set_defaults(run=_download)

    listing = sub.add_parser("list", parents=[conn], help="list your jobs, newest first")
    listing.add_argument("--limit", type=int, default=20, help="jobs per page (1-100)")
    listing.add_argument("--after", help="start after this job id")
    listing.add_argument("--all", action="store_true", help="follow every page")
    listing.add_argument("--json", action="store_true", help="print a JSON array of job objects")
    listing.set_defaults(run=_list_jobs)
    return parser


def _fields(args: argparse.Namespace) -> dict:
    fields = request_fields(args, skip=SENT_AS_FILES)
    if args.size is not None:  # sent as the API's own field, so that a refusal names what was given
        del fields["width"], fields["height"]
        fields["size"] = "{}x{}".format(*args.size)
    for name in ("model", "seconds", "webhook_url"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    return fields


def _upload(field: str, path: str) -> Upload:
    try:
        content = Path(path).read_bytes()
    except OSError as exc:
        raise BadInvocation(f"{field}: cannot read {path}: {exc.strerror}") from None
    return field, (Path(path).name, content, mimetypes.guess_type(path)[0] or "application/octet-stream")


def _submit(api: Api, args: argparse.Namespace) -> int:
    fields = _fields(args)
    images = [*args.image, *args.images]
    uploads = [_upload("images", path) for path in images]
    if args.video and args.video.startswith("video_") and not Path(args.video).exists():
        fields["video"] = args.video  # a completed job's video
    elif args.video:
        uploads.append(_upload("video", args.video))
    if args.task is None and (args.video or images):
        fields["task"] = "v2v" if args.video else "multi_frame" if len(images) > 1 else "i2v"
    return _submitted(api, api.create(fields, uploads, args.idempotency_key), args)


def _extend(api: Api, args: argparse.Namespace) -> int:
    return _submitted(api, api.extend(args.video_id, _fields(args), args.idempotency_key), args)


def _submitted(api: Api, job: dict, args: argparse.Namespace) -> int:
    if not args.wait:
        print(json.dumps(job, indent=2) if args.json else job["id"])
        return 0
    if not args.json:
        print(job["id"], flush=True)
    return _ended(api, watch(api, job["id"]), args.json, args.output)


def _ended(api: Api, job: dict, as_json: bool, output: Path | None) -> int:
    """Report a job that ended (downloading its video to `output` if it completed); its exit status."""
    if job["status"] == "completed" and output is not None:
        api.download(job["id"], "video", output)
        print(f"wrote {output}", file=sys.stderr)
    if as_json:
        print(json.dumps(job, indent=2))
    error = job.get("error") or {}
    reason = f": {error.get('code')}: {error.get('message')}" if error else ""
    print(f"{job['id']} {job['status']}{reason}", file=sys.stderr)
    return EXIT[job["status"]]


def _watch(api: Api, args: argparse.Namespace) -> int:
    return _ended(api, watch(api, args.video_id), args.json, None)


def _get(api: Api, args: argparse.Namespace) -> int:
    print(json.dumps(api.get(args.video_id), indent=2))
    return 0


def _download(api: Api, args: argparse.Namespace) -> int:
    output = args.output or Path(f"{args.video_id}.{'mp4' if args.variant == 'video' else 'webp'}")
    api.download(args.video_id, args.variant, output, args.segment)
    print(output)
    return 0


def _cancel(api: Api, args: argparse.Namespace) -> int:
    job = api.cancel(args.video_id)
    print(f"{job['id']} {job['status']}")
    return 0


def _delete(api: Api, args: argparse.Namespace) -> int:
    print(f"{api.delete(args.video_id)['id']} deleted")
    return 0


def _list_jobs(api: Api, args: argparse.Namespace) -> int:
    jobs, after = [], args.after
    while True:
        page = api.list(args.limit, after)
        jobs += page["data"]
        after = page["last_id"]
        if not (args.all and page["has_more"]):
            break
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    for job in jobs:
        print(f"{job['id']}  {job['status']:<11} {job['progress']:>3}%  {job['pusa']['task']:<11} {job['size']:>9} "
              f"{job['seconds']:>5}s  {job['prompt']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command in ("submit", "extend") and args.output is not None and not args.wait:
        parser.error("-o/--output needs --wait")
    try:
        with Api(args.url, args.api_key) as api:
            return args.run(api, args)
    except (ApiError, BadInvocation) as exc:
        print(f"pusa client: error: {exc}", file=sys.stderr)
        return UNREACHABLE if isinstance(exc, ApiError) and exc.status >= 500 else BAD_REQUEST
    except Unreachable as exc:
        print(f"pusa client: error: cannot reach the service: {exc}", file=sys.stderr)
        return UNREACHABLE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
