"""A run from spec to record: resolve, plan and run it, sweeps of many runs."""
