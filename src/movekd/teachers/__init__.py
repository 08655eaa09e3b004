"""Teachers: frozen vision encoders built from typed specs, with their own preprocessing.

Example::

    from movekd.teachers import create_teacher, describe_teacher

    describe_teacher("convnext_xxl_1024")            # meta device: 1024 tokens x 3072, params, GFLOPs
    clip = create_teacher("clip_vit_l14_336", device="meta")   # paper preset, no weights
    teacher = create_teacher("efficientnet_lite0")   # embedded: real weights, offline
    out = teacher(images_uint8)                      # TeacherOutput(tokens [B,N,C], cls, attn, grid)

Sources are the modules of this package (one file each, imported here so their factories register);
see ``docs/teachers.md`` to add one.
"""

from movekd.teachers.base import (IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, SpecError,
                                  Teacher, TeacherLoadError, TeacherOutput, TeacherSpec, is_teacher_param,
                                  iter_teachers, state_dict_without_teachers, teacher_prefixes,
                                  trainable_parameters)
from movekd.teachers.preprocess import Preprocessor, preprocess_images
from movekd.teachers.presets import (PRESETS, TEACHER_SETS, describe_teacher, get_preset, list_presets,
                                     teacher_set)
from movekd.teachers.registry import create_teacher, list_teachers, register_teacher, resolve_spec


def _import_sources() -> None:
    # Every public module of this package other than the framework is a source: importing it runs its
    # @register_teacher. So adding a source is adding one file, nothing else.
    import importlib
    import pkgutil

    framework = {"base", "preprocess", "presets", "registry"}
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name not in framework:
            importlib.import_module(f"{__name__}.{info.name}")


_import_sources()

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "PRESETS", "Preprocessor", "SpecError",
    "TEACHER_SETS", "Teacher", "TeacherLoadError", "TeacherOutput", "TeacherSpec", "create_teacher",
    "describe_teacher", "get_preset", "is_teacher_param", "iter_teachers", "list_presets", "list_teachers",
    "preprocess_images", "register_teacher", "resolve_spec", "state_dict_without_teachers", "teacher_prefixes",
    "teacher_set", "trainable_parameters",
]
