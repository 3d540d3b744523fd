"""pipeline.output.features writes the features dict datasets itself derives, for every schema a job writes."""

from __future__ import annotations

import pyarrow as pa
import pytest
from datasets import Features

from pipeline.output.embedding_format import embedding_arrow_field
from pipeline.output.features import dataset_features, feature_of
from pipeline.tokenize.core import TokenizeSpec, token_schema
from pipeline.tokenize.pack import packed_schema


def _spec(**changes) -> TokenizeSpec:
    settings = dict(tokenizer_json="{}", max_length=16, padding="max_length", padding_side="right", truncation=True,
                    truncation_side="right", add_special_tokens=True, pad_id=0, stride=None,
                    with_token_type_ids=True, id_dtype="uint16", num_special_tokens=2)
    return TokenizeSpec(**(settings | changes))


TOKEN_SCHEMAS = {
    "fixed width, type ids": token_schema(_spec()),
    "padding longest (variable width)": token_schema(_spec(padding="longest")),
    "padding none, int32 ids, no type ids": token_schema(_spec(padding="none", pad_id=None, id_dtype="int32",
                                                               with_token_type_ids=False)),
    "chunked (stride)": token_schema(_spec(stride=4)),
    "packed uint16": packed_schema(pa.uint16(), 32),
    "packed int32": packed_schema(pa.int32(), 2048),
}
EMBEDDING_SCHEMAS = {
    f"{dtype} {'per-token' if seq else 'pooled'}": pa.schema([
        pa.field("id", pa.string()), pa.field("chunk", pa.int32()), embedding_arrow_field("embedding", 8, seq, dtype)])
    for dtype in ("float32", "float16", "bfloat16") for seq in (None, 77)
} | {  # quantized output is pooled only
    f"{dtype} pooled": pa.schema([pa.field("id", pa.string()), embedding_arrow_field("embedding", 20, None, dtype)])
    for dtype in ("int8", "uint8", "binary", "ubinary")
}


@pytest.mark.parametrize("name", [*TOKEN_SCHEMAS, *EMBEDDING_SCHEMAS])
def test_features_equal_what_datasets_derives(name):
    schema = (TOKEN_SCHEMAS | EMBEDDING_SCHEMAS)[name]
    assert dataset_features(schema) == Features.from_arrow_schema(schema).to_dict()


@pytest.mark.parametrize("arrow_type", [pa.int8(), pa.uint8(), pa.int16(), pa.int64(), pa.uint32(), pa.float64(),
                                        pa.bool_(), pa.large_string(), pa.list_(pa.list_(pa.float16()))])
def test_every_simple_type_matches_datasets(arrow_type):
    schema = pa.schema([pa.field("x", arrow_type)])
    assert dataset_features(schema) == Features.from_arrow_schema(schema).to_dict()


def test_a_type_embedpipe_never_writes_is_refused_not_guessed():
    with pytest.raises(ValueError, match="timestamp"):
        feature_of(pa.timestamp("s"))
