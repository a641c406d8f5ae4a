"""The shapes world: a procedural captioned-image world, a checker that scores
prompt adherence, and the small teacher trained on it (the embedded default)."""

from .checker import Detection, Score, adherence, detect, score
from .world import COLOURS, POSITIONS, SHAPES, WORDS, Scene, held_out_scenes, parse_caption, render, sample_scene

__all__ = ["COLOURS", "POSITIONS", "SHAPES", "WORDS", "Detection", "Scene", "Score", "adherence", "detect",
           "held_out_scenes", "parse_caption", "render", "sample_scene", "score"]
