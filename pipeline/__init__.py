"""embedpipe's library: plan, tokenize, encode and write sharded Arrow datasets.

Nothing in this package prints or parses command lines; ``jobs`` does that.
"""

__version__ = "0.1.0"
