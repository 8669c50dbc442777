"""Defaults of writing a teacher cache, shared by the writer and `betakd cache-teacher`.

Apart from the rest of the cache format so that the command line reads them without
importing torch (`betakd --help` starts in well under a second).
"""

DEFAULT_SHARD_SIZE = 256
DEFAULT_BATCH_SIZE = 4
DEFAULT_VISUAL_TOKENS = 16
