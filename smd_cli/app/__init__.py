"""What a person runs: the CLI, batches and records, the live stream and the paint app."""
