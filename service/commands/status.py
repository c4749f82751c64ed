"""`vggt-cache status` (a running service's /status in lines) and `demo` (a first look, end to end)."""

from __future__ import annotations

import argparse

from vggt_cache.service.commands.common import client, say, say_json


def _per_priority(counts: dict | None) -> str:
    """`{'on_demand': 2, 'bulk': 5}` as `2 on demand, 5 bulk`."""
    return ", ".join(f"{n} {p.replace('_', ' ')}" for p, n in (counts or {}).items()) or "0"


def status(args: argparse.Namespace) -> int:
    from vggt_cache.service.progress import duration

    with client(args) as service:
        body = service.status()
    if args.json:
        say_json(body)
        return 0
    svc, model, eng = body["service"], body.get("model"), body.get("engine")
    say(f"service  {args.server}  state={svc['state']}  uptime {duration(svc['uptime_s'])}")
    if svc.get("error"):
        say(f"error    {svc['error']}")
    for warning in svc.get("warnings") or []:
        say(f"warning  {warning}")
    if model:
        say(f"model    {model['source']}  {model['fingerprint']}  on {', '.join(model['devices'])}")
    spec = body.get("spec")
    if spec:
        say(
            f"spec     {body.get('preset') or 'custom'} ({spec['attention']} attention, {spec['preprocess']} "
            f"{spec['size']} px, align {spec['align']}, {spec['dtype']}, reference frame "
            f"{spec.get('reference_frame', 'first')})  digest {spec['digest']}"
        )
    if eng:
        say(
            f"engine   queued {_per_priority(eng.get('queued'))}; {eng.get('images_per_s', 0):g} images/s "
            f"over the last {eng.get('window_s', 0):g} s"
        )
        lookups = eng.get("on_demand_lookups")
        if lookups:
            say("requests " + ", ".join(f"{k} {v}" for k, v in lookups.items()) + " (on-demand units)")
    for job in body.get("jobs", []):
        eta = f"  eta {duration(job['eta_s'])}" if job.get("eta_s") else ""
        if job["state"] == "running" and job.get("planned") is False:
            eta += f"  (planning: {job['total']} entries so far)"
        say(
            f"job {job['job_id']}  {job['state']:9s} {job['progress'] * 100:5.1f}%  "
            f"{job['computed']} computed {job['skipped']} skipped {job['failed']} failed  {job['data_root']}{eta}"
        )
        if job.get("error"):
            say(f"    error: {job['error']}")
    return 0


def demo(args: argparse.Namespace) -> int:
    from vggt_cache.service.demo import run_demo

    return run_demo(keep=args.keep, port=args.port)
