"""The command modules, in the order their commands appear in ``--help``.

Each module has ``register(app)`` and keeps its heavy imports inside the command functions.
"""

from controller.cli import (dataset_cmds, export_cmds, init_cmds, plan_cmds, run_cmds,
                            spec_cmds)

MODULES = [init_cmds, run_cmds, plan_cmds, spec_cmds, dataset_cmds, export_cmds]
