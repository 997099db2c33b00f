"""`python -m mpafer.bench`: the benchmark; `gpu` runs every GPU check. The command only;
its code is `mpafer.app.bench`."""
if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["gpu"]:
        from mpafer.app.bench.gpu import main

        main(sys.argv[2:])
    else:
        from mpafer.app.bench import main

        main()
