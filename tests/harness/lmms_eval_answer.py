"""Answer one local image + question with lmms-eval's ``llava_hf`` model class on an export folder.

Run with the evaluation venv's Python (``make eval-env``: lmms-eval, no movekd):
``python lmms_eval_answer.py EXPORT IMAGE QUESTION MAX_NEW_TOKENS``. Prints one JSON line
``{"chat": ANSWER, "simple": ANSWER}``: the answers of the class ``--model llava_hf`` resolves to
(the chat-message one) and of the plain-prompt one (``force_simple``), each through
``generate_until`` with a constructed ``Instance``, as lmms-eval's evaluator calls it (the task's
documents live in ``model.task_dict[task][split]``). Nothing is downloaded: no task, no dataset.
"""

import json
import sys

from PIL import Image

from lmms_eval.api.instance import Instance
from lmms_eval.models import get_model


def answer(model_class, folder: str, image: Image.Image, question: str, max_new_tokens: int) -> str:
    # device_map must be given: lmms-eval 0.7.3's default "" is refused by transformers 5
    model = model_class(pretrained=folder, device="cpu", device_map="cpu", dtype="float32")
    doc = {"image": image, "question": question}
    model.task_dict = {"local": {"test": [doc]}}
    gen_kwargs = {"max_new_tokens": max_new_tokens, "temperature": 0, "until": ["\n"]}
    if model_class.is_simple:  # (context, gen_kwargs, doc_to_visual, doc_id, task, split)
        arguments = (question, gen_kwargs, lambda d: [d["image"]], 0, "local", "test")
    else:  # (context, doc_to_messages, gen_kwargs, doc_id, task, split)
        def doc_to_messages(d):
            return [{"role": "user", "content": [{"type": "image", "url": d["image"]},
                                                 {"type": "text", "text": d["question"]}]}]
        arguments = (question, doc_to_messages, gen_kwargs, 0, "local", "test")
    request = Instance(request_type="generate_until", arguments=arguments, idx=0,
                       metadata={"task": "local", "doc_id": 0, "repeats": 1})
    (out,) = model.generate_until([request])
    return out if isinstance(out, str) else out.text


def main() -> None:
    try:
        import movekd  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("movekd is importable in the evaluation venv: the test would not show the export stands alone")
    folder, image_path, question, max_new_tokens = sys.argv[1:]
    image = Image.open(image_path).convert("RGB")
    answers = {name: answer(get_model("llava_hf", force_simple=simple), folder, image, question, int(max_new_tokens))
               for name, simple in (("chat", False), ("simple", True))}
    print(json.dumps(answers))


if __name__ == "__main__":
    main()
