"""What a training stage is built from: its dataset (a student view, and a teacher view when the
teacher's image layout or tokenizer differs) and its distillation objective. Shared by the up-front
check (llavadi.train.preflight) and the stage run (llavadi.train.runner)."""

from __future__ import annotations

from llavadi.config import StageConfig
from llavadi.data.dataset import LlavaDataset, View
from llavadi.data.tokenizer_pair import DIFFERENT, IDENTICAL
from llavadi.distill.compat import logit_vocab, tokenizer_pair
from llavadi.distill.objective import DistillObjective
from llavadi.models.build import LoadedModel
from llavadi.teacher.cache import cached_objective

TEACHER_PREFIX = "teacher_"


def _same_image_layout(a: LoadedModel, b: LoadedModel) -> bool:
    pa, pb = a.image_processor, b.image_processor
    keys = ("crop_size", "size", "image_mean", "image_std", "do_normalize", "do_center_crop", "resample")
    same_proc = all(str(getattr(pa, k, None)) == str(getattr(pb, k, None)) for k in keys)
    return same_proc and a.n_image_tokens == b.n_image_tokens and a.tokenizer.get_vocab() == b.tokenizer.get_vocab()


def build_dataset(stage: StageConfig, student: LoadedModel, teacher: LoadedModel | None,
                  progress: bool = False) -> LlavaDataset:
    """The stage's dataset with a student view, and a teacher view when the teacher's layout differs."""
    d = stage.data
    views = [View(student.encoder(d.template, d.system, d.max_length), student.image_processor)]
    if teacher is not None and stage.distill.terms and not _same_image_layout(student, teacher):
        views.append(View(teacher.encoder(d.template, d.system, d.max_length), teacher.image_processor,
                          prefix=TEACHER_PREFIX))
    return LlavaDataset(stage.data.path, stage.data.image_folder, views, on_error=stage.data.on_error,
                        max_pixels=stage.data.max_pixels, progress=progress)


def build_objective(stage: StageConfig, student: LoadedModel, teacher: LoadedModel | None,
                    cache=None) -> DistillObjective:
    """The stage's objective; classifies the tokenizer pair up front when logit terms compare the two models.

    One tokenizer: the terms compare the full distributions; the same up to additions: the
    distributions over the shared tokens (a vocabulary map); different tokenizers: refused. With a
    teacher `cache` (a CacheReader) the logit terms read its top-k signal (the tokenizer was
    checked against the cache's)."""
    terms = stage.distill.terms
    if cache is not None:
        return cached_objective(stage, student, cache)
    vocab = None
    if teacher is not None and any(t.is_logit_term for t in terms):
        vocab = logit_vocab(tokenizer_pair(student, teacher))
    return DistillObjective(terms, ce_weight=stage.distill.ce_weight, student_config=student.model.config,
                            teacher_config=teacher.model.config if teacher is not None else None,
                            chunk_size=stage.distill.chunk_size, chunk_mib=stage.distill.chunk_mib, vocab=vocab)


def answer_id_maps(student: LoadedModel, teacher: LoadedModel | None, prefixes: tuple[str, ...]) -> dict:
    """Per view prefix, the student id -> view id map an on-policy answer goes through (a teacher view whose
    tokenizer is the student's up to additions); different tokenizers are refused (no re-tokenization yet)."""
    if teacher is None or TEACHER_PREFIX not in prefixes:
        return {}
    pair = tokenizer_pair(student, teacher)
    if pair.kind == IDENTICAL:
        return {}
    if pair.kind == DIFFERENT:
        raise ValueError("on-policy sampling with a teacher of a different tokenizer is not available yet: the "
                         "student's sampled answers would have to be re-tokenized for the teacher")
    return {TEACHER_PREFIX: pair.student_to_teacher()}
