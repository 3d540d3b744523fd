"""A sentence-transformers model directory's own settings, read from its JSON files (no torch, no weights).

What ``SentenceTransformer(dir)`` runs is a chain of modules listed in ``modules.json``: a ``Transformer``
(the Hugging Face model embedpipe loads itself), ``Pooling`` (``1_Pooling/config.json``), any ``Dense``
projections (weights in the module's ``model.safetensors``), and ``Normalize``. Hub models name the module
types either the old way (``sentence_transformers.models.Pooling``) or by the module paths of
sentence-transformers 5/6 (``sentence_transformers.sentence_transformer.modules.pooling.Pooling``,
``sentence_transformers.base.modules.dense.Dense``...): only the class name counts here. Prompts and the
default prompt come from ``config_sentence_transformers.json``; ``max_seq_length`` and ``do_lower_case``
(the old format) from ``sentence_bert_config.json`` (the new format saves it as the tokenizer's ``model_max_length``, which the
tokenizer already carries). A directory without ``modules.json`` is a plain Hugging Face model: no settings.

:func:`encoder_settings` resolves ``encoder.pooling: auto`` / ``normalize: auto`` and the prompt against
them, as ``SentenceTransformer.encode`` would; :func:`resolve_job_config` writes the resolved values into
the job config, whose dump is what the manifest records and the config hash is computed from.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError
from pipeline.hub import locate_model, resolve_alias
from pipeline.tokenize.static_models import static_model_files, static_tokenizer_defaults

if TYPE_CHECKING:
    from pipeline.config import EncoderConfig, JobConfig

log = logging.getLogger("embedpipe")

# sentence-transformers' pooling mode names -> embedpipe's encoder.pooling values.
POOLING_NAMES = {"cls": "cls", "mean": "mean", "max": "max", "weightedmean": "weightedmean", "lasttoken": "last"}
# The legacy boolean keys of 1_Pooling/config.json, in the order ST concatenates their outputs.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken",
}
# Dense activations allowed (torch.nn classes built without arguments; nothing else is imported by name).
ACTIVATIONS = ("Identity", "Tanh", "ReLU", "GELU", "Sigmoid", "SiLU")
_DEFAULT_ACTIVATION = "torch.nn.modules.activation.Tanh"  # ST's Dense default when the config names none
_MODULES = ("Transformer", "Pooling", "Dense", "Normalize", "Dropout")


@dataclass(frozen=True)
class DenseLayer:
    """One ``Dense`` module: ``activation(x @ W.T + b)`` with W (out, in) from ``weights``."""

    weights: str  # the module's model.safetensors (keys linear.weight, linear.bias)
    in_features: int
    out_features: int
    bias: bool
    activation: str  # a name in ACTIVATIONS


@dataclass(frozen=True)
class STConfig:
    """What a model directory's sentence-transformers files say (all defaults: not an ST model)."""

    is_sentence_transformer: bool = False
    pooling: str | None = None  # embedpipe's name (mean, cls, last, max, weightedmean); None: no Pooling module
    include_prompt: bool = True
    dense: tuple[DenseLayer, ...] = ()
    normalize: bool = False  # a Normalize module ends the chain
    max_seq_length: int | None = None
    do_lower_case: bool = False  # sentence_bert_config.json: the tokenizer lowercases first (prompt and text)
    prompts: tuple[tuple[str, str], ...] = ()
    default_prompt_name: str | None = None

    @property
    def prompt_dict(self) -> dict[str, str]:
        return dict(self.prompts)


@dataclass(frozen=True)
class EncoderSettings:
    """The encoder settings of a job resolved against its model (what the embed stage computes)."""

    pooling: str
    normalize: bool
    prompt: str | None  # the literal prefix added to every text before tokenization; None: none
    prompt_name: str | None  # the model's name for it, when it came from the model's prompts
    include_prompt: bool  # False: the prompt's tokens are left out of pooling
    dense: tuple[DenseLayer, ...]
    overrides: tuple[str, ...] = ()  # messages: explicit settings that differ from the model's


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"encoder.model: cannot read {path}: {exc}") from None


def _pooling_mode(config: dict[str, Any], path: Path) -> str:
    """The single ST pooling mode of a Pooling config, new (``pooling_mode``) or legacy (booleans) format."""
    mode = config.get("pooling_mode")
    if mode is None:
        active = [name for key, name in _LEGACY_POOLING_KEYS.items() if config.get(key)]
        mode = active or ["mean"]  # ST's default when no legacy key is true
    if isinstance(mode, list | tuple):
        if len(mode) != 1:
            raise ConfigError(f"encoder.model: {path} concatenates pooling modes {list(mode)}; embedpipe pools "
                              "one way (set encoder.pooling to use one of them)")
        mode = mode[0]
    if mode not in POOLING_NAMES:
        raise ConfigError(f"encoder.model: {path} pools by {mode!r}; embedpipe supports "
                          f"{', '.join(POOLING_NAMES)} (set encoder.pooling to choose one)")
    return POOLING_NAMES[mode]


def _activation(name: str, path: Path) -> str:
    # ST writes the class's full name (torch.nn.modules.activation.Tanh, torch.nn.modules.linear.Identity).
    short = name.rsplit(".", 1)[-1]
    if not name.startswith("torch.nn.") or short not in ACTIVATIONS:
        raise ConfigError(f"encoder.model: {path}: Dense activation {name!r} is not one of "
                          f"{', '.join('torch.nn.' + a for a in ACTIVATIONS)}")
    return short


def _dense(module_dir: Path) -> DenseLayer:
    path = module_dir / "config.json"
    config = _read_json(path) or {}
    if config.get("use_residual"):
        raise ConfigError(f"encoder.model: {path}: a Dense module with use_residual is not supported")
    for key in ("module_input_name", "module_output_name"):
        if config.get(key, "sentence_embedding") != "sentence_embedding":
            raise ConfigError(f"encoder.model: {path}: a Dense module on {config[key]!r} is not supported")
    weights = module_dir / "model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"encoder.model: {module_dir} holds no model.safetensors (pickle weights are refused)")
    return DenseLayer(str(weights), int(config["in_features"]), int(config["out_features"]),
                      bool(config.get("bias", True)),
                      _activation(config.get("activation_function") or _DEFAULT_ACTIVATION, path))


def read_st_config(model_dir: str | Path) -> STConfig:
    """Read a model directory's sentence-transformers configuration (see the module docstring).

    Raises:
        ConfigError: a file cannot be read, or the module chain holds something embedpipe cannot run the way
            sentence-transformers does (another module type, several pooling modes, a Dense module after Normalize, a Transformer outside the directory's root).
    """
    model_dir = Path(model_dir)
    static = static_model_files(model_dir)
    if static is not None:  # a token table and its mean (pipeline.encode.static), normalized as the model says
        return STConfig(is_sentence_transformer=static.kind == "sentence_transformers", pooling="mean",
                        normalize=static.normalize)
    modules = _read_json(model_dir / "modules.json")
    if not modules:
        return STConfig()
    pooling, include_prompt, dense, normalize = None, True, [], False
    for position, module in enumerate(sorted(modules, key=lambda m: m.get("idx", 0))):
        kind = str(module.get("type", ""))
        name = kind.rsplit(".", 1)[-1]
        where = model_dir / module.get("path", "")
        if not kind.startswith("sentence_transformers.") or name not in _MODULES:
            raise ConfigError(f"encoder.model: {model_dir}/modules.json: module {kind!r} is not one embedpipe "
                              f"runs (it runs {', '.join(_MODULES)})")
        if (name == "Transformer") != (position == 0):
            raise ConfigError(f"encoder.model: {model_dir}/modules.json: the Transformer must come first, alone")
        if normalize and name == "Dense":
            raise ConfigError(f"encoder.model: {model_dir}/modules.json: a Dense module after Normalize")
        if name == "Transformer" and module.get("path", "") != "":
            raise ConfigError(f"encoder.model: {model_dir}/modules.json: the Transformer lives in "
                              f"{module['path']!r}, not the directory's root; point encoder.model at it")
        if name == "Pooling":
            config = _read_json(where / "config.json") or {}
            pooling = _pooling_mode(config, where / "config.json")
            include_prompt = bool(config.get("include_prompt", True))
        elif name == "Dense":
            dense.append(_dense(where))
        elif name == "Normalize":
            normalize = True
    bert = _read_json(model_dir / "sentence_bert_config.json") or {}
    st = _read_json(model_dir / "config_sentence_transformers.json") or {}
    prompts = {str(k): str(v) for k, v in (st.get("prompts") or {}).items()}
    default = st.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise ConfigError(f"encoder.model: {model_dir}/config_sentence_transformers.json: default_prompt_name "
                          f"{default!r} is not one of its prompts ({', '.join(prompts) or 'none'})")
    max_seq = bert.get("max_seq_length")
    return STConfig(
        is_sentence_transformer=True, pooling=pooling, include_prompt=include_prompt, dense=tuple(dense),
        normalize=normalize, max_seq_length=int(max_seq) if max_seq else None,
        do_lower_case=bool(bert.get("do_lower_case", False)),
        prompts=tuple(sorted(prompts.items())), default_prompt_name=default,
    )


def resolve_prompt(st: STConfig, prompt: str | None, prompt_name: str | None) -> tuple[str | None, str | None]:
    """(prefix, its name) as ``SentenceTransformer.encode(prompt=..., prompt_name=...)`` resolves them:
    ``prompt`` wins over ``prompt_name``; neither: the model's default prompt, if it names one. An empty
    prefix is no prompt (so ``encoder.prompt: ""`` turns a model's default prompt off).

    Raises:
        ConfigError: ``prompt_name`` is not one of the model's prompts.
    """
    prompts = st.prompt_dict
    name = None
    if prompt is None:
        if prompt_name is not None:
            if prompt_name not in prompts:
                raise ConfigError(f"encoder.prompt_name: {prompt_name!r} is not one of the model's prompts "
                                  f"({', '.join(prompts) or 'it has none'}); use encoder.prompt for a literal prefix")
            name, prompt = prompt_name, prompts[prompt_name]
        elif st.default_prompt_name is not None:
            name, prompt = st.default_prompt_name, prompts[st.default_prompt_name]
    return (prompt or None), (name if prompt else None)


def encoder_settings(encoder: EncoderConfig, st: STConfig) -> EncoderSettings:
    """The job's encoder settings resolved against the model's: ``auto`` is the model's (else mean / false),
    an explicit value wins (and is listed in ``overrides`` when it differs from the model's)."""
    overrides = []
    model_pooling = st.pooling or "mean"
    pooling = model_pooling if encoder.pooling == "auto" else encoder.pooling
    if st.pooling is not None and pooling != st.pooling:
        overrides.append(f"encoder.pooling: {pooling!r} overrides the model's {st.pooling!r}")
    per_token = pooling == "none"
    # Dense and Normalize act on the pooled vector: per-token output (pooling none) is the Transformer's.
    model_normalize = st.normalize and not per_token
    normalize = model_normalize if encoder.normalize == "auto" else bool(encoder.normalize)
    if st.is_sentence_transformer and encoder.normalize != "auto" and normalize != model_normalize:
        overrides.append(f"encoder.normalize: {normalize} overrides the model's {model_normalize}")
    prompt, prompt_name = resolve_prompt(st, encoder.prompt, encoder.prompt_name)
    return EncoderSettings(pooling=pooling, normalize=normalize, prompt=prompt, prompt_name=prompt_name,
                           include_prompt=st.include_prompt, dense=() if per_token else st.dense,
                           overrides=tuple(overrides))


def model_st_config(config: JobConfig) -> STConfig:
    """The ST configuration of the job's encoder model; none when the model cannot be found here (the embed
    stage's own checks then say why, and a tokenize-only job does not need it)."""
    local = Path(resolve_alias(config.encoder.model))
    if local.is_dir():  # an alias or a directory: found without importing torch (the tokenizer's path has none)
        return read_st_config(local)
    enc = config.encoder
    try:  # a hub id at the job's pinned commit (its Dense weights too: read_st_config checks them)
        model_dir = locate_model(enc.model, enc.revision, allow_pickle=enc.allow_pickle,
                                 trust_remote_code=enc.trust_remote_code).path
    except ConfigError:
        return STConfig()
    return read_st_config(model_dir)


def tokenizer_is_the_encoders(config: JobConfig) -> bool:
    """Whether the job tokenizes with the encoder's own tokenizer (so the model's max_seq_length applies)."""
    return config.tokenizer.name in (None, config.encoder.model)


def resolve_job_config(config: JobConfig) -> JobConfig:
    """The job config with the model's settings written in: pooling and normalize resolved (never ``auto``),
    the prompt as its literal prefix (with the model's name for it), and ``tokenizer.max_length`` from
    ``max_seq_length`` when unset. Explicit settings that override the model's are logged (warning).

    The manifest records this config, and the config hash is computed from it, not from the raw one:
    the hash must change exactly when the vectors can. A job that never named a pooling (the old default
    ``mean``) on a model without ST configuration resolves to ``mean`` / ``false`` and keeps the hash its
    output has; the same config on a model that asks for CLS + Normalize gets other vectors, and so
    another hash (its old output is refused rather than mixed); and an ``auto`` in the hash would say
    nothing about which pooling ran.
    """
    if config.tokenizer.pack:  # packed LM pretraining blocks: no encoder, no prompt
        return config
    st = model_st_config(config)
    settings = encoder_settings(config.encoder, st)
    for message in settings.overrides:
        log.warning(message)
    if settings.prompt:
        log.info("encoder: every text is prefixed with the prompt %r%s", settings.prompt,
                 f" (the model's {settings.prompt_name!r})" if settings.prompt_name else "")
    encoder = config.encoder.model_copy(update={
        "pooling": settings.pooling, "normalize": settings.normalize,
        "prompt": settings.prompt if settings.prompt is not None else config.encoder.prompt,
        "prompt_name": settings.prompt_name or config.encoder.prompt_name,
    })
    tokenizer = config.tokenizer
    if tokenizer.max_length is None and st.max_seq_length and tokenizer_is_the_encoders(config):
        tokenizer = tokenizer.model_copy(update={"max_length": st.max_seq_length})
    tokenizer = _with_static_defaults(tokenizer, config.encoder.model)
    return config.model_copy(update={"encoder": encoder, "tokenizer": tokenizer})


def _with_static_defaults(tokenizer: Any, model: str) -> Any:
    """A static model's tokenize settings written into the unset ``tokenizer.*`` keys: the stage uses them
    (:func:`pipeline.tokenize.loading.load_tokenize_spec`), so the hash must say them, or an explicit
    ``add_special_tokens: true`` and an unset one (false for a static model) would hash alike."""
    static = static_model_files(resolve_alias(model))
    if static is None:
        return tokenizer
    defaults = static_tokenizer_defaults(static)
    defaults.pop("chars_per_token", None)  # follows from the model's files, which the hash covers
    return tokenizer.model_copy(update={k: v for k, v in defaults.items() if k not in tokenizer.model_fields_set})
