"""Our own GPU worker: FLUX pipelines from a local model folder, input checks, safety check."""
