"""The stages and their contracts: ingest, embed, reduce, evaluate, report, and `m9 run` that chains them."""
