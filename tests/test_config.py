"""Config loading: YAML with the safe loader, --set overrides, errors that name the key."""

from __future__ import annotations

import pytest

from pipeline.config import apply_overrides, load_config, validate_config
from pipeline.errors import ConfigError


def test_overrides_parse_yaml_scalars_and_create_sections():
    data = apply_overrides({"input": {"path": "a"}},
                           ["tokenizer.max_length=77", "tokenizer.truncation=false", "input.id_column=null",
                            "encoder.pooling=none", "input.path=b=c"])
    assert data["tokenizer"] == {"max_length": 77, "truncation": False}
    assert data["input"] == {"path": "b=c", "id_column": None}
    assert data["encoder"]["pooling"] == "none"


def test_unknown_keys_and_bad_values_name_the_key():
    with pytest.raises(ConfigError, match=r"tokenizer\.max_lenght: unknown key"):
        validate_config({"input": {"path": "a"}, "tokenizer": {"max_lenght": 3}})
    with pytest.raises(ConfigError, match=r"tokenizer\.padding: Input should be 'max_length', 'longest' or 'none'"):
        validate_config({"input": {"path": "a"}, "tokenizer": {"padding": "maximum"}})
    with pytest.raises(ConfigError, match=r"output\.shard_rows: .*greater than 0"):
        validate_config({"input": {"path": "a"}, "output": {"shard_rows": 0}})
    with pytest.raises(ConfigError, match=r"input: required key is missing"):
        validate_config({})
    with pytest.raises(ConfigError, match=r"stride.*truncation"):
        validate_config({"input": {"path": "a"}, "tokenizer": {"stride": 4, "truncation": False}})
    with pytest.raises(ConfigError, match=r"^--set 'tokenizer': expected dotted\.key=value$"):
        apply_overrides({}, ["tokenizer"])
    with pytest.raises(ConfigError, match=r"^--set '=3': expected dotted\.key=value$"):
        apply_overrides({}, ["=3"])


def test_load_config_from_yaml_and_output_override(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input:\n  path: corpus.jsonl\ntokenizer:\n  max_length: 128\n")
    config = load_config(path, ["tokenizer.padding=longest"], output="elsewhere")
    assert config.output.path == "elsewhere"
    assert config.tokenizer.max_length == 128 and config.tokenizer.padding == "longest"


def test_yaml_is_read_with_the_safe_loader(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("input: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_output_hash_ignores_where_and_how_many_cpus():
    a = validate_config({"input": {"path": "a"}, "output": {"path": "x"}, "ray": {"num_cpus": 1}})
    b = validate_config({"input": {"path": "a"}, "output": {"path": "y"}, "ray": {"num_cpus": 2}})
    c = validate_config({"input": {"path": "a"}, "tokenizer": {"max_length": 3}})
    assert a.output_hash() == b.output_hash() != c.output_hash()
