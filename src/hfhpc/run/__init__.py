"""The run folder (a spec's ``output_dir``): its layout, the frozen job file, progress, checkpoints
and the lock that keeps one writer at a time. Standard library only at import time: the login node
(``submit``, ``status``, ``report``) and the ranks both read it."""
