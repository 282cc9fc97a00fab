"""The one error type a user sees as a single line.

A JobError (and its kinds: ConfigError, DataError, ShardError) is a problem with a job's inputs
that its message explains, naming the file, key or shard. `trainer/shutdown.run_and_exit` prints
it as `error: ...` from one rank only, without a traceback, and exits 2; every job checks its
inputs this way before it starts ranks or loads models (`--check` runs only those checks).
"""

from __future__ import annotations


class JobError(ValueError):
    """Bad input to a job, explained by its message."""
