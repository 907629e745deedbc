"""The daemon: intake of task files, supervision of agent processes, reclaim, readiness."""
