"""`python -m mpafer.bench`: see `mpafer.bench`; `python -m mpafer.bench gpu`: see
`mpafer.bench.gpu` (a command of its own, with its own options)."""
import sys

if sys.argv[1:2] == ["gpu"]:
    from .gpu import main as gpu_main

    gpu_main(sys.argv[2:])
else:
    from . import main

    main()
