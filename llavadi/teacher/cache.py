"""The offline teacher: a top-k cache written by `llavadi cache-teacher`, read by sample id at training.

``CachedTeacher.view(batch, needs)`` is the cache's side of the teacher interface (the online side
is ``llavadi.teacher.online.OnlineTeacher``): for each sample of a collated batch it finds the
cache entry by the batch's ``sample_ids`` (whatever the shuffling, batch size, accumulation or
process count), checks that the entry was produced by this very sample (hash of its token ids,
token types and image bytes), and rebuilds (B, T, k) top-k ids and log-probs (and, when cached, the
(B, T, H) last hidden states). Rows that were not cached hold NaN log-probs and are never read: a
term selecting one is an error naming the sample and the position.

What a cache can serve is decided before training (``check_terms``): logit terms with a sparse
form (``forward_kl``, ``jsd``) on the cached prediction positions, and hidden-state terms on the
teacher's last hidden state when it was cached (``--hidden``). Any other term is refused, named.

A cache stores the teacher's token ids, at the teacher's positions in its own rendering of each
sample, and the teacher's tokenizer, config and image processor (``teacher/``), which give the
tokenizer pair (``llavadi.data.tokenizer_pair``):
- the same tokenizer up to additions: the student reads the cache through the fixed id map: sample
  digests are compared in the teacher's ids, and the logit terms map the cached top-k ids when they
  read them (ids the student lacks join the missing mass, ``llavadi.distill.vocab``);
- different tokenizers: the dataset renders every sample the teacher's way too (a teacher view from
  ``teacher/``, as with an online teacher) and pairs the answer tokens of the two views; the cached
  entry is checked against the teacher view's tokens, and ``uld`` / ``gold`` (and ``hidden_mse`` on
  paired spans, from ``--hidden``) read the teacher's rows of the pairs: the online computation with
  the teacher's log-probs restricted to its top-k.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from llavadi.data.token_types import TYPE_GROUPS
from llavadi.data.tokenizer_pair import ADDITIONS, DIFFERENT, IDENTICAL, TokenizerPair
from llavadi.distill.compat import tokenizer_pair
from llavadi.distill.cross_vocab import MatchedTokens
from llavadi.distill.selection import Predictions, Selection, Tokens
from llavadi.distill.view import ModelView, Needs
from llavadi.distill.vocab import SharedVocab
from llavadi.identity import folder_identity
from llavadi.teacher.cache_format import (
    TEACHER_DIR,
    VALUE_DTYPES,
    CacheError,
    CacheReader,
    ImageDigests,
    digest_difference,
    directory_fingerprint,
    sample_digest,
    tokenizer_digest,
)

Tensor = torch.Tensor
SHOWN_SAMPLES = 10
TEACHER_PREFIX = "teacher_"  # batch keys of the teacher's own rendering of the samples (a teacher view)
ONLINE_HINT = "give the teacher as a model (teacher.path) without `cache` for this stage"


@dataclass(frozen=True)
class CachePlan:
    """Which positions a cache holds: prediction rows of logit groups, token rows of hidden groups."""

    logit_groups: tuple[str, ...]
    hidden_groups: tuple[str, ...]

    def logit_selections(self) -> list[Selection]:
        """The logit rows' selections."""
        return [Predictions(g) for g in self.logit_groups]

    def hidden_selections(self) -> list[Selection]:
        """The hidden rows' selections."""
        return [Tokens(g) for g in self.hidden_groups]


def _covered(group: str, cached: tuple[str, ...]) -> bool:
    have = {t for g in cached for t in TYPE_GROUPS[g]}
    return set(TYPE_GROUPS[group]) <= have


def _reads_only_last_hidden(needs: Needs, n_hidden_states: int) -> bool:
    last = n_hidden_states - 1
    layers_are_last = all(i % n_hidden_states == last for i in needs.hidden_layers)
    return layers_are_last and not needs.attention_layers and not needs.image_features


def term_requirement(term, n_hidden_states: int) -> tuple[str, str]:
    """("logit", group) or ("hidden", group): what a term reads from a cache; an error naming it otherwise."""
    sel = term.selection()
    if term.is_logit_term or getattr(term, "reads_teacher_logits", False):  # dense-only ones were refused up front
        return "logit", sel.group
    if isinstance(sel, Tokens) and _reads_only_last_hidden(term.teacher_needs(), n_hidden_states):
        return "hidden", sel.group
    raise CacheError(f"term {term.label!r} reads teacher states a top-k cache cannot hold (it stores top-k logits "
                     f"and, with --hidden, the last hidden state of the tokens a token-alignment term reads); "
                     f"{ONLINE_HINT}")


def plan_for(objective, n_hidden_states: int, hidden: bool) -> CachePlan:
    """The positions to cache for an objective's terms; refuses (naming the term) what a cache cannot serve."""
    logit, states = [], []
    for term in objective.terms:
        kind, group = term_requirement(term, n_hidden_states)
        if kind == "hidden" and not hidden:
            raise CacheError(f"term {term.label!r} reads the teacher's hidden states: cache them with --hidden "
                             f"(2 x hidden width bytes per token in fp16), or {ONLINE_HINT}")
        target = logit if kind == "logit" else states
        if group not in target:
            target.append(group)
    if not logit and not states:
        raise CacheError("the stage has no distillation term that reads the teacher: nothing to cache")
    return CachePlan(tuple(logit), tuple(states))


def check_terms(objective, manifest: dict, where: str) -> None:
    """Every term of the objective is served by the cache (before training starts), naming the one that is not."""
    logit_groups, hidden_groups = tuple(manifest["logit_groups"]), tuple(manifest["hidden_groups"])
    for term in objective.terms:
        kind, group = term_requirement(term, manifest["teacher_layers"] + 1)
        cached = logit_groups if kind == "logit" else hidden_groups
        if not _covered(group, cached):
            what = "prediction positions" if kind == "logit" else "hidden states"
            raise CacheError(f"{where}: term {term.label!r} reads teacher {what} of the {group!r} tokens; the cache "
                             f"holds them for {list(cached) or 'no'} tokens (rewrite it with this stage's terms, or "
                             f"{ONLINE_HINT})")


def vocab_size(config) -> int:
    """Rows of a LLaVA's LM head, from its config (the logit terms compare distributions over them)."""
    return int(config.get_text_config().vocab_size)


def image_layout(image_processor) -> dict:
    """The image preprocessing settings that decide the pixels a model sees."""
    keys = ("crop_size", "size", "image_mean", "image_std", "do_normalize", "do_center_crop", "resample")
    return {k: str(getattr(image_processor, k, None)) for k in keys}


def check_stage(reader: CacheReader, data, student, where: str, pair: TokenizerPair | None = None) -> None:
    """The cache was written for this stage's rendering of the data and a student of the same layout.

    With a tokenizer `pair` (the cache's teacher and the student, tokenizers not identical), the
    cache's tokenizer and vocabulary size are the teacher's; with different tokenizers the data is
    rendered the teacher's way from the cache's own files (its image tokens and layout)."""
    m = reader.manifest
    wanted = {"template": data.template, "system": data.system, "max_length": data.max_length,
              "vocab_size": pair.teacher_rows if pair else vocab_size(student.model.config)}
    if pair is None or pair.kind != DIFFERENT:  # the student's own rendering is read in the teacher's ids
        wanted.update(n_image_tokens=student.n_image_tokens, image_layout=image_layout(student.image_processor))
    differ = [f"{k}: cache {m.get(k)!r}, here {v!r}" for k, v in wanted.items() if m.get(k) != v]
    if pair is None and m.get("tokenizer") != tokenizer_digest(student.tokenizer):
        differ.append("tokenizer: the cache was written with another vocabulary")
    if differ:
        raise CacheError(f"{where}: teacher cache {reader.directory} was written for another setting: "
                         + "; ".join(differ) + ". Rewrite it with `llavadi cache-teacher` for this recipe")


def check_teacher(reader: CacheReader, model_dir: str, where: str) -> None:
    """When the recipe also names the teacher's directory, the cache must come from that teacher."""
    if reader.manifest["teacher"].get("files") == folder_identity(model_dir):
        return  # the very files the cache was written from (same sizes and times): no need to hash gigabytes
    cached = reader.manifest["teacher"]["fingerprint"]
    here = directory_fingerprint(model_dir)
    differ = [part for part in ("config", "weights") if cached.get(part) != here.get(part)]
    if differ:
        raise CacheError(f"{where}: teacher cache {reader.directory} was written by another teacher than {model_dir} "
                         f"(its {' and '.join(differ)} differ); rewrite the cache with this teacher")


# image files' hashes, shared by the check before training and the per-batch check (an unchanged file is read once)
IMAGE_DIGESTS = ImageDigests()


def teacher_ids(reader: CacheReader, ids: list[int]) -> list[int]:
    """A sample's student token ids in the cache's (the teacher's) ids: through the map of a pair of kind `additions`
    (a teacher view's ids, with different tokenizers, are the teacher's already)."""
    pair = getattr(reader, "tokenizer_pair", None)
    if pair is None or pair.kind != ADDITIONS or not ids:
        return list(ids)
    return pair.student_to_teacher()[torch.tensor(ids, dtype=torch.long)].tolist()  # -1: never equals a digest


def check_samples(reader: CacheReader, sample_ids: list[str], encoded: list, where: str,
                  images: list | None = None) -> None:
    """Every sample is cached and its token ids, types and image bytes (`images`: each sample's image path,
    or a tuple of paths for a multi-image sample)
    are those the entry was produced from (before training)."""
    missing = [sid for sid in sample_ids if sid not in reader.index]
    if missing:
        shown = ", ".join(repr(s) for s in missing[:SHOWN_SAMPLES]) + (" ..." if len(missing) > SHOWN_SAMPLES else "")
        raise CacheError(f"{where}: {len(missing)} sample(s) are not in teacher cache {reader.directory} ({shown}); "
                         "run `llavadi cache-teacher` again, it adds only what is missing")
    stale = []
    for i, (sid, enc) in enumerate(zip(sample_ids, encoded)):
        cached = reader.index[sid]["digest"]
        # hashing the images here reads each file once more than decoding it did; the per-batch check
        # during training then finds them hashed already (same size and mtime)
        image = IMAGE_DIGESTS(images[i]) if images is not None else cached.get("image", "")
        differ = digest_difference(cached, sample_digest(teacher_ids(reader, enc.input_ids), enc.token_types, image))
        if differ:
            stale.append((sid, differ))
    if stale:
        raise stale_error(reader, *stale[0], n_more=len(stale) - 1,
                          others=[sid for sid, _ in stale[1:SHOWN_SAMPLES]])


def stale_error(reader: CacheReader, sample_id: str, differ: list[str], n_more: int = 0,
                others: list[str] = ()) -> CacheError:
    """The error of an entry produced by another version of its sample (and how many more there are)."""
    more = f" ({n_more} more changed: {', '.join(map(repr, others))}{' ...' if n_more > len(others) else ''})" \
        if n_more else ""
    return CacheError(f"teacher cache {reader.directory}: sample {sample_id!r} changed since it was cached: "
                      f"{'; '.join(differ)}{more}. Rerun `llavadi cache-teacher` (it recomputes only changed samples)")


class CachedTeacher:
    """The teacher's signal read from a top-k cache by sample id, verified against each sample's content."""

    def __init__(self, reader: CacheReader, sample_images: dict[str, str | None], selections: list[Selection],
                 device: torch.device | str = "cpu") -> None:
        self.reader = reader
        self.sample_images = sample_images
        self.selections = selections  # what the terms read: every such row must be cached
        self.device = torch.device(device)
        self.topk = int(reader.manifest["topk"])
        self.hidden_width = reader.manifest.get("hidden_width")
        self.hidden_dtype = VALUE_DTYPES[reader.manifest.get("hidden_dtype") or "fp16"]
        self.n_hidden_states = int(reader.manifest["teacher_layers"]) + 1
        self._image_digest = IMAGE_DIGESTS

    def _verify(self, sample_id: str, input_ids: Tensor, token_types: Tensor) -> None:
        entry = self.reader.entry(sample_id)
        if sample_id not in self.sample_images:
            raise CacheError(f"teacher cache {self.reader.directory}: sample {sample_id!r} is not in this stage's data")
        image = self._image_digest(self.sample_images[sample_id])
        differ = digest_difference(entry["digest"], sample_digest(teacher_ids(self.reader, input_ids.tolist()),
                                                                  token_types.tolist(), image))
        if differ:
            raise stale_error(self.reader, sample_id, differ)

    def view(self, batch: dict, needs: Needs) -> ModelView:
        """The cached teacher's view of one collated batch: top-k ids and log-probs (and hidden states) by position."""
        if needs.attention_layers or needs.image_features or (needs.last_hidden and not self.hidden_width):
            raise CacheError(f"teacher cache {self.reader.directory} holds top-k logits"
                             f"{' and last hidden states' if self.hidden_width else ''} only; the terms need {needs}")
        prefix = TEACHER_PREFIX if TEACHER_PREFIX + "input_ids" in batch else ""  # a teacher view: its own tokens
        types = batch[prefix + "token_types"].cpu()
        ids, keep = batch[prefix + "input_ids"].cpu(), batch[prefix + "attention_mask"].cpu().bool()
        n, length = types.shape
        topk_ids = torch.zeros(n, length, self.topk, dtype=torch.long)
        logprobs = torch.full((n, length, self.topk), float("nan"))  # never a silent zero where nothing is cached
        cached = torch.zeros(n, length, dtype=torch.bool)
        hidden, hidden_cached = None, torch.zeros(n, length, dtype=torch.bool)
        if needs.last_hidden:
            hidden = torch.full((n, length, self.hidden_width), float("nan"), dtype=self.hidden_dtype)
        for b, sid in enumerate(batch["sample_ids"]):
            self._verify(sid, ids[b][keep[b]], types[b][keep[b]])
            rows = self.reader.rows(sid)
            topk_ids[b, rows.positions] = rows.topk_ids
            logprobs[b, rows.positions] = rows.topk_logprobs
            cached[b, rows.positions] = True
            if hidden is not None:
                hidden[b, rows.hidden_positions] = rows.hidden
                hidden_cached[b, rows.hidden_positions] = True
        self._check_rows(batch["sample_ids"], types, cached, hidden_cached if hidden is not None else None)
        return ModelView(token_types=types.to(self.device), topk_ids=topk_ids.to(self.device),
                         topk_logprobs=logprobs.to(self.device),
                         last_hidden=hidden.to(self.device) if hidden is not None else None,
                         n_hidden_states=self.n_hidden_states, who="teacher (cache)")

    def _check_rows(self, sample_ids: list[str], types: Tensor, cached: Tensor, hidden_cached: Tensor | None) -> None:
        """Every row a term reads is cached: an error naming the sample and position otherwise."""
        for sel in self.selections:
            have = cached if isinstance(sel, Predictions) else hidden_cached
            if have is None:  # hidden rows, but no term asked for hidden states in this view
                continue
            lacking = (sel.mask(types) & ~have).nonzero()
            if len(lacking):
                b, t = (int(x) for x in lacking[0])
                raise CacheError(f"teacher cache {self.reader.directory}: sample {sample_ids[b]!r} position {t} is "
                                 f"read by the terms ({type(sel).__name__.lower()} of {sel.group!r} tokens) but was "
                                 "not cached")


def sample_images(dataset) -> dict[str, str | None]:
    """Sample id -> image path (a tuple of paths for a multi-image sample) of a LlavaDataset (for the per-batch
    image check)."""
    return {r.sample_id: tuple(r.images) if len(r.images) > 1 else r.image for r in dataset.records}


def open_cache(directory: str) -> CacheReader:
    """A completed cache directory, ready to read."""
    if not os.path.isdir(directory):
        raise CacheError(f"teacher cache {directory} does not exist; write it with `llavadi cache-teacher`")
    return CacheReader(directory)


def teacher_config(reader: CacheReader):
    """The cached teacher's model config (widths for the terms' projectors), rebuilt from the manifest."""
    from transformers import CONFIG_MAPPING

    raw = dict(reader.manifest["teacher_config"])
    return CONFIG_MAPPING[raw["model_type"]].from_dict(raw)


def cached_objective(stage, student, reader: CacheReader):
    """The stage's objective against the cache's top-k signal (terms without a top-k form are refused, named)."""
    from llavadi.distill.objective import DistillObjective

    pair = getattr(reader, "tokenizer_pair", None)
    vocab = SharedVocab.from_pair(pair) if pair is not None and pair.kind == ADDITIONS else None
    cross = pair is not None and pair.kind == DIFFERENT
    matched = None
    if cross:  # gold compares the tokens both vocabularies hold, by exact string
        matched = MatchedTokens(torch.tensor(pair.student_ids, dtype=torch.long),
                                torch.tensor(pair.teacher_ids, dtype=torch.long), pair.teacher_rows)
    return DistillObjective(stage.distill.terms, ce_weight=stage.distill.ce_weight,
                            student_config=student.model.config, teacher_config=teacher_config(reader),
                            chunk_size=stage.distill.chunk_size, chunk_mib=stage.distill.chunk_mib,
                            teacher_signal="topk", vocab=vocab,
                            cross_tokenizer=cross, matched_tokens=matched)


def preflight_cache(recipe, stage, student, where: str) -> tuple[CacheReader | None, list[str]]:
    """Before any model loads: the stage's cache exists, is complete, fits the stage and the student, and
    serves its terms. Returns the reader (None if unusable) and the problems found."""
    try:
        reader = stage_cache(recipe, stage, student)
        if reader is not None:
            import torch

            with torch.device("meta"):  # projectors sized from the configs, no memory
                check_terms(cached_objective(stage, student, reader), reader.manifest, where)
        return reader, []
    except (CacheError, OSError) as e:
        return None, [f"{where}: {e}"]
    except ValueError as e:  # a term without a top-k form, refused by the objective
        return None, [f"{where}.distill: {e}"]


def uses_cache(recipe, stage) -> bool:
    """Whether a stage's teacher signal is read from the recipe's teacher cache."""
    return recipe.teacher is not None and bool(recipe.teacher.cache) and bool(stage.distill.terms)


def stage_cache(recipe, stage, student) -> CacheReader | None:
    """The recipe's teacher cache for a distillation stage, checked against the stage and the student
    (and against the teacher's directory when the recipe names it); None when the teacher runs online."""
    if not uses_cache(recipe, stage):
        return None
    where = f"stage {stage.name!r}"
    reader = open_cache(recipe.teacher.cache)
    reader.tokenizer_pair = _cache_pair(reader, student)
    check_stage(reader, stage.data, student, where, reader.tokenizer_pair)
    if recipe.teacher.path:
        check_teacher(reader, recipe.teacher.path, where)
    return reader


def cached_teacher_files(reader: CacheReader):
    """The cache's teacher as its files describe it (tokenizer, config, image processor; no weights), read once."""
    from llavadi.models.describe import ModelFilesError, describe_llava_dir

    if getattr(reader, "teacher_files", None) is None:
        folder = os.path.join(reader.directory, TEACHER_DIR)
        try:
            described = describe_llava_dir(folder, "the teacher cache's teacher files", weights=False)
        except (ModelFilesError, OSError) as e:
            raise CacheError(f"teacher cache {reader.directory}: {e}; rewrite the cache with `llavadi cache-teacher`") \
                from None
        if tokenizer_digest(described.tokenizer) != reader.manifest.get("tokenizer"):
            raise CacheError(f"teacher cache {reader.directory}: {folder} holds another tokenizer than the one the "
                             "rows were written with; rewrite the cache with `llavadi cache-teacher`")
        reader.teacher_files = described
    return reader.teacher_files


def _cache_pair(reader: CacheReader, student) -> TokenizerPair | None:
    """The pair of the cache's teacher (its tokenizer files, stored in the cache) and the student; None: one tokenizer."""
    if tokenizer_digest(student.tokenizer) == reader.manifest.get("tokenizer"):
        return None
    pair = tokenizer_pair(student, cached_teacher_files(reader))
    return None if pair.kind == IDENTICAL else pair


def dataset_teacher(reader: CacheReader | None):
    """The teacher whose view the stage's dataset renders for a cache: the cache's teacher files when its
    tokenizer differs from the student's (answer tokens are paired across the two views); else None."""
    pair = getattr(reader, "tokenizer_pair", None)
    return cached_teacher_files(reader) if pair is not None and pair.kind == DIFFERENT else None


def check_dataset(reader: CacheReader, dataset, where: str) -> None:
    """Every sample of a dataset is cached, from the same token ids, token types and image bytes."""
    images = sample_images(dataset)
    prefixes = [v.prefix for v in dataset.views]
    view = prefixes.index(TEACHER_PREFIX) if TEACHER_PREFIX in prefixes else 0  # the teacher's own rendering, if any
    check_samples(reader, [r.sample_id for r in dataset.records], [e[view] for e in dataset.encoded], where,
                  [images[r.sample_id] for r in dataset.records])


def cached_teacher(reader: CacheReader, objective, dataset, device, stage_name: str) -> CachedTeacher:
    """The CachedTeacher of a stage, after checking that it serves every term and holds every sample."""
    where = f"stage {stage_name!r}"
    check_terms(objective, reader.manifest, where)
    check_dataset(reader, dataset, where)
    return CachedTeacher(reader, sample_images(dataset), [t.selection() for t in objective.terms], device)
