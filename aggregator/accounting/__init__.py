"""Host-side privacy accounting (dp-accounting) and noise calibration for distributed DP."""
