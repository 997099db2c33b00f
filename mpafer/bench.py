"""`python -m mpafer.bench`: the benchmark; `gpu` runs every GPU check, `faces` times face
detection, `template` measures where a dataset's crops hold the landmarks. The command only; its
code is `mpafer.app.bench`."""
if __name__ == "__main__":
    import importlib
    import sys

    part = sys.argv[1] if sys.argv[1:2] in (["gpu"], ["faces"], ["template"]) else ""
    if part:
        importlib.import_module(f"mpafer.app.bench.{part}").main(sys.argv[2:])
    else:
        importlib.import_module("mpafer.app.bench").main()
