"""Public image data sets written as labelled folders: Fashion-MNIST, Fruits-360, photos from Debian packages."""
