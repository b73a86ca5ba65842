"""Networks, ONNX export, the bundle format, inference backends and the noise sampling engine.

Import-light by design: torch is only imported by :mod:`models.networks` and :mod:`models.export` (offline
pipeline) and lazily by the torch backend; the serving path needs numpy and onnxruntime only.
"""
