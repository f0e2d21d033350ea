"""`pusa batch`: generate every row of a manifest on Ray (a local Ray, or a cluster with ``--address`` or
as the entrypoint of ``ray job submit``).

    pusa batch requests.jsonl --output out/                      # tiny preset, local Ray
    pusa batch requests.jsonl --output out/ --preset tiny-wan2.2 # model pusa-wan2.2 (tiny, two experts)
    pusa batch s3://b/requests.parquet --output s3://b/run1 --config batch_config.yaml --address auto

Exit status: 0 when every row completed, 1 when some failed (see the error manifest), 2 for a bad
invocation (one line naming what is wrong).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from pusa_model.presets import PRESET_NAMES

    parser.add_argument("manifest", help="JSONL, CSV or Parquet of requests, local or s3://")
    parser.add_argument("--output", required=True, help="output prefix, local folder or s3://")
    parser.add_argument("--config", type=Path, help="batch settings YAML (preset, stage pools)")
    parser.add_argument("--preset", choices=PRESET_NAMES,
                        help="the preset, hence the model, every row runs on (default: the config's, else tiny); "
                             "a row naming another model fails")
    parser.add_argument("--address", help="Ray cluster address (default: the job's cluster, else a local Ray)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON, no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argparse.ArgumentParser(prog="pusa batch", description=__doc__.splitlines()[0])).parse_args(argv)
    import ray
    from ray.data import DataContext

    from .run import BatchSettings, run_batch
    from .sources import check_manifest_name

    try:
        settings = BatchSettings.load(args.config)
        if args.preset:
            settings = settings.model_copy(update={"preset": args.preset})
        check_manifest_name(args.manifest)
    except (OSError, ValidationError, yaml.YAMLError) as exc:
        print(f"pusa batch: error: config: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except ValueError as exc:  # before a Ray is started for nothing
        print(f"pusa batch: error: {exc}", file=sys.stderr)
        return 2
    # a job's cluster under `ray job submit` (RAY_ADDRESS), else --address, else a Ray of its own
    ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "local", log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    try:
        summary = run_batch(args.manifest, args.output, settings, progress=not args.json)
    except (OSError, ValueError) as exc:
        print(f"pusa batch: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['completed_total']} completed, {summary['failed_total']} failed "
              f"({summary['skipped']} already done); {summary['output']}")
    return 0 if summary["failed_total"] == 0 else 1
