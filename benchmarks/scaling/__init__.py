"""Parts of ``benchmarks/scale.py`` (a model above 2 GB: external data, peak memory,
correctness), one concern a module:

- ``model``: the seeded model generated straight to disk, one tensor at a time;
- ``memory``: a process's RSS and peak from ``/proc``, the sampler, a measured run;
- ``report``: the Machine section, phase tables, findings and the Markdown results.

``scale.py`` keeps the command line, the measured child processes and the correctness
check (they run ``scale.py`` itself in fresh subprocesses).
"""
