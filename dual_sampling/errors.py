"""Exceptions a user can meet. Each message names the input, server or config key and what to do."""


class DualSamplingError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(DualSamplingError, ValueError):
    """A config value is invalid; the message names the key (e.g. `sample.top_k`)."""


class DataError(DualSamplingError):
    """An input file is missing, empty or malformed; the message names the file."""


class ServerError(DualSamplingError):
    """A vLLM server could not be reached or answered with an error after retries."""


class ServerMismatchError(ServerError):
    """Two servers (or a server and the config) disagree: tokenizer, vocab, limits."""


class MalformedResponseError(ServerError):
    """A server answered 2xx with a body this client cannot read."""


class ThetaChangedError(ServerMismatchError):
    """The theta server swapped its weights (load_theta) since this run pinned its version."""


class CheckpointRefusedError(ServerError):
    """load_theta refused a checkpoint (shapes, config, tokenizer, path); the server keeps
    serving its previous weights. The message names what differs."""


class MergeError(DataError):
    """The job folders of a sharded run do not make one dataset (a shard or sample missing
    or doubled, settings that differ); the message names the jobs, shards and samples."""


class AuthenticationError(ServerError):
    """A server refused this client's API key, or its lack of one (HTTP 401/403); never
    retried. The message names the server and says where the key comes from, never the key."""
