"""Tokenizers saved by Hugging Face ``transformers`` (a directory), as a tokenizer.json and special tokens.

A directory written by ``save_pretrained`` holds a ``tokenizer.json`` (fast tokenizers), or only a
slow tokenizer's vocabulary: WordPiece's ``vocab.txt`` (BERT), or byte-level BPE's ``vocab.json`` and
``merges.txt`` (GPT-2, RoBERTa). The service stores a tokenizer.json, so a vocabulary-only directory is
converted here the way ``transformers`` converts a slow tokenizer into a fast one; then the service
tokenizes text exactly as ``AutoTokenizer.from_pretrained(directory)`` does.

``tokenizers`` is imported only to convert a vocabulary: the base client install (httpx, numpy) reads
a directory holding a tokenizer.json without it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ._errors import TokenizerDirectoryError

#: the files looked for, in order of preference
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json + merges.txt")
# transformers' special-token attributes, in the order it adds them to the vocabulary
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# the service's roles, each with the attributes that may name its token (first found wins)
_ROLE_KEYS = {
    "cls": ("cls_token", "bos_token"),
    "sep": ("sep_token", "eos_token"),
    "pad": ("pad_token",),
    "mask": ("mask_token",),
    "unk": ("unk_token",),
}
# the slow tokenizers' own defaults, for a directory whose config leaves a token out
_BERT_DEFAULTS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                  "mask_token": "[MASK]"}  # fmt: skip
_ROBERTA_DEFAULTS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
                     "pad_token": "<pad>", "cls_token": "<s>", "mask_token": "<mask>"}  # fmt: skip
_GPT2_DEFAULTS = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}


def read_tokenizer_dir(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The tokenizer.json (a dict) and the special tokens (``{role: token}``) of a transformers directory.

    Raises :class:`TokenizerDirectoryError` when the directory holds no usable tokenizer files.
    """
    root = Path(path)
    config = _read_config(root)
    if (root / "tokenizer.json").is_file():
        spec = _read_json(root / "tokenizer.json")
        specials = _roles(config, {})
        specials.update(_post_processor_roles(spec))
        return spec, specials
    if (root / "vocab.txt").is_file():
        defaults = _BERT_DEFAULTS
        build = _wordpiece
    elif (root / "vocab.json").is_file() and (root / "merges.txt").is_file():
        gpt2 = str(config.get("tokenizer_class") or "").startswith("GPT2")
        defaults = _GPT2_DEFAULTS if gpt2 else _ROBERTA_DEFAULTS
        build = _byte_level_bpe
    else:
        found = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        raise TokenizerDirectoryError(
            f"{root}: no tokenizer files: looked for {', '.join(TOKENIZER_FILES)} (in that order); "
            f"found {', '.join(found) if found else 'nothing'}"
        )
    tokens = {**defaults, **{k: v for k, v in config.items() if k in _SPECIAL_KEYS and v is not None}}
    tokenizers = _import_tokenizers()
    tok = build(tokenizers, root, config, tokens)
    _add_tokens(tokenizers, tok, config, tokens)
    family = "wordpiece" if build is _wordpiece else "gpt2" if defaults is _GPT2_DEFAULTS else "roberta"
    _post_processor(tokenizers, tok, tokens, family, config)
    return json.loads(tok.to_str()), _roles(config, defaults)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TokenizerDirectoryError(f"{path}: not readable JSON: {exc}") from None


def _read_config(root: Path) -> dict[str, Any]:
    """tokenizer_config.json, then special_tokens_map.json over it (transformers lets the map win)."""
    if not root.is_dir():
        raise TokenizerDirectoryError(f"{root}: not a directory")
    config: dict[str, Any] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (root / name).is_file():
            found = _read_json(root / name)
            if not isinstance(found, dict):
                raise TokenizerDirectoryError(f"{root / name}: not a JSON object")
            config.update(found)
    return config


def _content(value: Any) -> str | None:
    """A special token's text: a plain string, or an AddedToken written as ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _roles(config: dict[str, Any], defaults: dict[str, str]) -> dict[str, str]:
    """The service's roles from transformers' attributes: bos/eos stand in for a missing cls/sep."""
    roles: dict[str, str] = {}
    for role, keys in _ROLE_KEYS.items():
        token = next((t for k in keys if (t := _content(config.get(k, defaults.get(k)))) is not None), None)
        if token is not None:
            roles[role] = token
    return roles


def _post_processor_roles(spec: dict[str, Any]) -> dict[str, str]:
    """The tokens a tokenizer.json's post-processor puts around a single sequence: what transformers adds."""
    post = spec.get("post_processor") or {}
    kind = post.get("type")
    if kind in ("RobertaProcessing", "BertProcessing"):  # cls and sep as [token, id]
        return {r: post[r][0] for r in ("cls", "sep") if isinstance(post.get(r), list) and post[r]}
    if kind == "Sequence":
        found: dict[str, str] = {}
        for step in post.get("processors") or []:
            found.update(_post_processor_roles({"post_processor": step}))
        return found
    if kind != "TemplateProcessing":
        return {}
    pieces = post.get("single") or []
    specials = [p.get("SpecialToken", {}).get("id") if isinstance(p, dict) else None for p in pieces]
    roles: dict[str, str] = {}
    if len(specials) > 1 and specials[0] is not None:
        roles["cls"] = specials[0]
    if len(specials) > 1 and specials[-1] is not None:
        roles["sep"] = specials[-1]
    return roles


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise TokenizerDirectoryError(
            "converting a transformers vocabulary (vocab.txt, or vocab.json + merges.txt) needs the "
            "'tokenizers' package: pip install 'maskserve[corpora]'"
        ) from None
    return tokenizers


def _flag(config: dict[str, Any], key: str, default: Any) -> Any:
    value = config.get(key)
    return default if value is None else value


def _wordpiece(tk: Any, root: Path, config: dict[str, Any], tokens: dict[str, Any]) -> Any:
    """BERT's WordPiece, as transformers' ``BertConverter`` builds it from a slow BertTokenizer."""
    with open(root / "vocab.txt", encoding="utf-8") as f:  # one token a line; the line number is its id
        vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    unk = _content(tokens["unk_token"])
    tok = tk.Tokenizer(tk.models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
    tok.normalizer = tk.normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(_flag(config, "tokenize_chinese_chars", True)),
        strip_accents=config.get("strip_accents"),  # None: follow lowercase, as the original BERT
        lowercase=bool(_flag(config, "do_lower_case", True)),
    )
    tok.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
    tok.decoder = tk.decoders.WordPiece(prefix="##")
    return tok


def _byte_level_bpe(tk: Any, root: Path, config: dict[str, Any], tokens: dict[str, Any]) -> Any:
    """GPT-2's and RoBERTa's byte-level BPE, as transformers' ``RobertaConverter``/``GPT2Converter`` build it."""
    try:
        vocab, merges = tk.models.BPE.read_file(str(root / "vocab.json"), str(root / "merges.txt"))
    except Exception as exc:  # noqa: BLE001 - the library's parse errors are plain Exceptions
        raise TokenizerDirectoryError(f"{root}: vocab.json / merges.txt not readable: {exc}") from None
    tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                     end_of_word_suffix="", fuse_unk=False))  # fmt: skip
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=bool(_flag(config, "add_prefix_space", False)))
    tok.decoder = tk.decoders.ByteLevel()
    return tok


def _added_token(tk: Any, value: Any, special: bool) -> Any:
    """An AddedToken from a string or a saved ``{"content", "lstrip", "rstrip", ...}`` dict."""
    if not isinstance(value, dict):
        return tk.AddedToken(value, special=special, normalized=not special)
    flags = {k: bool(value[k]) for k in ("lstrip", "rstrip", "single_word", "normalized") if k in value}
    flags.setdefault("normalized", not special)
    return tk.AddedToken(value["content"], special=bool(value.get("special", special)), **flags)


def _add_tokens(tk: Any, tok: Any, config: dict[str, Any], tokens: dict[str, Any]) -> None:
    """Register the added tokens as transformers does: those saved with their ids first, in id order, then
    the special tokens (in transformers' attribute order), then the additional special tokens."""
    saved = config.get("added_tokens_decoder") or {}
    for _, value in sorted(saved.items(), key=lambda kv: int(kv[0])):
        added = _added_token(tk, value, special=bool(value.get("special", False)))
        (tok.add_special_tokens if added.special else tok.add_tokens)([added])
    extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
    extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
    for value in [tokens[k] for k in _SPECIAL_KEYS if k in tokens] + extra:
        if _content(value) is not None:
            tok.add_special_tokens([_added_token(tk, value, special=True)])


def _post_processor(tk: Any, tok: Any, tokens: dict[str, Any], family: str, config: dict[str, Any]) -> None:
    """The post-processor transformers' converter sets (kept with the tokenizer.json; the service adds
    cls/sep itself when it packs sequences)."""
    def named(key: str) -> tuple[str, int] | None:
        text = _content(tokens.get(key))
        token_id = tok.token_to_id(text) if text is not None else None
        return None if token_id is None else (text, token_id)

    cls, sep = named("cls_token"), named("sep_token")
    if family == "wordpiece" and cls and sep:
        tok.post_processor = tk.processors.TemplateProcessing(
            single=f"{cls[0]}:0 $A:0 {sep[0]}:0", pair=f"{cls[0]}:0 $A:0 {sep[0]}:0 $B:1 {sep[0]}:1",
            special_tokens=[cls, sep],
        )  # fmt: skip
    elif family == "roberta" and cls and sep:
        tok.post_processor = tk.processors.RobertaProcessing(
            sep, cls, trim_offsets=bool(_flag(config, "trim_offsets", True)),
            add_prefix_space=bool(_flag(config, "add_prefix_space", False)),
        )  # fmt: skip
    elif family == "gpt2":  # GPT-2 adds no tokens around a sequence
        tok.post_processor = tk.processors.ByteLevel(trim_offsets=False)
