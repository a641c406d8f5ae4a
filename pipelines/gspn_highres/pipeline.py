"""diffusers custom-pipeline entry point:

    DiffusionPipeline.from_pretrained(base, custom_pipeline="pipelines/gspn_highres", trust_remote_code=True)

The pipeline itself lives in gspn_diffusers.pipelines.highres.
"""

from gspn_diffusers.pipelines.highres import GSPNHighResPipeline  # noqa: F401
