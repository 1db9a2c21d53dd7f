"""A procedurally generated world of shapes with exact ground truth (the demo's training data)."""

from .world import COLORS, MATERIALS, SHAPES, SIZES, SceneObject, Scene, WorldConfig, generate_scene, relation

__all__ = ["COLORS", "MATERIALS", "SHAPES", "SIZES", "Scene", "SceneObject", "WorldConfig", "generate_scene", "relation"]
