"""Imported last by the daemon's fork server, after the modules every worker and the API need
(``oos_service_manager.FORKSERVER_PRELOAD``).

- It dies with the manager: the processes it forks hold its "alive" pipe open too, so it
  would outlive a SIGKILLed manager, and they (whose die-with-parent signal follows it) with it.
- It moves everything imported so far into the garbage collector's permanent generation, so
  the collections of the processes forked from it never write to those objects' pages, which
  then stay shared instead of being copied into each.
"""
import gc
import signal

from helpers.process import die_with_parent

die_with_parent(signal.SIGTERM)
gc.collect()
gc.freeze()
