"""`python -m mpafer.bench`: see `mpafer.bench`; `python -m mpafer.bench gpu` and
`python -m mpafer.bench faces`: see `mpafer.bench.gpu` and `mpafer.bench.faces` (commands of their
own, with their own options)."""
import sys

if sys.argv[1:2] == ["gpu"]:
    from .gpu import main as gpu_main

    gpu_main(sys.argv[2:])
elif sys.argv[1:2] == ["faces"]:
    from .faces import main as faces_main

    faces_main(sys.argv[2:])
else:
    from . import main

    main()
