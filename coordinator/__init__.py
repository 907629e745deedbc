"""fleet-coordinator: keeps a fleet of LLM agents busy.

Tasks dropped into ``tasks.d/`` are validated, queued in a file spool, claimed by agent processes
through atomic renames fenced by attempt numbers, and driven through a five-stage pipeline.
"""

__version__ = "0.1.0"
