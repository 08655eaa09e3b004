"""LLaVA-faithful data path and the paper-literal options: image_aspect_ratio (pad / square / stretch)
against LLaVA's expand2square and the libraries' processors, the modality-length-grouped batch sampler,
and the kd.* options against the loss functions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from movekd.data import fill_colour, prepare_image, read_image
from movekd.data.images import SQUARE_ASPECT_RATIOS
from movekd.teachers import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TeacherOutput
from movekd.teachers.preprocess import Preprocessor
from movekd.teachers.registry import resolve_spec
from movekd.train.sampler import ModalityLengthGroupedBatchSampler


def llava_expand2square(pil_img, background_color):
    """LLaVA's llava/train/train.py expand2square, verbatim in behaviour (the reference)."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A non-square RGB image with structure (gradients plus noise), so crops and pads are visible."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1)
    arr = np.clip(arr + rng.integers(-40, 40, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def hf_processor(spec):
    """The library processor a spec reproduces (LLaVA runs it after expand2square)."""
    from transformers import CLIPImageProcessor, SamImageProcessor

    s = spec.image_size
    if spec.resize == "longest_pad":
        return SamImageProcessor(size={"longest_edge": s}, pad_size={"height": s, "width": s},
                                 image_mean=list(spec.mean), image_std=list(spec.std))
    assert spec.crop_pct == 1.0 and spec.interpolation == "bicubic"
    return CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                              image_mean=list(spec.mean), image_std=list(spec.std))


def _pixels(processor, img) -> torch.Tensor:
    return processor(images=np.asarray(img), return_tensors="pt").pixel_values


# The student (CLIP-L/336) and the paper v1.1 teachers: CLIP, SAM (longest side + pad), EVA, ConvNeXt.
PAPER_MODELS = ["clip_vit_l14_336", "sam_vit_l_1024", "eva02_l16_1024", "convnext_xxl_1024"]


# --- pad -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(150, 96), (72, 130)])  # wide and tall
def test_pad_is_expand2square_then_the_clip_processor(size):
    img = photo(*size)
    fill = fill_colour(OPENAI_CLIP_MEAN)
    assert fill == (122, 116, 104)  # LLaVA: tuple(int(x * 255) for x in processor.image_mean)
    student = resolve_spec("clip_vit_l14_336").replace(image_size=64)
    ours = Preprocessor.from_spec(student)(prepare_image(img, "pad", fill, 64)[None])
    ref = _pixels(hf_processor(student), llava_expand2square(img, fill))
    assert ours.shape == ref.shape == (1, 3, 64, 64)
    assert (ours - ref).abs().max() <= 1e-5
    # the padding is the mean colour, i.e. about 0 after normalisation
    band = ours[..., :8, :] if size[0] > size[1] else ours[..., :, :8]
    assert band.abs().max() < 0.02


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_pad_once_every_teacher_sees_expand2square_through_its_own_preprocessing(name):
    """Decoded at the padded side (no resize in the worker), each model's own preprocessing of the
    shared padded square equals LLaVA's expand2square followed by that model's library processor."""
    img = photo(120, 84, seed=1)
    fill = fill_colour(OPENAI_CLIP_MEAN)  # the student's mean, for every model (module docstring)
    spec = resolve_spec(name).replace(image_size=96)
    shared = prepare_image(img, "pad", fill, 120)
    assert torch.equal(shared, torch.from_numpy(np.asarray(llava_expand2square(img, fill))).permute(2, 0, 1))
    ours = Preprocessor.from_spec(spec)(shared[None])
    ref = _pixels(hf_processor(spec), llava_expand2square(img, fill))
    assert ours.shape == ref.shape == (1, 3, 96, 96)
    assert (ours - ref).abs().max() <= 1e-5


def test_pad_at_a_different_decode_size_stays_close():
    """Decoding to ``image_size`` then resizing per model is one extra resize: a bounded difference."""
    img = photo(300, 180, seed=2)
    fill = fill_colour(OPENAI_CLIP_MEAN)
    spec = resolve_spec("clip_vit_l14_336").replace(image_size=96)
    ours = Preprocessor.from_spec(spec)(prepare_image(img, "pad", fill, 160)[None])
    ref = _pixels(hf_processor(spec), llava_expand2square(img, fill))
    grey = (ours - ref).abs() * 255 * torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    assert grey.mean() < 1 and grey.max() < 8  # measured: 0.33 and 3 grey levels


# --- square --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["clip_vit_l14_336", "eva02_l16_1024", "convnext_xxl_1024"])
@pytest.mark.parametrize("size", [(150, 96), (72, 131)])
def test_square_is_the_models_own_resize_and_centre_crop(name, size):
    img = photo(*size, seed=3)
    spec = resolve_spec(name).replace(image_size=64)
    ours = Preprocessor.from_spec(spec)(prepare_image(img, "square", (0, 0, 0), 64)[None])
    ref = _pixels(hf_processor(spec), img)
    assert (ours - ref).abs().max() <= 1e-5
    # and it is a crop, not a pad or a stretch of the whole image
    stretched = Preprocessor.from_spec(spec)(prepare_image(img, "stretch", (0, 0, 0), 64)[None])
    assert (stretched - ref).abs().mean() > 0.05


# --- stretch (the default) and the dataset path ----------------------------------------------------------
def test_stretch_is_the_historical_pil_resize_and_square_images_agree_in_every_mode(tmp_path):
    img = photo(90, 60, seed=4)
    path = tmp_path / "a.png"
    img.save(path)
    old = torch.from_numpy(np.asarray(img.resize((48, 48), Image.Resampling.BICUBIC)).copy()).permute(2, 0, 1)
    assert torch.equal(read_image(path, 48), old)  # the default mode is the old behaviour, bit for bit
    square = photo(64, 64, seed=5)  # easy-vqa images are square: every mode gives the same pixels
    outs = [prepare_image(square, mode, (1, 2, 3), 64) for mode in SQUARE_ASPECT_RATIOS]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    with pytest.raises(ValueError, match="image_aspect_ratio 'letterbox'"):
        prepare_image(img, "letterbox", (0, 0, 0), 32)


def test_dataset_applies_the_mode_and_the_cache_key_follows_it(tmp_path):
    from tiny_vlm import make_tokenizer

    from movekd.data import ConversationEncoder, LlavaDataset
    from movekd.train.build import StageDataset

    photo(90, 60).save(tmp_path / "a.png")
    samples = [{"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "a b c"}]},
        {"id": "t", "conversations": [{"from": "human", "value": "hi there"}, {"from": "gpt", "value": "yes"}]}]
    encoder = ConversationEncoder(make_tokenizer(), "chat", num_image_tokens=4)
    fill = fill_colour(OPENAI_CLIP_MEAN)
    pad = LlavaDataset(samples, encoder, image_root=tmp_path, image_size=32, image_aspect_ratio="pad", fill=fill)
    assert torch.equal(pad[0]["image"], prepare_image(photo(90, 60), "pad", fill, 32))
    assert pad.modality_lengths() == [2 + 3, -(2 + 1)]  # LLaVA: words of every turn, sign = modality
    stretch = StageDataset(LlavaDataset(samples, encoder, image_root=tmp_path, image_size=32))
    assert stretch.image_key(0) == "a.png" and StageDataset(pad).image_key(0) == "a.png|pad"
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        LlavaDataset(samples, encoder, image_aspect_ratio="crop")


# --- modality-length-grouped batches -------------------------------------------------------------------
def _lengths(n_image: int, n_text: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    lengths = [int(v) for v in rng.integers(1, 300, n_image)] + [-int(v) for v in rng.integers(1, 300, n_text)]
    return [lengths[i] for i in rng.permutation(len(lengths))]


def _epoch(lengths, batch, world, seed=0, epoch=0, start=0):
    return [list(ModalityLengthGroupedBatchSampler(lengths, batch, seed, epoch, start, rank=r, world=world))
            for r in range(world)]


@pytest.mark.parametrize("n_image, n_text, batch, world", [
    (37, 23, 4, 1), (37, 23, 4, 2), (50, 13, 3, 3), (16, 16, 4, 2), (40, 0, 4, 2), (0, 9, 2, 2), (9, 1, 2, 3)])
def test_grouped_batches_never_mix_modalities_and_cover_every_sample(n_image, n_text, batch, world):
    lengths = _lengths(n_image, n_text)
    per_rank = _epoch(lengths, batch, world)
    assert len({len(b) for b in per_rank}) == 1  # every rank takes the same number of steps
    assert all(len(b) == len(ModalityLengthGroupedBatchSampler(lengths, batch, 0, world=world)) for b in per_rank)
    seen = []
    for rank_batches in per_rank:
        for b in rank_batches:
            assert 1 <= len(b) <= batch
            assert len({lengths[i] > 0 for i in b}) == 1, f"mixed batch {b}"
            seen += b
    # every sample once; duplicates only to give each rank a sample of a remainder smaller than world
    assert set(seen) == set(range(len(lengths)))
    extra = len(seen) - len(lengths)
    remainders = [n % (batch * world) for n in (n_image, n_text)]
    assert extra == sum(world - r for r in remainders if 0 < r < world)
    if world == 1:
        assert sorted(seen) == list(range(len(lengths)))
    # within a full step, each per-device batch is longest-first (LLaVA sorts a mega-batch by length)
    for b in per_rank[0][:-2]:
        assert [abs(lengths[i]) for i in b] == sorted((abs(lengths[i]) for i in b), reverse=True)


def test_grouped_batches_resume_exactly_and_follow_seed_and_epoch():
    lengths = _lengths(45, 30, seed=1)
    batch, world = 4, 2
    full = _epoch(lengths, batch, world, seed=3, epoch=1)
    for steps_done in (0, 1, 5, len(full[0]) - 1, len(full[0])):
        resumed = _epoch(lengths, batch, world, seed=3, epoch=1, start=steps_done * batch * world)
        assert resumed == [rank[steps_done:] for rank in full]
    assert _epoch(lengths, batch, world, seed=3, epoch=1) == full  # deterministic
    assert _epoch(lengths, batch, world, seed=3, epoch=2) != full
    with pytest.raises(ValueError, match="multiple of"):
        ModalityLengthGroupedBatchSampler(lengths, batch, 0, start=3, world=world)
    with pytest.raises(ValueError, match="non-zero"):
        ModalityLengthGroupedBatchSampler([3, 0, -2], batch, 0)


def test_grouped_batches_balance_length_over_ranks():
    """LLaVA's split_to_even_chunks: in a full mega-batch, per-rank total lengths are close."""
    lengths = [int(v) for v in np.random.default_rng(2).integers(1, 1000, 64)]
    per_rank = _epoch(lengths, 8, 4)
    for step in zip(*per_rank):
        totals = [sum(lengths[i] for i in b) for b in step]
        longest = max(lengths[i] for b in step for i in b)
        assert max(totals) - min(totals) <= longest


# --- kd.* options against the loss functions -------------------------------------------------------------
class FixedTeacher(nn.Module):
    def __init__(self, out: TeacherOutput):
        super().__init__()
        self.out = out

    def forward(self, images):
        return self.out


class GridAdapter(nn.Module):
    def forward(self, tokens, grid, student_grid):
        return tokens


def _kd_setup(**kd_options):
    from movekd.train.config import KDConfig
    from movekd.train.kd_model import MoveKDModel

    g = torch.Generator().manual_seed(0)
    B, N, D, H = 3, 16, 8, 2
    attn = torch.softmax(torch.randn(B, H, 1 + N, 1 + N, generator=g) * 4, -1)  # contrasted attention rows
    cls = torch.randn(B, D, generator=g) * 3
    clip = TeacherOutput(torch.randn(B, N, D, generator=g), cls, attn, (4, 4))
    # two non-CLIP teachers, one more aligned with the CLS state: batch-mean softmax 0.886, so the
    # official 0.8 flattening fires and a 0.95 threshold does not
    a = TeacherOutput(cls[:, None, :] * 0.05 + torch.randn(B, N, D, generator=g) * 0.1, None, None, (4, 4))
    b = TeacherOutput(torch.randn(B, N, D, generator=g) * 0.1, None, None, (4, 4))
    kd = KDConfig(**kd_options)
    model = MoveKDModel(nn.Identity(), [FixedTeacher(clip), FixedTeacher(a), FixedTeacher(b)],
                        [None, GridAdapter(), GridAdapter()], kd, (4, 4))
    student = torch.randn(B, N, D, generator=g)
    loss, _, weights = model._kd(student, torch.zeros(B, 3, 8, 8, dtype=torch.uint8), None)
    return loss, torch.tensor(weights), (student, [clip.tokens, a.tokens, b.tokens], attn, cls)


def _expected(student, tokens, attn, cls, mode="official", threshold=0.8, scale=None):
    from movekd.functional import kd_loss_per_teacher, teacher_weight, token_weight

    per = kd_loss_per_teacher(student, tokens, token_weight(attn, mode=mode))
    w = teacher_weight(cls, tokens, alpha=0.8, flatten_threshold=threshold, scale=scale)
    return (w * per).sum(-1).mean(), w.mean(0)


@pytest.mark.parametrize("options, expected_args", [
    ({}, {}),
    ({"token_weight_mode": "renorm"}, {"mode": "renorm"}),
    ({"teacher_weight_scale": "sqrt_d"}, {"scale": 8 ** -0.5}),
    ({"teacher_weight_flatten_threshold": None}, {"threshold": None}),
    ({"teacher_weight_flatten_threshold": 0.95}, {"threshold": 0.95}),
])
def test_kd_options_change_the_loss_as_their_equations_say(options, expected_args):
    loss, weights, inputs = _kd_setup(**options)
    want_loss, want_weights = _expected(*inputs, **expected_args)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=1e-7)
    if options:  # every option moves the loss away from the official default
        default, _, _ = _kd_setup()
        assert abs(float(loss) - float(default)) > 1e-4


def test_kd_option_values_are_checked():
    from movekd.config.loader import ConfigError, from_dict
    from movekd.train.config import KDConfig

    with pytest.raises(ConfigError, match="kd.teacher_weight_scale"):
        from_dict(KDConfig, {"teacher_weight_scale": "sqrt"}, prefix="kd.")
    with pytest.raises(ConfigError, match="teacher_weight_flatten_threshold"):
        from_dict(KDConfig, {"teacher_weight_flatten_threshold": 1.5}, prefix="kd.")


def test_paper_presets_use_the_official_data_and_kd_settings():
    from movekd.train.config import load_config

    for name in ("paper_llava15_7b_v1.0", "paper_llava15_7b_v1.1"):
        config = load_config(name)
        pretrain, finetune = config.stages
        assert (pretrain.image_aspect_ratio, finetune.image_aspect_ratio) == ("square", "pad")
        assert (pretrain.group_by_modality_length, finetune.group_by_modality_length) == (False, True)
        assert (config.kd.token_weight_mode, config.kd.teacher_weight_scale,
                config.kd.teacher_weight_flatten_threshold) == ("official", "none", 0.8)
    demo = load_config("demo")
    assert all(s.image_aspect_ratio == "stretch" and not s.group_by_modality_length for s in demo.stages)


# --- the loop with modality-grouped batches and padded images ---------------------------------------------
def test_training_with_grouped_batches_never_mixes_and_resumes_exactly(tmp_path, monkeypatch):
    import json

    from train_fixtures import tiny_config

    from movekd.train import checkpoint as ckpt
    from movekd.train.config import load_config
    from movekd.train.kd_model import MoveKDModel
    from movekd.train.loop import train

    seen = []
    forward = MoveKDModel.forward

    def recording(self, images, input_ids, attention_mask, labels, has_image=None, **kw):
        seen.append(has_image.tolist())
        return forward(self, images, input_ids, attention_mask, labels, has_image, **kw)

    monkeypatch.setattr(MoveKDModel, "forward", recording)

    def config(folder):
        data = tiny_config(folder, steps=(1, 5))
        stage2 = data["stages"][1]
        samples = json.loads(open(stage2["data"]).read())
        samples += [{"id": f"t{i}", "conversations": [{"from": "human", "value": "say " + "word " * i},
                                                      {"from": "gpt", "value": "ok"}]} for i in range(1, 7)]
        open(stage2["data"], "w").write(json.dumps(samples))
        stage2.update(group_by_modality_length=True, image_aspect_ratio="pad", batch_size=3)
        return load_config(data)

    straight = train(config(tmp_path / "a"), show_progress=False)
    # the bundle carries the mode: eval and chat pad too, with the student's mean colour
    from movekd.inference import load_trained

    loaded = load_trained(straight.final_dir)
    assert (loaded.image_aspect_ratio, loaded.fill) == ("pad", fill_colour(straight.system.config.model.student.spec.mean))
    stage2_batches = seen[1:]
    assert len(stage2_batches) == 5 and all(len(set(b)) == 1 for b in stage2_batches)
    assert {b[0] for b in stage2_batches} == {True, False}  # 12 image and 6 text samples: both occur
    resumed_config = config(tmp_path / "b")
    train(resumed_config, show_progress=False, stop_after_steps=3)
    assert ckpt.latest_checkpoint(resumed_config.run_dir).name == "step-0000003"
    seen.clear()
    resumed = train(resumed_config, resume=resumed_config.run_dir, show_progress=False)
    assert seen == stage2_batches[2:]
    a, b = straight.system.checkpoint_weights(), resumed.system.checkpoint_weights()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
