"""Flywheel gear adapter: translates a Flywheel job (config.json, inputs) into one `run_pipeline` call."""
