"""m9: turn a folder or bucket of images into MobileNetV2 feature vectors and their PCA, on Spark and Ray.

Library API, one function per stage, each taking its frozen config: ``m9.stages.ingest.ingest(IngestConfig)``,
``m9.stages.embed.embed(EmbedConfig)``, ``m9.stages.reduce.reduce(ReduceConfig)`` and
``m9.stages.pipeline.run(...)``. The stages import Spark, Ray and TensorFlow, so they are not imported here.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
