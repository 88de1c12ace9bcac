"""What a training stage is built from: its dataset (a student view, and a teacher view when the
teacher's image layout or tokenizer differs) and its distillation objective. Shared by the up-front
check (llavadi.train.preflight) and the stage run (llavadi.train.runner)."""

from __future__ import annotations

import torch

from llavadi.config import StageConfig
from llavadi.data.dataset import LlavaDataset
from llavadi.data.token_alignment import PairAligner
from llavadi.data.tokenizer_pair import DIFFERENT, IDENTICAL
from llavadi.distill.compat import logit_vocab, tokenizer_pair
from llavadi.distill.cross_vocab import MatchedTokens
from llavadi.distill.objective import DistillObjective
from llavadi.distill.terms import is_logit_term, term_class
from llavadi.models.build import LoadedModel
from llavadi.models.families import FAMILIES
from llavadi.teacher.cache import TEACHER_PREFIX, cached_objective


def _same_image_layout(a: LoadedModel, b: LoadedModel) -> bool:
    pa, pb = a.image_processor, b.image_processor
    keys = ("crop_size", "size", "image_mean", "image_std", "do_normalize", "do_center_crop", "resample",
            "patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels")
    same_proc = type(pa) is type(pb) and all(str(getattr(pa, k, None)) == str(getattr(pb, k, None)) for k in keys)
    return same_proc and a.n_image_tokens == b.n_image_tokens and a.tokenizer.get_vocab() == b.tokenizer.get_vocab()


def different_tokenizers(student: LoadedModel, teacher: LoadedModel | None) -> bool:
    """Whether the teacher tokenizes text differently from the student (pair kind `different`)."""
    return teacher is not None and tokenizer_pair(student, teacher).kind == DIFFERENT


def _pairs_answers(stage: StageConfig) -> bool:
    """Whether a term of the stage reads answer tokens paired across tokenizers."""
    return any(term_class(t.name).pairs_answer_tokens(*term_class(t.name).resolve(t.tokens, t.options, ""))
               for t in stage.distill.terms)


def build_dataset(stage: StageConfig, student: LoadedModel, teacher: LoadedModel | None,
                  progress: bool = False) -> LlavaDataset:
    """The stage's dataset with a student view, and a teacher view when the teacher's layout differs.

    With different tokenizers and a term that reads paired answer tokens, every sample's answer
    tokens are paired across the two views (a sample that cannot be is an error naming it, or
    skipped under on_error: skip)."""
    d = stage.data
    views = [student.data_view(d.template, d.system, d.max_length)]
    aligner = None
    if teacher is not None and stage.distill.terms and not _same_image_layout(student, teacher):
        views.append(teacher.data_view(d.template, d.system, d.max_length, prefix=TEACHER_PREFIX))
        if different_tokenizers(student, teacher) and _pairs_answers(stage):
            aligner = PairAligner(views[0].encoder, views[1].encoder)
    return LlavaDataset(stage.data.path, stage.data.image_folder, views, on_error=stage.data.on_error,
                        max_pixels=stage.data.max_pixels, progress=progress, aligner=aligner)


def _family_name(loaded) -> str | None:
    model_type = getattr(getattr(loaded.model, "config", None), "model_type", None)
    return FAMILIES[model_type].name if model_type in FAMILIES else None


def check_same_family(student: LoadedModel, teacher: LoadedModel, logit_terms: list[str]) -> None:
    """Refuse, by family name, `logit_terms` (of one vocabulary) between a teacher and a student of different families."""
    s_family, t_family = _family_name(student), _family_name(teacher)
    if logit_terms and s_family and t_family and s_family != t_family:
        raise ValueError(f"logit terms {logit_terms} compare next-token distributions of one tokenizer and one prompt "
                         f"layout, but the teacher is a {t_family} model and the student a {s_family} model; "
                         "cross-family pairs take uld or gold (they pair the answer spans of the two renderings) and "
                         "the state terms (hidden_mse, visual_align, ...) where the token types align")


def one_vocabulary_logit_terms(terms) -> list[str]:
    """The logit terms that compare the two models position by position (uld and gold pair answer spans instead)."""
    return [t.name for t in terms if is_logit_term(t)
            and not term_class(t.name).pairs_answer_tokens(*term_class(t.name).resolve(t.tokens, t.options, ""))]


def build_objective(stage: StageConfig, student: LoadedModel, teacher: LoadedModel | None,
                    cache=None) -> DistillObjective:
    """The stage's objective; classifies the tokenizer pair up front when logit terms compare the two models.

    One tokenizer: the terms compare the full distributions; the same up to additions: the
    distributions over the shared tokens (a vocabulary map); different tokenizers: the logit terms
    of one vocabulary are refused, ``uld`` / ``gold`` read paired answer spans (and every other term
    says whether it works across tokenizers, ``Term.across_tokenizers``). With a
    teacher `cache` (a CacheReader) the logit terms read its top-k signal (the tokenizer was
    checked against the cache's)."""
    terms = stage.distill.terms
    if cache is not None:
        return cached_objective(stage, student, cache)
    if teacher is not None:
        check_same_family(student, teacher, one_vocabulary_logit_terms(terms))
    pair = tokenizer_pair(student, teacher) if teacher is not None and terms else None
    vocab = None
    if pair is not None and any(is_logit_term(t) for t in terms):
        vocab = logit_vocab(pair)
    matched = None
    if pair is not None:  # gold compares the tokens both vocabularies hold, by exact string
        matched = MatchedTokens(torch.tensor(pair.student_ids, dtype=torch.long),
                                torch.tensor(pair.teacher_ids, dtype=torch.long), pair.teacher_rows)
    return DistillObjective(terms, ce_weight=stage.distill.ce_weight, student_config=student.model.config,
                            teacher_config=teacher.model.config if teacher is not None else None,
                            chunk_size=stage.distill.chunk_size, chunk_mib=stage.distill.chunk_mib, vocab=vocab,
                            cross_tokenizer=pair is not None and pair.kind == DIFFERENT, matched_tokens=matched)


def answer_id_maps(student: LoadedModel, teacher: LoadedModel | None, prefixes: tuple[str, ...]) -> dict:
    """Per view prefix, the student id -> view id map an on-policy answer goes through (a teacher view whose
    tokenizer is the student's up to additions); with different tokenizers the answer is re-tokenized instead
    (``llavadi.teacher.on_policy.TeacherRetokenizer``)."""
    if teacher is None or TEACHER_PREFIX not in prefixes:
        return {}
    pair = tokenizer_pair(student, teacher)
    if pair.kind in (IDENTICAL, DIFFERENT):
        return {}
    return {TEACHER_PREFIX: pair.student_to_teacher()}
