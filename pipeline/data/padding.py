"""How a token dataset was padded: the side and the pad id, which dynamic padding must reproduce.

The manifest's resolved config says the padding mode and, when it was set, the side. What it does
not record is found in the data (a padded row shows its side and pad id) and, for unpadded shards,
in the job's tokenizer, loaded as the job loaded it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.data.columns import Ragged, ShardReader, select_columns
from pipeline.data.layout import DataError, filesystem, shard_buffer
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.data.reader import OutputReader

_SHARDS_SCANNED = 4  # a padded row is nearly always in the first shard; stop looking after a few


@dataclass(frozen=True)
class TokenPadding:
    """The padding of a token dataset: mode (max_length | longest | none), side and pad id (None: unknown)."""

    mode: str | None
    side: str | None
    pad_id: int | None


def _padded_row(ids: np.ndarray | Ragged, mask: np.ndarray | Ragged) -> tuple[str, int] | None:
    """(side, pad id) read off the first row that has both real and padded positions, if any."""
    id_rows = ids.to_list() if isinstance(ids, Ragged) else ids
    for row, positions in enumerate(mask.to_list() if isinstance(mask, Ragged) else mask):
        padded = np.flatnonzero(positions == 0)
        if 0 < len(padded) < len(positions):
            return ("left" if positions[0] == 0 else "right"), int(id_rows[row][padded[0]])
    return None


def _from_data(reader: OutputReader) -> tuple[str, int] | None:
    schema = reader.output.schemas["tokens"]
    if "attention_mask" not in schema.names:
        return None
    specs = select_columns({"tokens": schema}, ["input_ids", "attention_mask"])
    fs = filesystem(reader.output.root, reader.output.storage_options)
    for shard in reader.output.shards[:_SHARDS_SCANNED]:
        columns = ShardReader({"tokens": shard_buffer(shard.files["tokens"], fs)}, specs)
        rows = columns.gather(np.arange(shard.rows))
        found = _padded_row(rows["input_ids"], rows["attention_mask"])
        if found:
            return found
    return None


def _from_tokenizer(manifest: dict[str, Any], root: str) -> tuple[str, int | None]:
    # The job's own loader (aliases, local directories, tokenizer.json files), so names mean the same here.
    from pipeline.tokenize.loading import tokenizer_settings

    config = manifest.get("config", {})
    options = config.get("tokenizer", {})
    name = options.get("name") or config.get("encoder", {}).get("model")
    try:
        hf = tokenizer_settings(name, "tokenizer.name", options.get("revision"))  # a hub id's pinned commit
    except ConfigError as exc:
        raise DataError(f"{root}/tokens: cannot tell its padding side or pad id: the job's tokenizer {name!r} "
                        f"does not load here ({exc}); pass padding_side= and pad_id= to collator()") from None
    pad_token = options.get("pad_token") or hf.pad_token
    pad_id = hf.backend_tokenizer.token_to_id(pad_token) if pad_token else None
    return hf.padding_side, pad_id


def token_padding(reader: OutputReader, need_side: bool, need_pad_id: bool) -> TokenPadding:
    """Resolve what is needed of the padding of ``reader``'s token shards: config, then data, then tokenizer."""
    if "tokens" not in reader.output.stages:
        return TokenPadding(None, None, None)
    options = reader.output.manifest.get("config", {}).get("tokenizer", {})
    mode, side, pad_id = options.get("padding"), options.get("padding_side"), None
    if (need_side and side is None) or need_pad_id:
        found = _from_data(reader) if mode != "none" else None
        if found:
            side, pad_id = side or found[0], found[1]
    if (need_side and side is None) or (need_pad_id and pad_id is None):
        tok_side, tok_pad = _from_tokenizer(reader.output.manifest, reader.output.root)
        side, pad_id = side or tok_side, pad_id if pad_id is not None else tok_pad
    return TokenPadding(mode, side, pad_id)
