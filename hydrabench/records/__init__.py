"""What a run leaves: the run store, its records, and their provenance."""
