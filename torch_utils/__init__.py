"""Training-time utilities: distributed setup, statistics, misc helpers."""
