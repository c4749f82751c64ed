"""vggt-cache service: the GPU side (model, preprocessing, engine, jobs, HTTP API, CLI)."""
