"""The five stages every claimed task passes through: retrieve, assemble, infer, post-process,
stream."""
