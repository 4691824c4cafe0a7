"""`python -m data_prep.samples`: see the package docstring."""

from data_prep.samples import main

main()
