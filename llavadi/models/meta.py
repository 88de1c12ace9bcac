"""`llavadi.json`: how a saved model is prompted, written beside its HF files.

Keys: `template` (conversation template name), `system` (system prompt; null = the template's
default), `n_image_tokens` (image placeholder tokens per image, checked against the model's
vision tower on reading), `stage` (the training stage that produced it) and optionally
`pad_to_square`, and `tokenizer_chat_template` (the language model's own chat template, when the
saved files carry llavadi's rendering instead). A directory without the file is a plain HF LLaVA model: prompted with the
LLaVA-1.5 defaults (`vicuna_v1`, LLaVA's system prompt).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from llavadi.atomic import write_json_atomic
from llavadi.models.image_tokens import n_image_tokens

META_FILE = "llavadi.json"
DEFAULT_TEMPLATE = "vicuna_v1"
TOKENIZER_CHAT_TEMPLATE = "tokenizer_chat_template"


def meta_path(model_dir: str | os.PathLike, revision: str | None = None) -> Path | None:
    """Where a model's llavadi.json is: beside a local model, or in a hub model's snapshot (None: it has none)."""
    from llavadi.models.hub import hub_file, is_hub_id

    path = Path(model_dir) / META_FILE
    if os.path.isdir(model_dir) or not is_hub_id(str(model_dir)):
        return path if path.is_file() else None
    try:
        found = hub_file(str(model_dir), META_FILE, revision)
    except FileNotFoundError as e:  # offline, and the hub cache does not know whether the model has one
        warnings.warn(f"{e}; {model_dir} is prompted with the defaults (template {DEFAULT_TEMPLATE}, LLaVA's "
                      f"system prompt) unless the recipe says otherwise: load it once online to read its {META_FILE}",
                      stacklevel=2)
        return None
    return Path(found) if found else None


def read_model_meta(model_dir: str | os.PathLike, config=None, revision: str | None = None) -> dict:
    """The llavadi.json of a saved model (a folder, or a hub id at `revision`), as written ({} when absent).

    Malformed JSON names the file and line. With the model's `config`, a recorded
    `n_image_tokens` must match what its vision tower gives.
    """
    path = meta_path(model_dir, revision)
    if path is None:
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(meta).__name__}")
    if config is not None and meta.get("n_image_tokens") is not None:
        check_n_image_tokens(int(meta["n_image_tokens"]), config, where=str(path))
    return meta


def check_n_image_tokens(n: int, config, where: str) -> None:
    """Raise unless `n` image tokens per image is what the model's vision tower gives."""
    expected = n_image_tokens(config)
    if expected is not None and n != expected:
        raise ValueError(
            f"{where}: n_image_tokens {n} does not match the model's vision tower, which gives {expected} "
            f"tokens per image (image_size/patch_size, strategy {config.vision_feature_select_strategy!r}); "
            f"fix or delete n_image_tokens in {META_FILE}"
        )


def write_model_meta(model_dir: str | os.PathLike, meta: dict, config=None) -> str:
    """Write `meta` as llavadi.json in `model_dir` atomically (temp file, fsync, rename); returns its path.

    With the model's `config`, `n_image_tokens` is set from its vision tower.
    """
    meta = dict(meta)
    if config is not None and n_image_tokens(config) is not None:  # None: the count depends on the image
        meta["n_image_tokens"] = n_image_tokens(config)
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, META_FILE)
    write_json_atomic(path, meta)
    return path
