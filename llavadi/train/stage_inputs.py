"""What a training stage is built from: its dataset (a student view, and a teacher view when the
teacher's image layout or tokenizer differs) and its distillation objective. Shared by the up-front
check (llavadi.train.preflight) and the stage run (llavadi.train.runner)."""

from __future__ import annotations

from llavadi.config import StageConfig
from llavadi.data.dataset import LlavaDataset
from llavadi.data.token_alignment import PairAligner
from llavadi.distill.compat import check_same_tokenizer
from llavadi.distill.cross_vocab import matched_tokens
from llavadi.distill.terms import term_class
from llavadi.distill.objective import DistillObjective
from llavadi.models.build import LoadedModel
from llavadi.teacher.cache import cached_objective

TEACHER_PREFIX = "teacher_"


def _same_image_layout(a: LoadedModel, b: LoadedModel) -> bool:
    pa, pb = a.image_processor, b.image_processor
    keys = ("crop_size", "size", "image_mean", "image_std", "do_normalize", "do_center_crop", "resample",
            "patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels")
    same_proc = type(pa) is type(pb) and all(str(getattr(pa, k, None)) == str(getattr(pb, k, None)) for k in keys)
    return same_proc and a.n_image_tokens == b.n_image_tokens and a.tokenizer.get_vocab() == b.tokenizer.get_vocab()


def different_tokenizers(student: LoadedModel, teacher: LoadedModel | None) -> bool:
    """Whether the teacher tokenizes text differently from the student (its vocabulary is another)."""
    return teacher is not None and student.tokenizer.get_vocab() != teacher.tokenizer.get_vocab()


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


def build_objective(stage: StageConfig, student: LoadedModel, teacher: LoadedModel | None,
                    cache=None) -> DistillObjective:
    """The stage's objective; checks up front that logit terms have a shared tokenizer.

    With a teacher `cache` (a CacheReader) the logit terms read its top-k signal (the tokenizer was
    checked against the cache's)."""
    terms = stage.distill.terms
    if cache is not None:
        return cached_objective(stage, student, cache)
    cross = different_tokenizers(student, teacher) and bool(terms)
    if teacher is not None and any(t.is_logit_term for t in terms):
        check_same_tokenizer(student.tokenizer, teacher.tokenizer)
    matched = None
    if cross:
        text_config = getattr(teacher.model.config, "text_config", None) or teacher.model.config
        matched = matched_tokens(student.tokenizer, teacher.tokenizer, int(text_config.vocab_size))
    return DistillObjective(terms, ce_weight=stage.distill.ce_weight, student_config=student.model.config,
                            teacher_config=teacher.model.config if teacher is not None else None,
                            chunk_size=stage.distill.chunk_size, chunk_mib=stage.distill.chunk_mib,
                            cross_tokenizer=cross, matched_tokens=matched)
