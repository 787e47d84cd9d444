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
