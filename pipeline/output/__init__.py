"""The output directory: the format contract, storage, atomic shards, the manifest, the lock."""
