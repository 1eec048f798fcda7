"""The one exception type of the data path."""


class DataError(RuntimeError):
    """Bad or missing data. The message names the manifest, shard and sample involved.

    It takes a single message argument so that torch's DataLoader can re-raise it unchanged
    in the main process when a worker hits it.
    """
