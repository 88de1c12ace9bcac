"""What a training stage is built from: its dataset (a student view, and a teacher view when the
teacher's image layout or tokenizer differs) and its distillation objective. Shared by the up-front
check (llavadi.train.preflight) and the stage run (llavadi.train.runner)."""

from __future__ import annotations

from llavadi.config import StageConfig
from llavadi.data.dataset import LlavaDataset
from llavadi.distill.compat import check_same_tokenizer
from llavadi.distill.objective import DistillObjective
from llavadi.models.build import LoadedModel
from llavadi.models.families import FAMILIES
from llavadi.teacher.cache import cached_objective

TEACHER_PREFIX = "teacher_"


def _same_image_layout(a: LoadedModel, b: LoadedModel) -> bool:
    pa, pb = a.image_processor, b.image_processor
    keys = ("crop_size", "size", "image_mean", "image_std", "do_normalize", "do_center_crop", "resample",
            "patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels")
    same_proc = type(pa) is type(pb) and all(str(getattr(pa, k, None)) == str(getattr(pb, k, None)) for k in keys)
    return same_proc and a.n_image_tokens == b.n_image_tokens and a.tokenizer.get_vocab() == b.tokenizer.get_vocab()


def build_dataset(stage: StageConfig, student: LoadedModel, teacher: LoadedModel | None,
                  progress: bool = False) -> LlavaDataset:
    """The stage's dataset with a student view, and a teacher view when the teacher's layout differs."""
    d = stage.data
    views = [student.data_view(d.template, d.system, d.max_length)]
    if teacher is not None and stage.distill.terms and not _same_image_layout(student, teacher):
        views.append(teacher.data_view(d.template, d.system, d.max_length, prefix=TEACHER_PREFIX))
    return LlavaDataset(stage.data.path, stage.data.image_folder, views, on_error=stage.data.on_error,
                        max_pixels=stage.data.max_pixels, progress=progress)


def _family_name(loaded) -> str | None:
    model_type = getattr(getattr(loaded.model, "config", None), "model_type", None)
    return FAMILIES[model_type].name if model_type in FAMILIES else None


def check_same_family(student: LoadedModel, teacher: LoadedModel, logit_terms: list[str]) -> None:
    """Refuse, by family name, logit terms between a teacher and a student of different model families."""
    s_family, t_family = _family_name(student), _family_name(teacher)
    if s_family and t_family and s_family != t_family:
        raise ValueError(f"logit terms {logit_terms} compare next-token distributions of one tokenizer and one prompt "
                         f"layout, but the teacher is a {t_family} model and the student a {s_family} model; "
                         "cross-family pairs take the state terms (hidden_mse, visual_align, ...) where the token "
                         "types align, not logit terms")


def build_objective(stage: StageConfig, student: LoadedModel, teacher: LoadedModel | None,
                    cache=None) -> DistillObjective:
    """The stage's objective; checks up front that logit terms have a shared tokenizer.

    With a teacher `cache` (a CacheReader) the logit terms read its top-k signal (the tokenizer was
    checked against the cache's)."""
    terms = stage.distill.terms
    if cache is not None:
        return cached_objective(stage, student, cache)
    if teacher is not None and any(t.is_logit_term for t in terms):
        check_same_family(student, teacher, [t.name for t in terms if t.is_logit_term])
        check_same_tokenizer(student.tokenizer, teacher.tokenizer)
    return DistillObjective(terms, ce_weight=stage.distill.ce_weight, student_config=student.model.config,
                            teacher_config=teacher.model.config if teacher is not None else None,
                            chunk_size=stage.distill.chunk_size, chunk_mib=stage.distill.chunk_mib)
