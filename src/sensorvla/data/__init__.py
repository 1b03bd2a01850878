"""The data layer: LeRobot v3 datasets, causal timestamp alignment, normalization and importers."""
