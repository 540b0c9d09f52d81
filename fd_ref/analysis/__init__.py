"""The paper's diagnostics (Sec. 4): their equations (:mod:`~fd_ref.analysis.diagnostics`), the models and
measurements analyze.py runs (:mod:`~fd_ref.analysis.models`), figures and JSON (:mod:`~fd_ref.analysis.report`)
and training curves (:mod:`~fd_ref.analysis.plots`)."""
