from smd_cli.core.errors import end_on_signals

end_on_signals()  # before the slow imports: a Ctrl-C while they run ends smd at once, with no traceback

from smd_cli.app.cli import main  # noqa: E402

main()
