"""The head-to-head of ``benchmarks/run.py`` (``make bench``), one concern a module:

- ``cases``: the models and how each is prepared;
- ``results``: what is measured, as JSON-ready dataclasses;
- ``measure``: every tool on one model (nodes left, fold time, error, latency);
- ``verdicts``: each target met or missed, and where a peer beat bnfuse;
- ``render``: tables, Markdown, JSON and the RESULTS.md section.

Helpers shared with the other benchmark scripts live in ``benchmarks/_common.py``.
"""
