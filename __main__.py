"""`python -m edgeops` runs the same CLI as the `edgeops` console script."""

from edgeops.cli import main

main()
