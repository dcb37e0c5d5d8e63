"""A task module that imports fine in the manager but kills every worker process at start
(as a module with a broken native extension might): for the crash-loop test."""
import multiprocessing
import os

if multiprocessing.parent_process() is not None:
    os._exit(1)
