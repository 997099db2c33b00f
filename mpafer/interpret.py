"""`python -m mpafer.interpret`: what a checkpoint's learned prompts hold. The command only;
its code is `mpafer.app.interpret`."""
if __name__ == "__main__":
    from mpafer.app.cli import run_cli
    from mpafer.app.interpret import main

    run_cli(main)
