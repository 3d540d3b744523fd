"""Model and tokenizer names: aliases, local directories, hub ids, and the checks made before work.

The tokenizer is resolved once on the driver as ``transformers`` loads it (so every
option means exactly what it means there; the facts a job uses are cached on disk by
:mod:`pipeline.tokenize.settings`, so later jobs do not import transformers); workers
receive its serialized backend inside a :class:`TokenizeSpec` and need only ``tokenizers``
(a hub tokenizer is fetched on the driver alone, see :mod:`pipeline.hub`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from pipeline.config import JobConfig
from pipeline.errors import ConfigError
from pipeline.hub import ALIASES, fetch_tokenizer, is_hub_id, resolve_alias, resolve_commit, tokenizer_source
from pipeline.tokenize.core import TokenizeSpec
from pipeline.tokenize.settings import TokenizerSettings, cached_settings
from pipeline.tokenize.static_models import static_model_files, static_tokenizer_defaults

# transformers' placeholder model_max_length for "no limit known" (int(1e30)).
_PLACEHOLDER_MAX_LENGTH = int(1e29)


def _local_path(name: str, key: str, revision: str | None) -> str:
    """Where the tokenizer ``name`` is on this machine: an alias's directory, the name itself (a directory or a
    tokenizer.json), or a hub id's snapshot at ``revision``, fetched into the Hugging Face cache if absent.

    Raises:
        ConfigError: a hub id that cannot be resolved or fetched; ``revision`` set for a name that is no hub id.
    """
    path = resolve_alias(name)
    if is_hub_id(path):  # the snapshot folder is one commit's: caching by it never serves a moved branch
        return str(fetch_tokenizer(path, resolve_commit(path, revision, key), key))
    if revision is not None:
        raise ConfigError(f"{key}: {name!r} is no hub id (org/name) but an alias, a local directory or a file, "
                          f"which has no revisions; remove tokenizer.revision ({revision!r})")
    return path


def _load_hf_tokenizer(name: str, key: str, revision: str | None = None) -> Any:
    """Load a transformers fast tokenizer (an alias, a local directory or tokenizer.json, or a hub id at
    ``revision``), once per process for each local directory or snapshot (treat the result as read-only).

    Raises:
        ConfigError: it cannot be found or loaded; see also :func:`_local_path`.
    """
    return _load_tokenizer_at(_local_path(name, key, revision), name, key)


@functools.lru_cache(maxsize=8)
def _load_tokenizer_at(path: str, name: str, key: str) -> Any:
    import transformers

    try:
        if path.endswith(".json") and Path(path).is_file():
            return transformers.PreTrainedTokenizerFast(tokenizer_file=path)
        if not Path(path).is_dir():
            raise ConfigError(f"{key}: {name!r} is neither an alias ({', '.join(ALIASES)}), "
                              "a local tokenizer directory, a tokenizer.json file nor a hub id (org/name)")
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot load a tokenizer from {path}: {exc}") from None
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise ConfigError(f"{key}: {path} has no fast (tokenizers) tokenizer; embedpipe needs tokenizer.json")
    return tokenizer


def tokenizer_settings(name: str, key: str, revision: str | None = None) -> TokenizerSettings:
    """The settings of the tokenizer ``name`` (alias, directory, tokenizer.json, or hub id at ``revision``) as
    transformers loads it: from the on-disk cache when its files were seen before (no transformers import),
    else loaded.

    Raises:
        ConfigError: as :func:`_load_hf_tokenizer` (``key`` names the config key in the message).
    """
    return _settings_at(_local_path(name, key, revision), name, key)


@functools.lru_cache(maxsize=8)
def _settings_at(path: str, name: str, key: str) -> TokenizerSettings:
    local = Path(path)
    if not (local.is_dir() or (local.suffix == ".json" and local.is_file())):
        _load_tokenizer_at(path, name, key)  # raises the error that says what is wrong with the name
    return cached_settings(local, lambda: _load_tokenizer_at(path, name, key))


def _single_type_ids_zero(tokenizer_json: str) -> bool:
    """Whether the post-processor gives every token of a single sequence type id 0.

    True for every processor but a template that says otherwise (BERT's, RoBERTa's and GPT-2's do).
    """
    processor = json.loads(tokenizer_json).get("post_processor") or {}
    processors = processor.get("processors", [processor]) if processor.get("type") == "Sequence" else [processor]
    for proc in processors:
        if proc.get("type") == "TemplateProcessing":
            for piece in proc.get("single", []):
                if next(iter(piece.values())).get("type_id", 0) != 0:
                    return False
    return True


# Texts encoded with and without special tokens to see where a post-processor puts its tokens.
_PROBE_TEXTS = ("a", "Probe text: several words, digits 12 34, and punctuation!")


def _special_tokens_around(tokenizer_json: str, add_special_tokens: bool, num_special: int) -> tuple[int, int] | None:
    """(before, after): the special tokens a post-processor puts around a single sequence's content.

    None when it does anything else to a probe (tokens in the middle, changed content, counts that
    vary): truncation is then left to the backend, which is always right but slower.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    found = set()
    for text in _PROBE_TEXTS:
        content = tokenizer.encode(text, add_special_tokens=False).ids
        whole = tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        before = next((i for i in range(len(whole) - len(content) + 1) if whole[i:i + len(content)] == content), None)
        if before is None or len(whole) - len(content) != num_special:
            return None
        found.add((before, num_special - before))
    return found.pop() if len(found) == 1 else None


def _model_max_length(hf: TokenizerSettings, name: str) -> int:
    model_max = hf.model_max_length
    if model_max is None or model_max >= _PLACEHOLDER_MAX_LENGTH:
        raise ConfigError(
            f"tokenizer.max_length is not set and tokenizer {name!r} has no real model_max_length "
            f"(it says {model_max!r}); set tokenizer.max_length"
        )
    return int(model_max)


def _lowercasing(tokenizer_json: str) -> str:
    """The tokenizer with a Lowercase normalizer first, as sentence-transformers' ``do_lower_case`` sets it
    (unless the normalizer already is, or holds, a Lowercase)."""
    from tokenizers import Tokenizer
    from tokenizers.normalizers import Lowercase, Sequence

    tokenizer = Tokenizer.from_str(tokenizer_json)
    current = tokenizer.normalizer
    if isinstance(current, Lowercase) or (isinstance(current, Sequence) and any(isinstance(n, Lowercase)
                                                                                  for n in current)):
        return tokenizer_json
    rest = list(current) if isinstance(current, Sequence) else [] if current is None else [current]
    tokenizer.normalizer = Sequence([Lowercase(), *rest])
    return tokenizer.to_str()


def _prompt_tokens(tokenizer_json: str, prompt: str, max_length: int | None, add_special_tokens: bool) -> int:
    """The prompt's length in tokens as sentence-transformers counts it for ``include_prompt: false``: the
    prompt tokenized alone (truncated like a text), less a trailing special token (SEP, EOS)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.no_padding()
    if max_length is not None:
        tokenizer.enable_truncation(max_length)
    ids = tokenizer.encode(prompt, add_special_tokens=add_special_tokens).ids
    # transformers' all_special_ids: the special tokens, which the backend marks as such among its added ones.
    special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    return len(ids) - 1 if ids and ids[-1] in special else len(ids)


def _token_id(hf: TokenizerSettings, token: str, key: str, name: str) -> int:
    token_id = hf.backend_tokenizer.token_to_id(token)
    if token_id is None:
        raise ConfigError(f"{key}: {token!r} is not in the vocabulary of {name!r}")
    return token_id


def _pack_spec(config: JobConfig, hf: TokenizerSettings, name: str, tokenizer_json: str) -> TokenizeSpec:
    """The spec of a packed job: whole documents (no truncation, no padding), cut into max_length blocks."""
    opts = config.tokenizer
    block = opts.max_length or _model_max_length(hf, name)
    separator = opts.pack_separator
    if separator == "eos":
        separator = hf.eos_token
        if separator is None:
            raise ConfigError(f"tokenizer.pack_separator: tokenizer {name!r} has no EOS token to end documents "
                              "with; set tokenizer.pack_separator to a token of its vocabulary (e.g. \"[SEP]\") "
                              "or null to join documents with nothing between them")
    separator_id = _token_id(hf, separator, "tokenizer.pack_separator", name) if separator is not None else None
    # Padding of the last partial block: the pad token if there is one, else the separator (mask 0 either way).
    pad_token = opts.pad_token or hf.pad_token
    pad_id = _token_id(hf, pad_token, "tokenizer.pad_token", name) if pad_token else (separator_id or 0)
    processor = hf.backend_tokenizer.post_processor
    num_special = processor.num_special_tokens_to_add(False) if processor and opts.add_special_tokens else 0
    vocab_size = hf.backend_tokenizer.get_vocab_size(with_added_tokens=True)
    return TokenizeSpec(
        tokenizer_json=tokenizer_json, max_length=block, padding="none", padding_side="right", truncation=False,
        truncation_side="right", add_special_tokens=opts.add_special_tokens, pad_id=pad_id, stride=None,
        with_token_type_ids=False, id_dtype="uint16" if vocab_size <= 2**16 else "int32",
        num_special_tokens=num_special, single_type_ids_zero=True, vocab_size=vocab_size,
        pack=True, pack_separator_id=separator_id, pack_remainder=opts.pack_remainder,
    )


def check_pack_stages(config: JobConfig, stages: tuple[str, ...]) -> None:
    """Refuse the embed stage on packed tokens: a block mixes documents, so no embedding of it means anything.

    Raises:
        ConfigError: ``tokenizer.pack`` is set and the embed stage is asked for.
    """
    if config.tokenizer.pack and "embeddings" in stages:
        raise ConfigError("tokenizer.pack: packed blocks are LM pretraining data and have no embeddings; run "
                          "`embedpipe tokenize` (then `embedpipe export` for Megatron), or unset tokenizer.pack")


def load_tokenize_spec(config: JobConfig) -> TokenizeSpec:
    """Load the job's tokenizer and resolve every tokenize option, checking them before any work.

    Raises:
        ConfigError: the tokenizer cannot be loaded, has no pad token while padding is asked for,
            has a placeholder model_max_length and no tokenizer.max_length is set, or the stride is too large.
    """
    opts = config.tokenizer
    name, revision, key = tokenizer_source(config)
    static = None if opts.pack else static_model_files(resolve_alias(config.encoder.model))
    max_chars = None
    if static is not None:  # tokenize as the static model's library does, unless tokenizer.* says otherwise
        defaults = static_tokenizer_defaults(static)
        chars_per_token = defaults.pop("chars_per_token", None)
        opts = opts.model_copy(update={k: v for k, v in defaults.items() if k not in opts.model_fields_set})
        if chars_per_token and opts.truncation and opts.max_length:  # model2vec's cut, before tokenizing
            max_chars = opts.max_length * chars_per_token
        if not config.tokenizer.name:  # a local static model: its tokenizer.json (a subfolder's, for ST)
            name, revision = str(static.tokenizer_file), None
    hf = tokenizer_settings(name, key, revision)
    tokenizer_json = hf.tokenizer_json

    if opts.pack:
        return _pack_spec(config, hf, name, tokenizer_json)
    from pipeline.tokenize.st_config import encoder_settings, model_st_config, tokenizer_is_the_encoders

    st = model_st_config(config)
    prompt = encoder_settings(config.encoder, st).prompt
    max_length = opts.max_length
    if tokenizer_is_the_encoders(config):  # sentence_bert_config.json's settings of the model's own tokenizer
        max_length = st.max_seq_length if max_length is None else max_length  # what ST truncates to
        if st.do_lower_case:
            tokenizer_json = _lowercasing(tokenizer_json)
    if max_length is None and (opts.truncation or opts.padding == "max_length"):
        max_length = _model_max_length(hf, name)

    pad_id = None
    if opts.padding != "none":
        pad_token = opts.pad_token or hf.pad_token
        if pad_token is None:
            eos = f" (e.g. its end-of-text token {hf.eos_token!r})" if hf.eos_token else ""
            raise ConfigError(
                f"tokenizer.pad_token: tokenizer {name!r} has no pad token and tokenizer.padding is "
                f"{opts.padding!r}; set tokenizer.pad_token{eos} or padding: none"
            )
        pad_id = hf.backend_tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ConfigError(f"tokenizer.pad_token: {pad_token!r} is not in the vocabulary of {name!r}")

    processor = hf.backend_tokenizer.post_processor
    num_special = processor.num_special_tokens_to_add(False) if processor and opts.add_special_tokens else 0
    if opts.stride is not None and max_length is not None and opts.stride >= max_length - num_special:
        raise ConfigError(
            f"tokenizer.stride: {opts.stride} must be smaller than max_length {max_length} "
            f"minus the {num_special} special tokens"
        )
    if prompt and opts.stride is not None:
        raise ConfigError("encoder.prompt: a prompt begins only the first window of a chunked text; "
                          "unset tokenizer.stride or the prompt (encoder.prompt: \"\" turns a model's default off)")
    vocab_size = hf.backend_tokenizer.get_vocab_size(with_added_tokens=True)
    return TokenizeSpec(
        prompt=prompt,
        prompt_tokens=_prompt_tokens(tokenizer_json, prompt, max_length, opts.add_special_tokens) if prompt else 0,
        tokenizer_json=tokenizer_json,
        max_length=max_length,
        padding=opts.padding,
        padding_side=opts.padding_side or hf.padding_side,
        truncation=opts.truncation,
        truncation_side=opts.truncation_side or hf.truncation_side,
        add_special_tokens=opts.add_special_tokens,
        pad_id=pad_id,
        stride=opts.stride,
        with_token_type_ids="token_type_ids" in hf.model_input_names,
        id_dtype="uint16" if vocab_size <= 2**16 else "int32",
        num_special_tokens=num_special,
        single_type_ids_zero=_single_type_ids_zero(tokenizer_json),
        special_tokens_around=_special_tokens_around(tokenizer_json, opts.add_special_tokens, num_special),
        vocab_size=vocab_size,
        max_chars=max_chars,
    )
