"""fleetlearn's device SDK: what a device runs.

Its only dependencies are onnxruntime, numpy, paho-mqtt and cryptography, and it never imports
``aggregator``. Sub-packages are imported on demand so a device loads only what it uses.
"""

__version__ = "0.1.0"
