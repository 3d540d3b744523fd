"""The ``datasets`` features of an Arrow schema, as ``Features.from_arrow_schema(schema).to_dict()`` writes them.

Importing ``datasets`` costs about a second, more than a small job's work: the stage metadata
(``dataset_info.json``) and ``embedpipe verify`` use this instead. It covers the Arrow types
embedpipe writes (strings, integers, floats, booleans, lists and fixed-size lists of them), in the
``List`` form of datasets >= 4; tests/test_features.py checks it against ``datasets`` itself for every
schema a job can write.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

# Arrow type names that datasets spells otherwise; every other integer type keeps its Arrow name.
_DTYPE_NAMES = {"halffloat": "float16", "float": "float32", "double": "float64", "string": "string",
                "large_string": "large_string", "bool": "bool"}


def feature_of(arrow_type: pa.DataType) -> dict[str, Any]:
    """The features dict of one column type.

    Raises:
        ValueError: a type embedpipe never writes (structs, dictionaries, timestamps...).
    """
    if pa.types.is_fixed_size_list(arrow_type):
        return {"feature": feature_of(arrow_type.value_type), "length": arrow_type.list_size, "_type": "List"}
    if pa.types.is_list(arrow_type):
        return {"feature": feature_of(arrow_type.value_type), "_type": "List"}
    name = str(arrow_type)
    if pa.types.is_integer(arrow_type):
        return {"dtype": name, "_type": "Value"}
    if name in _DTYPE_NAMES:
        return {"dtype": _DTYPE_NAMES[name], "_type": "Value"}
    raise ValueError(f"no datasets feature written for Arrow type {arrow_type}")


def dataset_features(schema: pa.Schema) -> dict[str, Any]:
    """``{column: feature}`` for every column of ``schema``, in the schema's order."""
    return {field.name: feature_of(field.type) for field in schema}
