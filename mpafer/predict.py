"""`python -m mpafer.predict`: every face in your photos, aligned and labelled. The command
only; its code is `mpafer.app.predict`."""
if __name__ == "__main__":
    from mpafer.app.cli import run_cli
    from mpafer.app.predict import main

    run_cli(main)
