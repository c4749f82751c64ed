"""One module per resource: probes, features, jobs, status (status, metrics and the status page)."""
