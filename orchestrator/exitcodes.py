"""The exit codes of a job process (``run-job``), which executors read to decide what happened."""

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 3
# Stopped in the middle of a stage that saved no checkpoint: its work is lost, and running it again
# starts from the beginning (3, by contrast: a checkpoint was saved, or the stage never started).
EXIT_ABORTED = 4
EXIT_TIMEOUT = 5  # a SLURM task out of time and of requeues: never requeued by the batch script
