"""Checkpoint I/O (:mod:`fd_ref.checkpoint.io`: safe saving and loading) and key conversions between layouts
(:mod:`fd_ref.checkpoint.keys`). Imports nothing above itself: models, scripts and the loop use it."""
