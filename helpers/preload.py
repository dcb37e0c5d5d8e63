"""Imported last by the daemon's fork server, after the modules every worker and the API need
(``oos_service_manager.FORKSERVER_PRELOAD``): it moves everything they made into the garbage
collector's permanent generation, so the collections of the processes forked from it never
write to those objects' pages, which then stay shared instead of being copied into each."""
import gc

gc.collect()
gc.freeze()
