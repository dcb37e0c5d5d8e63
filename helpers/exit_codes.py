"""Every exit code OOS uses, in one block: systemd's Restart= policy, scripts and people read them.

The daemon (``oos run``, ``oos_service_manager.py``) exits with:"""
OK = 0
CONFIG = 2      # the config file or environment is invalid
IMPORT = 3      # a task module failed to import (also: a worker could not boot)
CRASH_LOOP = 4  # workers keep dying right after start
DATABASE = 5    # the database cannot be opened or is corrupt beyond recovery
PLATFORM = 6    # not Linux
API = 7         # the API cannot start: its address is taken, or another server answers there

# The ``oos`` command exits with:
REFUSED = 1     # the operation was refused or failed (one line on stderr says why)
USAGE = 2       # the command line itself is wrong (click's own code)
