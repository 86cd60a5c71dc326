"""Transports: how fleetlearn's bytes move between devices and the aggregator.

``base.Transport`` is the one interface the pump, the service and the simulator use;
``memory`` implements it in process (with fault hooks), ``mqtt`` over a real broker, and
``reliable.ReliableChannel`` adds receipts, retransmission, chunking and deduplication on top
of any of them. Submodules are imported by name so a device never loads what it does not use.
"""
