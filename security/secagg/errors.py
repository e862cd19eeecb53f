"""The one exception secure aggregation raises for anything a caller can act on."""


class SecAggError(Exception):
    """A SecAgg step was refused: bad settings, a malformed or forged message, a protocol rule
    that would be broken (too few survivors, both shares of one peer), or a failed check.
    The message names what is wrong; nothing secret is ever put in it."""
