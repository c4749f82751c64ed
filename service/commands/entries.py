"""`vggt-cache verify` and `convert`: the entries already under a data root, checked or rewritten."""

from __future__ import annotations

import argparse
import json
import os

from vggt_cache.service.collector import settle_start_up
from vggt_cache.service.commands.common import client, no_folder, say, say_json
from vggt_cache.service.errors import CommandError
from vggt_cache.service.samples import DEFAULT_MAX_HISTORY


def verify(args: argparse.Namespace) -> int:
    from vggt_cache.client.manifest import MANIFEST_NAME, read_manifest
    from vggt_cache.client.spec import FeatureSpec
    from vggt_cache.service.verify import verify_data_root

    data_root = os.path.abspath(args.data_root)
    if not os.path.isdir(data_root):
        raise no_folder(data_root)
    if args.estimate_storage:
        return _estimate_storage(data_root, args.samples, args.json)
    history, files = args.max_history_images, args.data_files
    if args.server:
        from vggt_cache.client.service import spec_of_status

        with client(args) as service:
            body = service.status()
        try:
            spec = spec_of_status(body)
        except ValueError as exc:
            raise CommandError(f"{args.server} gives no spec to verify against: {exc}") from None
    else:
        try:
            manifest = read_manifest(data_root)
        except ValueError as exc:
            raise CommandError(f"{exc}; pass --server URL to take the spec from a service") from None
        if manifest is None:
            raise CommandError(
                f"no {MANIFEST_NAME} in {data_root} (no job has finished there): pass --server URL "
                "to take the spec from a service"
            )
        spec = FeatureSpec.from_dict(manifest["spec"])
        scanned = (manifest.get("plan") or {}).get("source") or {}  # what the job that wrote it read
        history = scanned.get("max_history_images") if history is None else history
        files = scanned.get("sample_files") if files is None else files
    settle_start_up()
    report = verify_data_root(
        data_root,
        spec,
        data_path=args.data_path,
        max_history_images=DEFAULT_MAX_HISTORY if history is None else history,
        files=files,
        max_sample_bytes=args.max_sample_bytes,
    )
    if args.json:
        say_json(report)
    else:
        counts = report["counts"]
        say(f"{data_root}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        for item in report["problems"][:50]:
            say(f"  {item['outcome']:13s} {item['image']}: {item['reason']}")
    return 0 if report["ok"] else 1


def _estimate_storage(data_root: str, samples: int, as_json: bool) -> int:
    from vggt_cache.service.convert import estimate_storage
    from vggt_cache.service.jobs.plan import human_bytes

    report = estimate_storage(data_root, samples)
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    say(
        f"{data_root}: {report['entries']} entries, {human_bytes(report['bytes_now'])} now; "
        f"{report['sampled']} valid entries sampled"
    )
    for storage, row in report["storages"].items():
        error = row.get("error")
        shown = (
            (
                f"; error max {error['max_rel']:.2%} mean {error['mean_rel']:.2%} of the magnitudes, lowest "
                f"token cosine {error['min_cosine']:.5f}"
            )
            if error
            else ""
        )
        say(f"  {storage:7s} {human_bytes(row['bytes'])} ({row['ratio']:.2f}x smaller than raw){shown}")
    _say_unlisted(report, "not counted")
    return 0


def convert(args: argparse.Namespace) -> int:
    from vggt_cache.service.convert import convert_entries
    from vggt_cache.service.jobs.plan import human_bytes

    data_root = os.path.abspath(args.data_root)
    if not os.path.isdir(data_root):
        raise no_folder(data_root)
    report = convert_entries(data_root, args.storage)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        say(
            f"{data_root}: {report['converted']} entries converted to {args.storage}, "
            f"{human_bytes(report['bytes_saved'])} saved ({human_bytes(report['bytes_before'])} -> "
            f"{human_bytes(report['bytes_after'])}); "
            f"{report['already']} already {args.storage}, {report['invalid']} not valid (left alone), "
            f"{report['lossy_source']} fp8 (not converted), {report['failed']} failed"
        )
        for item in report.get("failures", [])[:50]:
            say(f"  failed {item['image']}: {item['reason']}")
        _say_unlisted(report, "not converted")
    return 0 if not report["failed"] and not report["unlisted"] else 1


def _say_unlisted(report: dict, what: str) -> None:
    if report["unlisted"]:
        say(f"{report['unlisted']} folders or files could not be read, their entries {what}:")
        for item in report["unlisted_paths"][:50]:
            say(f"  unlisted {item['path']}: {item['reason']}")
