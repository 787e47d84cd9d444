"""The procedural shapes VQA data: deterministic, answers true to the scene, balanced; the JSONL reader."""

import json
from collections import Counter

import pytest

from prunekit.tools.data import COLORS, QUESTION_TYPES, SHAPES, ShapesVQA, load_jsonl
from prunekit.tools.data.shapes import NUMBERS


def test_samples_are_a_pure_function_of_seed_split_and_index():
    a, b = ShapesVQA("val", 8, seed=3), ShapesVQA("val", 8, seed=3)
    for i in range(8):
        x, y = a[i], b[i]
        assert (x.question, x.answer, x.objects) == (y.question, y.answer, y.objects)
        assert x.image.tobytes() == y.image.tobytes()
    others = [ShapesVQA("test", 8, seed=3), ShapesVQA("val", 8, seed=4)]
    for other in others:
        assert any(other[i].objects != a[i].objects for i in range(8))


def _check(sample):
    objs, q, a = sample.objects, sample.question, sample.answer
    if sample.type == "color":
        shape = q.removeprefix("what color is the ").removesuffix("?")
        (match,) = [o for o in objs if o.shape == shape]
        assert a == match.color
    elif sample.type == "shape":
        color = q.removeprefix("what shape is the ").removesuffix(" object?")
        (match,) = [o for o in objs if o.color == color]
        assert a == match.shape
    elif sample.type == "exist":
        color, shape = q.removeprefix("is there a ").removesuffix("?").split()
        assert a == ("yes" if any(o.color == color and o.shape == shape for o in objs) else "no")
    elif sample.type == "count":
        what = q.removeprefix("how many ").split()[0]
        n = sum(o.color == what for o in objs) if what in COLORS else sum(o.shape + "s" == what for o in objs)
        assert a == NUMBERS[n] and n >= 1
    elif sample.type == "spatial":
        quadrant = q.removeprefix("what color is the object in the ").removesuffix("?")
        (match,) = [o for o in objs if o.quadrant == quadrant]
        assert a == match.color
    else:
        assert a == NUMBERS[len({o.color for o in objs})]


def test_answers_are_true_to_the_scene_and_types_are_balanced():
    ds = ShapesVQA("test", 240, seed=0)
    samples = list(ds)
    for s in samples:
        _check(s)
        assert s.image.size == (192, 192) and 3 <= len(s.objects) <= 8
    assert Counter(s.type for s in samples) == {t: 40 for t in QUESTION_TYPES}
    exist = Counter(s.answer for s in samples if s.type == "exist")
    assert 10 <= exist["yes"] <= 30  # both answers occur, roughly half each
    answers = {s.answer for s in samples}
    assert set(COLORS) <= answers and set(SHAPES) <= answers


def test_most_patches_carry_no_object():
    """8-pixel patches (576 tokens at 192 px) that touch an object are a minority."""
    from prunekit.tools.data.shapes import SIZES

    for s in ShapesVQA("train", 20, seed=1):
        touched = set()
        for o in s.objects:
            r = SIZES[o.size] * 192
            for row in range(int((o.y * 192 - r) // 8), int((o.y * 192 + r) // 8) + 1):
                for col in range(int((o.x * 192 - r) // 8), int((o.x * 192 + r) // 8) + 1):
                    touched.add((row, col))
        assert len(touched) / 576 < 0.5


@pytest.mark.parametrize("kwargs, field", [
    ({"split": "dev"}, "split"), ({"types": ("color", "size")}, "types"), ({"min_objects": 0}, "min_objects"),
    ({"image_size": 8}, "image_size"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ShapesVQA(**kwargs)


def test_jsonl_reads_a_users_data(tmp_path):
    sample = ShapesVQA("test", 1)[0]
    sample.image.save(tmp_path / "a.png")
    rows = [{"image": "a.png", "question": sample.question, "answer": sample.answer, "type": "mine"},
            {"image": "a.png", "question": "q", "answer": "x"}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    loaded = load_jsonl(tmp_path / "data.jsonl")
    assert [(s.question, s.answer, s.type) for s in loaded] == [(sample.question, sample.answer, "mine"),
                                                                ("q", "x", "custom")]
    assert loaded[0].image.tobytes() == sample.image.tobytes()


@pytest.mark.parametrize("line, message", [
    ('{"image": "a.png", "question": "q"}', "answer"),
    ('{"image": "missing.png", "question": "q", "answer": "a"}', "not found"),
    ("{not json", "not valid JSON"),
])
def test_jsonl_errors_name_the_problem(tmp_path, line, message):
    (tmp_path / "data.jsonl").write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        load_jsonl(tmp_path / "data.jsonl")
