"""`python -m m9.cli`: the `m9` command."""

from m9.cli import main

main()
