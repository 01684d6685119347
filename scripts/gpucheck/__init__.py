"""gpu-check: every GPU test and benchmark of fastkd in one call within a time budget (``bash scripts/dev gpu-check``).

Modules: ``plan`` (the stages and the budget split), ``runner`` (processes, time limits), ``report`` (the pytest
plugin that records each test as it ends), ``targets`` (issues 3-6's targets from those records), ``summary``
(markdown and JSON), ``outfolder`` (the files in the out folder and their limits), ``environment`` (stage 1),
``dry_run`` and ``fake`` (the simulation of ``--dry-run``). A developer tool: not part of the fastkd package.
"""
