"""flux-remote's laptop side: spec, planner, providers, journal, orchestration and the CLI.

Everything here is callable from Python (the notebook uses it); ``controller.cli`` only parses
arguments and renders.
"""

__version__ = "0.1.0"
