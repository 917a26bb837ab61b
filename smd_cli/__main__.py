from smd_cli.cli import main

main()
