"""`python -m mpafer.bench [BENCHMARK ...] | gpu`: the command; its code is mpafer.app.bench."""
if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["gpu"]:
        from mpafer.app.bench.gpu import main

        main(sys.argv[2:])
    else:
        from mpafer.app.bench import main

        main()
