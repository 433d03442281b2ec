"""The bundled tiny example: synthetic, seeded repositories that the demo and the tests serve.

See :mod:`hfhpc.demo.build` (also runnable as ``python -m hfhpc.demo.build STORE``). Nothing is
imported here, so that running the module does not import it twice.
"""
