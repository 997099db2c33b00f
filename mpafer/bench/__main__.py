"""`python -m mpafer.bench`: see `mpafer.bench`."""
from . import main

main()
