"""The certification service: request parameters -> plan -> certificate, no HTTP.

Layer: statistics (``smoothing``) <- models and engine (``models``) <- this package <- HTTP app / CLI (``server``,
``cli``). Nothing here imports ``server``, ``calibration`` or ``cli``.
"""
