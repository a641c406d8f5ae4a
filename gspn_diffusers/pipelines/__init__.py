"""High-resolution generation: the staged pipeline, its stage plan, tiled VAE
and PNG metadata."""

from .highres import GSPNHighResPipeline, GSPNHighResPipelineOutput, StageReport
from .metadata import read_png_metadata, save_png
from .stages import Stage, plan_stages

__all__ = ["GSPNHighResPipeline", "GSPNHighResPipelineOutput", "Stage", "StageReport", "plan_stages",
           "read_png_metadata", "save_png"]
