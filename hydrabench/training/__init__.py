"""Training: the loop, its distributed set-up, and what it measures (energy, time)."""
