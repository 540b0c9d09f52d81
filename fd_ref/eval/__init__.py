"""Measuring a model and its targets, outside the training loop: top-1 / top-5 on a validation set
(:mod:`~fd_ref.eval.evaluate`), weighted k-NN of frozen features (:mod:`~fd_ref.eval.knn`, and
``finetune.py --knn`` in :mod:`~fd_ref.eval.knn_eval`), and the PHI-S statistics of the teachers' tokens
estimated once before distillation (:mod:`~fd_ref.eval.target_fit`)."""
