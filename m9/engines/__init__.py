"""How work is distributed: the Spark session, the Ray cluster, and the jars Spark needs for S3."""
