"""`python -m mpafer.expclip cache | teacher | train`. The command only; its code is
`mpafer.app.expclip_command`, in the application, which the library never imports."""
if __name__ == "__main__":
    import importlib

    command = importlib.import_module("mpafer.app.expclip_command")
    importlib.import_module("mpafer.app.cli").run_cli(command.main)
