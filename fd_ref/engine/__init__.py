"""The one training loop (:mod:`~fd_ref.engine.trainer`, fed a :mod:`~fd_ref.engine.job`) and what keeps a run alive: the run setup both scripts
share (:mod:`~fd_ref.engine.setup`), safe resume (:mod:`~fd_ref.engine.resume`), one run per folder
(:mod:`~fd_ref.engine.runlock`), processes and collectives (:mod:`~fd_ref.engine.distributed`), precision
(:mod:`~fd_ref.engine.precision`), evaluation (:mod:`~fd_ref.eval.evaluate`), FLOPs / MFU
(:mod:`~fd_ref.engine.flops`) and TensorBoard (:mod:`~fd_ref.engine.tensorboard`)."""
