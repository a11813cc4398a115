"""Calibration-set collection (float-model trajectories recorded at the UNet input) and caching."""

from quest_export.calib.collect import CalibrationSet, collect

__all__ = ["CalibrationSet", "collect"]
