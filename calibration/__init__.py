"""Calibration: text sources, activation capture and the statistics gathered from them."""
