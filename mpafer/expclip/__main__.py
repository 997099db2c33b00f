"""`python -m mpafer.expclip cache | teacher | train`. The command only: its code is the
application's `expclip_command`, which the library never imports."""
if __name__ == "__main__":
    import runpy

    runpy.run_module("mpafer.app.expclip_command", run_name="__main__")
