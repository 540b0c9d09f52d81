"""The paper's method (Wei et al., arXiv 2205.14141, Sec. 3), one small module per piece:

- :mod:`~fd_ref.method.whitening`: the target, ``LayerNorm(t)`` without affine (Sec. 3.1);
- :mod:`~fd_ref.method.projection`: ``g``, a 1x1 convolution from the student's width to the teacher's;
- :mod:`~fd_ref.method.loss`: smooth-L1 with beta = 2, the mean over all elements (Eq. 1);
- :mod:`~fd_ref.method.position`: one relative position bias table shared by all student blocks;
- :mod:`~fd_ref.method.drop_path`: the student's linearly growing drop-path rates (asymmetric drop path);
- :mod:`~fd_ref.method.distill`: the FD objective that puts them together.

fd-ref's own options over it: :mod:`~fd_ref.method.target_norm` (whiten, none, PHI-S),
:mod:`~fd_ref.method.loss_options` (smooth-L1, MSE, cosine), :mod:`~fd_ref.method.multi_teacher`.

This layer imports nothing from fd_ref but its errors: the teacher it needs is any module with the
:class:`~fd_ref.method.distill.TeacherLike` surface.
"""
