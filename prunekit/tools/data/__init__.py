"""Offline data for prunekit's benchmark: a procedural shapes VQA generator and a JSONL reader."""

from .shapes import COLORS, QUESTION_TYPES, SHAPES, ShapesVQA, VQASample, load_jsonl, render_scene, make_question

__all__ = ["COLORS", "QUESTION_TYPES", "SHAPES", "ShapesVQA", "VQASample", "load_jsonl", "render_scene",
           "make_question"]
