"""Content-addressed feature store: each image's bytes are embedded once per model identity, ever.

Engine-free (pyarrow and numpy): `m9 embed` asks it before running the model, `m9 store` shows and drops it.
"""

from m9.store.store import SCHEMA, Entries, FeatureStore, ModelStore, StoreError, digest, rows

__all__ = ["SCHEMA", "Entries", "FeatureStore", "ModelStore", "StoreError", "digest", "rows"]
