"""One agent process: claim the most urgent task it can serve, run the pipeline, complete."""
