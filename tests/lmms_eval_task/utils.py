"""The prunekit_shapes task's functions: images beside questions.jsonl, answers scored as prunekit eval scores them."""

from pathlib import Path

from PIL import Image

from prunekit.tools.evaluation import normalize_answer

HERE = Path(__file__).parent


def doc_to_visual(doc):
    with Image.open(HERE / doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}


def doc_to_choice(doc):
    """Four answers of the answer's kind (colors, shapes, yes/no, numbers), the right one among them."""
    kinds = [["red", "green", "blue", "yellow", "purple", "cyan"], ["circle", "square", "triangle", "diamond"],
             ["yes", "no"], ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]]
    kind = next(k for k in kinds if doc["answer"] in k)
    return sorted({doc["answer"], *[c for c in kind if c != doc["answer"]][:3]}, key=kind.index)
