"""The device agent's side of a deployment: its state directory and the agent loop (``agent``).

Device code only: nothing here imports ``aggregator`` or a host-only package.
"""
