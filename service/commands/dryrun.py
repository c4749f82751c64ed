"""`vggt-cache precompute --dry-run`: the plan, from the weights' identity alone (no model is built)."""

from __future__ import annotations

import argparse
import logging

from vggt_cache.service.collector import settle_start_up
from vggt_cache.service.commands.common import loading_model, say
from vggt_cache.service.jobs.options import JobLimits, JobOptions
from vggt_cache.service.paths import AllowedRoots
from vggt_cache.service.settings import ServiceSettings

log = logging.getLogger("vggt_cache")


def dry_run_local(args: argparse.Namespace, settings: ServiceSettings, data_root: str, allowed: AllowedRoots) -> int:
    """The plan of a precompute, from the weights' identity alone (the model is not built)."""
    from vggt_cache.service.jobs.planning import plan_root
    from vggt_cache.service.model import identify_model
    from vggt_cache.service.model.features import model_spec
    from vggt_cache.service.model.loader import is_hub_id

    with loading_model(settings.model, OSError, ValueError):  # weights there but unreadable: the user's to fix
        try:
            identity = identify_model(settings.model)  # reads nothing else
        except FileNotFoundError as exc:
            if not is_hub_id(settings.model):  # a path that is not there: a typo, said as one
                raise
            identity = _unknown_model(settings.model, exc)
    spec = model_spec(identity, **settings.spec)
    settle_start_up()
    plan = plan_root(data_root, spec, allowed, JobOptions.of(args), JobLimits.of(settings))
    if identity.fingerprint == UNKNOWN_FINGERPRINT:
        say(
            f"model        {settings.model}: not on this machine, identity unknown (every entry counted to "
            "compute; the digest below changes once the weights are there)"
        )
    print_plan(plan.to_dict(), plan.summary(), spec.digest)
    return 0


# What a plan's `source` counts, in words ("3 episode folder(s)", not "3 episodes source(s)").
_SOURCE_WORDS = {
    "jsonl": "JSONL file(s)",
    "json": "JSON sample file(s)",
    "jsonl+json": "sample file(s)",
    "episodes": "episode folder(s)",
    "images": "image(s) (no sample files)",
}


# Stands for weights that are not on this machine: no entry on disk carries it, so a plan made with it
# counts every entry to compute (an upper bound, as a plan errs large).
UNKNOWN_FINGERPRINT = "sha256:" + "0" * 64


def _unknown_model(source: str, missing: FileNotFoundError):
    """A dry run without the weights: VGGT-1B's architecture (or the config beside them), fingerprint unknown."""
    from vggt_cache.service.model import ModelIdentity
    from vggt_cache.service.model.config import AggregatorConfig

    log.warning(
        "The weights of %s are not on this machine (%s): planning from the spec alone. The model's "
        "identity is unknown, so entries already written cannot be checked: every entry counts as to "
        "compute",
        source,
        missing,
    )
    return ModelIdentity(AggregatorConfig(), UNKNOWN_FINGERPRINT, source)


def print_plan(plan: dict, summary: str, digest: str) -> None:
    """A plan (this process's, or a service's answer to a dry run) in lines a person reads."""
    source = plan["source"]
    history = f", max_history_images {source['max_history_images']}" if source.get("max_history_images") else ""
    log.info("Dry run, spec %s: nothing is computed or written", digest)
    kind = _SOURCE_WORDS.get(source["source"], source["source"])
    say(f"samples      {source['samples']} from {source['files']} {kind}{history}")
    recomputed = " (recomputed: --no-skip-existing)" if plan["valid"] + plan["to_compute"] > plan["entries"] else ""
    say(
        f"entries      {plan['entries']} ({plan['units']} forward units): {plan['valid']} valid{recomputed}, "
        f"{plan['to_compute']} to compute"
    )
    if plan["problems"] or plan["refused"] or plan["unreadable"]:
        say(
            f"problems     {plan['problems']} malformed sample(s), missing image(s) or unlisted folder(s) "
            f"({plan.get('unlisted', 0)} of these), {plan['refused']} refused (outside the allowed roots or too "
            f"many frames), {plan['unreadable']} unreadable image(s)"
        )
        for item in plan.get("first_problems", []):
            say(f"  {item['where']}: {item['reason']}")
    replaced = f", net of {plan['replaced_bytes']:,} bytes they replace" if plan.get("replaced_bytes") else ""
    say(f"to write     {plan['bytes_to_write']:,} bytes ({plan.get('entry_bytes', 0):,} bytes an entry{replaced})")
    say(
        f"free         {plan['free_bytes']:,} bytes on the file system of {plan['data_root']}"
        f" ({'fits' if plan['fits'] else 'DOES NOT FIT'})"
    )
    say(summary)
