"""The one training loop (:mod:`~fd_ref.engine.trainer`, fed a :class:`~fd_ref.engine.job.Run` and a
:class:`~fd_ref.engine.job.Job`) and what keeps a run alive: start-up (:mod:`~fd_ref.engine.setup`), safe
resume (:mod:`~fd_ref.engine.resume`), one run per folder (:mod:`~fd_ref.engine.runlock`), stop signals
(:mod:`~fd_ref.engine.stop`), processes and collectives (:mod:`~fd_ref.engine.distributed`), precision
(:mod:`~fd_ref.engine.precision`), random state (:mod:`~fd_ref.engine.rng`), the fault hook
(:mod:`~fd_ref.engine.faults`), the MFU's FLOP count (:mod:`~fd_ref.engine.flops`) and the TensorBoard log
(:mod:`~fd_ref.engine.tensorboard`). Evaluation lives in :mod:`fd_ref.eval`."""
