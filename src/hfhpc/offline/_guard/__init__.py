"""The folder a sealed child has first on ``PYTHONPATH`` (see :mod:`hfhpc.offline.seal`).

Its ``sitecustomize`` runs at the start of every Python interpreter of a sealed job. This file
only makes the folder a package, so that it is installed with hfhpc; it is never imported by the
guard itself.
"""
