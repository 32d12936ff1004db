"""Benchmarks of tdhook against its peers (captum, zennit, nnsight, TransformerLens).

Run ``python -m bench.run`` (or ``make bench``); see ``docs/benchmarks.md`` for the method and the
latest results. Nothing here is part of the installed package.
"""
