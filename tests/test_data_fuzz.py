"""Property-based: whatever a LLaVA data file holds, every record ends as a usable item, a counted
skip, or (for the file as a whole) a clean :class:`~movekd.errors.UserError`; never another exception."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from movekd.data import ConversationEncoder, LlavaDataset, Skipped, check_skip_budget, scan_llava
from movekd.data.llava_json import PROBLEM_KINDS, scan_samples
from movekd.errors import DataError, UserError
from tiny_vlm import make_tokenizer, write_image

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
roles = st.sampled_from(["human", "gpt", "system", "user", "assistant", "robot", "", None, 3, ["human"]])
texts = st.sampled_from(["<image>\nwhat color?", "<image><image> two", "red", "", "<image>", " <image> ",
                         "word " * 120]) | st.text(max_size=40)
# Mostly well-formed turns in any order (wrong order, missing answers, extra tags, ...), some odd ones.
good_turns = st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system"]), "value": texts})
odd_turns = st.fixed_dictionaries({"from": roles, "value": texts | scalars}) | json_values
turns = st.one_of(good_turns, good_turns, good_turns, odd_turns)
# Near-valid records (the defects real datasets have) mixed with arbitrary JSON values.
records = st.fixed_dictionaries(
    {"conversations": st.one_of(st.lists(turns, max_size=4), st.lists(turns, max_size=4), json_values)},
    optional={"id": st.text(max_size=5) | st.integers() | st.none(),
              "image": st.sampled_from(["images/red.png"] * 4 + ["images/missing.png", "images/corrupt.png",
                                        "images/truncated.png", "images", "", None, 3, ["images/red.png"]])},
) | json_values


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    write_image(root / "images" / "red.png", (255, 0, 0), size=12)
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    write_image(root / "images" / "big.png", (0, 255, 0), size=64)
    data = (root / "images" / "big.png").read_bytes()
    (root / "images" / "truncated.png").write_bytes(data[: len(data) // 2])
    return root


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@SETTINGS
@given(samples=st.lists(records, max_size=6), template=st.sampled_from(["chat", "plain", "v1"]),
       max_length=st.sampled_from([6, 24, 2048]), prompt_only=st.booleans())
def test_every_record_is_an_item_or_a_counted_skip(root, tok, samples, template, max_length, prompt_only):
    scan = scan_samples(samples, source="fuzz", image_root=root, require_answer=not prompt_only)
    assert len(scan.samples) + len(scan.problems) == scan.total == len(samples)
    assert {p.reason for p in scan.problems} <= set(PROBLEM_KINDS)
    assert sum(scan.by_kind().values()) == len(scan.problems)
    assert scan.summary()  # never raises, whatever the ids are
    encoder = ConversationEncoder(tok, template, max_length=max_length, num_image_tokens=4)
    dataset = LlavaDataset(scan.samples, encoder, image_root=root, image_size=8, prompt_only=prompt_only)
    for i in range(len(dataset)):
        item = dataset[i]
        if isinstance(item, Skipped):
            assert item.reason and item.id is not None
        else:
            assert item["image"].shape == (3, 8, 8) and item["input_ids"].ndim == 1
            assert len(item["input_ids"]) + 3 * int((item["input_ids"] == -200).sum()) <= max_length


@SETTINGS
@given(content=st.binary(max_size=200) | st.lists(records, max_size=4).map(lambda r: json.dumps(r).encode())
       | json_values.map(lambda v: json.dumps(v).encode()),
       cut=st.integers(min_value=0, max_value=400), suffix=st.sampled_from([".json", ".jsonl"]))
def test_any_file_is_scanned_or_refused_cleanly(tmp_path_factory, content, cut, suffix):
    path = tmp_path_factory.mktemp("file") / f"data{suffix}"
    path.write_bytes(content[:cut] if cut < len(content) else content)
    try:
        scan = scan_llava(path)
    except UserError as error:  # the whole file is unusable: the message names it
        assert str(path) in str(error)
        return
    assert len(scan.samples) + len(scan.problems) == scan.total


@settings(deadline=None)  # a pure function: a deadline only measures the machine's load (flaky at load 8)
@given(counts=st.dictionaries(st.sampled_from(PROBLEM_KINDS), st.integers(0, 50), max_size=4),
       total=st.integers(1, 1000), ratio=st.floats(0, 1), strict=st.booleans())
def test_skip_budget_is_a_clean_error_with_the_counts(counts, total, ratio, strict):
    bad = sum(counts.values())
    try:
        check_skip_budget(counts, source="data.json", total=total, drawn=0, max_skip_ratio=ratio, strict=strict)
    except DataError as error:
        assert (strict and bad) or bad > ratio * total
        assert "data.json" in str(error) and all(f"{k} {n}" in str(error) for k, n in counts.items() if n)
    else:
        assert not (strict and bad) and bad <= ratio * total
