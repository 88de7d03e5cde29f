"""Using the features: duplicates and train/test leakage (duplicates), a nearest-neighbour index (index) and
similarity search (search), all over an embed output's features."""
