"""Benchmarks of Mirrorline against rsync and lsyncd on the same data (issue 5).

``bench/run.py`` is the entry point (``make bench``, ``make bench-quick``,
``python bench/run.py --smoke``); ``RESULTS.md`` holds the latest figures and the
methods behind them.
"""
