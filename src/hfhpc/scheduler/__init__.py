"""The scheduler layer: what hfhpc knows about SLURM (and any other batch scheduler).

``environment`` (the job's variables, read once), ``hostlist`` (SLURM host lists), ``partitions``
(what a partition offers, and whether a request can ever run there) and ``reasons`` (why a job
waits, in words). The executors of :mod:`hfhpc.launch.executor` build on them. Kept free of
imports: the network seal loads ``environment`` in children that may not import much.
"""
