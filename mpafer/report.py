"""`python -m mpafer.report`: one table over run folders. The command only;
its code is `mpafer.app.report`."""
if __name__ == "__main__":
    from mpafer.app.cli import run_cli
    from mpafer.app.report import main

    run_cli(main)
