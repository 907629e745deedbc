"""The file spool: the truth about every task's state and who holds it.

A task's state is the place of its one *token* file. Every transition is one ``rename`` of that
token, which the kernel makes atomic: of two processes racing to move the same token, exactly one
succeeds and the other gets ``ENOENT``. Claiming, completing (the fence), reclaiming, cancelling
and retrying are all such renames; see ``docs/architecture.md``.
"""
