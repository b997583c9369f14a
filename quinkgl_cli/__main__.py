"""`python -m quinkgl_cli`: the same command line as the `quinkgl` console script."""

from quinkgl_cli.cli.app import main

main()
