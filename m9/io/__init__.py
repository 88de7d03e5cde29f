"""Storage behind one interface (local paths and s3:// URIs), the output lease, and pinned downloads from PyPI."""
