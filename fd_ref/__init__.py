"""fd_ref: a reference implementation of Feature Distillation (Wei et al., arXiv 2205.14141)."""
__version__ = "0.1.0"
