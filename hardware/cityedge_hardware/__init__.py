"""The hardware checker: the city's device guideline catalogue and the probes that decide it.

``catalogue`` (requirements and profiles, from ``catalogue.yaml`` and ``profiles/``),
``efuse_rules`` (the eFuse verdicts, sans-IO) over ``efuse_summary`` and ``efuse_chips``,
``efuse_collect`` and ``secinfo`` (esptool as a child process), ``cli`` (``cityedge hw``).
A part: it imports the core and the host library, never the application ``cityedge``.
"""
