"""Device models. Register models run on vCPU threads: synchronous, no I/O, no awaits."""
