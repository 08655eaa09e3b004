"""``movekd export --format hf-llava-next``: an AnyRes bundle in stock LlavaNextForConditionalGeneration."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from movekd.cli import main
from movekd.inference import LoadedVLM, answer, load_trained
from movekd.train.build import build_system
from movekd.train.config import load_config
from test_export import _stock_python
from train_fixtures import anyres_config

QUESTION = "what color is the shape?"


@pytest.fixture(scope="module")
def next_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_next")
    raw = anyres_config(root)
    raw["kd"] = {"enabled": False}
    # a checkpoint position grid (64 px) other than the side the student runs at (32 px), as the demo's
    # DINOv2 (518 vs 84): the export must be written at 32 px, its positions resampled
    raw["model"]["student"]["spec"]["config"] = {**raw["model"]["student"]["spec"]["config"], "image_size": 64}
    raw["model"]["student"]["mole"]["init"] = "paper"  # experts that differ from the base FFN and each other
    raw["model"]["student"]["mole"]["routing"] = "sparse"
    raw["stages"][0]["system_prompt"] = ""
    config = load_config(raw)
    torch.manual_seed(0)
    system = build_system(config)
    with torch.no_grad():  # routers that spread tokens over the experts; a newline that is not tiny
        for name, p in system.model.vlm.vision.named_parameters():
            if ".router." in name:
                p.normal_(0, 1.0)
        system.model.vlm.anyres.image_newline.normal_(0, 1.0)
    path = system.save_inference(root / "bundle", extra={"train_config": raw})
    return path, raw


STOCK_NEXT = textwrap.dedent("""
    import json, sys
    sys.path.append(sys.argv.pop(1))  # site-packages only: run with -I -S, so no .pth (movekd's editable install)
    try:
        import movekd
    except ImportError:
        pass
    else:
        raise SystemExit("movekd is importable in the stock process")
    from PIL import Image
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration
    folder, *images = sys.argv[1:]
    model = LlavaNextForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "QUESTION"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    answers, lengths, logits = [], [], []
    for path in images:
        inputs = processor(images=Image.open(path).convert("RGB"), text=prompt, return_tensors="pt")
        lengths.append(int((inputs["input_ids"] == model.config.image_token_id).sum()))
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        answers.append(processor.decode(out.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
        logits.append(out.logits[0][0].tolist())
    print(json.dumps({"answers": answers, "image_tokens": lengths, "logits": logits}))
""").replace("QUESTION", QUESTION)


def _first_logits(loaded, image_path) -> torch.Tensor:
    from movekd.data import ConversationEncoder
    from movekd.inference import read_query_image

    image = read_query_image(image_path, loaded.image_size, loaded.image_aspect_ratio, loaded.fill,
                             loaded.grid_pinpoints)
    encoder = ConversationEncoder(loaded.tokenizer, loaded.template, system_prompt=loaded.system_prompt, bos=loaded.bos)
    ids = encoder.encode_prompt([{"from": "human", "value": f"<image>\n{QUESTION}"}], has_image=True).input_ids[None]
    with torch.no_grad():
        return loaded.vlm(image, ids).logits[0, -1]


@pytest.mark.parametrize("merge", ["mean", "usage"])
def test_merged_next_export_answers_in_stock_transformers_like_movekd(next_bundle, tmp_path, merge):
    from movekd.export import expert_usage, merge_weights, merged_student
    from movekd.export.hf_llava import calibration_batches
    from movekd.vlm import MoveKDVLM

    path, raw = next_bundle
    data = raw["stages"][0]["data"]
    out = tmp_path / merge
    assert main(["export", str(path), str(out), "--format", "hf-llava-next", "--merge", merge, "--calib", data]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava_next" and config["image_grid_pinpoints"] == [
        [32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]

    loaded = load_trained(path)
    student = loaded.vlm.vision
    usage = None
    if merge == "usage":
        batches = calibration_batches(data, 32, image_aspect_ratio="anyres",
                                      grid_pinpoints=loaded.config.image_grid_pinpoints)
        usage = expert_usage(student, batches)
    plain = merged_student(student, merge_weights(student, merge, usage))
    merged = LoadedVLM(MoveKDVLM(plain, loaded.vlm.projector, loaded.vlm.llm, anyres=loaded.vlm.anyres),
                       loaded.tokenizer, loaded.config)
    images = sorted(str(p) for p in (Path(data).parent / "canvas").glob("*.png"))[::3]
    ours = [answer(merged, image, QUESTION, max_new_tokens=3) for image in images]
    # movekd's own data path on the export folder (HFLlavaNextGenerator) gives the same answers
    assert [answer(load_trained(out), image, QUESTION, max_new_tokens=3) for image in images] == ours
    script = tmp_path / "stock.py"
    script.write_text(STOCK_NEXT)
    proc = _stock_python(script, str(out), *images)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [t.strip() for t in theirs["answers"]] == ours
    # the first answer token's logits too (a random tiny LLM may answer every image alike)
    ours_logits = torch.stack([_first_logits(merged, image) for image in images])
    theirs_logits = torch.tensor(theirs["logits"])[:, :ours_logits.shape[1]]  # + the <image> row the export adds
    assert torch.allclose(theirs_logits, ours_logits, atol=1e-4, rtol=1e-4)
    assert (ours_logits[0] - ours_logits[1:]).abs().max() > 1e-3  # and they do depend on the image
    from PIL import Image

    expected = [loaded.vlm.anyres.num_tokens(Image.open(p).size[::-1]) for p in images]
    assert theirs["image_tokens"] == expected and len(set(expected)) > 1  # tiled: lengths differ by aspect


def test_exact_next_export_evaluates_like_the_bundle(next_bundle, tmp_path):
    from movekd.train.config import EvalConfig
    from movekd.train.evaluate import run_eval

    path, raw = next_bundle
    out = tmp_path / "exact"
    assert main(["export", str(path), str(out), "--format", "hf-llava-next"]) == 0
    config = EvalConfig(data=raw["stages"][0]["data"], max_samples=8, max_new_tokens=3, batch_size=3)
    expected = run_eval(load_trained(path), config, return_predictions=True)["predictions"]
    got = run_eval(load_trained(out), config, return_predictions=True)["predictions"]
    assert [r["prediction"] for r in got] == [r["prediction"] for r in expected]


def test_export_formats_refuse_the_wrong_bundle(next_bundle, tmp_path, capsys):
    path, _ = next_bundle
    assert main(["export", str(path), str(tmp_path / "llava")]) == 2  # hf-llava cannot tile
    assert "--format hf-llava-next" in capsys.readouterr().err


def test_anyres_on_a_bundle_without_it_is_a_clear_error(tmp_path, capsys):
    from test_export import _make_bundle

    plain, raw = _make_bundle(tmp_path)
    assert main(["export", str(plain), str(tmp_path / "next"), "--format", "hf-llava-next"]) == 2
    assert "image_aspect_ratio: anyres" in capsys.readouterr().err
    image = next(Path(raw["stages"][1]["data"]).parent.glob("images/*.png"))
    assert main(["chat", str(plain), "--image", str(image), "--image-aspect-ratio", "anyres", "hi"]) == 2
    err = capsys.readouterr().err
    assert "not trained with anyres" in err and "Traceback" not in err
