"""Shared fixtures for the fleetlearn test-suite."""
