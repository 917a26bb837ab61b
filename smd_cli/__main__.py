from smd_cli.errors import end_on_signals

end_on_signals()  # before the slow imports: a Ctrl-C while they run ends smd at once, with no traceback

from smd_cli.cli import main  # noqa: E402

main()
