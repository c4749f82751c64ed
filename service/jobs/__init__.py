"""Bulk precompute jobs: options, planning, the store, the runner, the job view and the manifest.

Import the module you need (`vggt_cache.service.jobs.planning`, `.runner`, ...): this package imports
nothing itself, so a dry run or the HTTP routes do not load the runner and its engine.
"""
