"""Optimisation: AdamW parameter groups with layer decay (:mod:`~fd_ref.optim.groups`), the warm-up + cosine
schedule (:mod:`~fd_ref.optim.schedule`) and LARS for the linear probe (:mod:`~fd_ref.optim.lars`)."""
